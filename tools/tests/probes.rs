//! Every script in probes/ against a real server under a small load it makes, checking
//! that each printed what the load should produce.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use common::*;
use futures_util::SinkExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

const SCRIPTS: [&str; 9] = [
    "conn-lifecycle",
    "delivery-latency",
    "queue-depth",
    "heartbeats",
    "alloc-sites",
    "alloc-stacks",
    "cpu-stacks",
    "offcpu",
    "redis-latency",
];

/// Says exactly what is missing for bpftrace to run here, instead of passing silently.
fn require_bpftrace() {
    require_root();
    let version = Command::new("bpftrace").arg("--version").output();
    assert!(version.is_ok_and(|o| o.status.success()), "bpftrace is not installed: apt-get install -y bpftrace (scripts/test does this as root)");
    assert!(
        std::path::Path::new("/sys/kernel/tracing/uprobe_events").exists() || std::path::Path::new("/sys/kernel/debug/tracing/uprobe_events").exists(),
        "tracefs is not mounted: mount -t tracefs nodev /sys/kernel/tracing (scripts/test does this as root)"
    );
}

struct Trace {
    name: &'static str,
    child: Child,
}

impl Trace {
    /// Starts a script and returns once its BEGIN probe has run, i.e. it is attached.
    fn start(name: &'static str, pid: u32) -> Trace {
        let script = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../probes")).join(format!("{name}.bt"));
        let mut child = Command::new("bpftrace")
            .args(["-B", "line", "-p", &pid.to_string(), script.to_str().unwrap(), &pid.to_string()])
            // One symbol table per binary, not one read per stack frame (probes/README.md).
            .env("BPFTRACE_CACHE_USER_SYMBOLS", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("bpftrace runs");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        loop {
            line.clear();
            if stdout.read_line(&mut line).unwrap() == 0 {
                let mut err = String::new();
                child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
                panic!("{name}.bt exited before tracing: {err}");
            }
            if line.starts_with("Tracing pushline") {
                break;
            }
        }
        child.stdout = Some(stdout.into_inner());
        Trace { name, child }
    }

    /// Stops it as Ctrl-C would (again every 15 s until it exits); returns what it printed.
    /// A script that has not exited two minutes after the first fails the test with where
    /// its threads were waiting in the kernel, so a hang says why it hung.
    fn stop(self) -> String {
        let pid = self.child.id() as i32;
        let name = self.name;
        let asked = std::time::Instant::now();
        // SAFETY: kill on our own child.
        unsafe { libc_kill(pid, 2) };
        let (exited, waited) = std::sync::mpsc::channel::<()>();
        let watchdog = std::thread::spawn(move || {
            // A Ctrl-C that lands between bpftrace's look at its exit flag and its next
            // epoll_wait is not seen until an event wakes it, and a script whose probes
            // print nothing gets none (a CI run waited 120 s on alloc-sites.bt): a second
            // Ctrl-C interrupts the wait, as a user pressing it again would. Not sooner than
            // 15 s: a script printing its maps (4.6 s at most seen) is not cut short.
            for _ in 0..8 {
                if waited.recv_timeout(std::time::Duration::from_secs(15)).is_ok() {
                    return None;
                }
                // SAFETY: kill on our own child, which has not been reaped yet.
                unsafe { libc_kill(pid, 2) };
            }
            let stacks = thread_stacks(pid);
            // SAFETY: kill on our own child, which has not been reaped yet.
            unsafe { libc_kill(pid, 9) };
            Some(stacks)
        });
        let out = self.child.wait_with_output().unwrap();
        let _ = exited.send(());
        let hung = watchdog.join().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        eprintln!("{name}.bt: {:.1} s from Ctrl-C to exit, {} lines printed", asked.elapsed().as_secs_f64(), text.lines().count());
        if let Some(stacks) = hung {
            panic!(
                "{name}.bt did not exit within 120 s of Ctrl-C; its threads were at:\n{stacks}\nstderr:\n{}\nlast of stdout:\n{}",
                String::from_utf8_lossy(&out.stderr),
                &text[text.len().saturating_sub(2000)..]
            );
        }
        assert!(out.status.success() || !text.is_empty(), "{}.bt failed: {}", self.name, String::from_utf8_lossy(&out.stderr));
        text
    }
}

/// Each thread's name, state, wait channel and kernel stack, from /proc.
fn thread_stacks(pid: i32) -> String {
    let mut report = String::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return "(gone)".into() };
    for task in tasks.flatten() {
        let path = task.path();
        let read = |file: &str| std::fs::read_to_string(path.join(file)).unwrap_or_default();
        let state = read("status").lines().filter(|l| l.starts_with("Name:") || l.starts_with("State:")).collect::<Vec<_>>().join(" ");
        report += &format!("{} {state} wchan={}\n{}\n", task.file_name().to_string_lossy(), read("wchan"), read("stack"));
    }
    report
}

/// The tests here run one at a time: several bpftrace sessions attaching and symbolizing
/// at once on two cores is what the one CI hang had in common with nothing else.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, signal: i32) -> i32;
}

fn value(output: &str, key: &str) -> u64 {
    output
        .lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(": ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no `{key}` in:\n{output}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_probe_script_reports_the_load_it_saw() {
    require_bpftrace();
    let _alone = ONE_AT_A_TIME.lock().await;
    // On the Redis registry, so that the Redis probes fire too.
    let redis = common::Redis::start();
    let server = Server::start(&[("PUSHLINE_REGISTRY", "redis"), ("PUSHLINE_REDIS_URL", &redis.url)]);
    let pid = server.pid();
    // One at a time: attaching several at once to the same process hung bpftrace once.
    let traces: Vec<Trace> = SCRIPTS.iter().map(|name| Trace::start(name, pid)).collect();

    // The load: 20 connections; each pings twice (JSON, WebSocket) and gets one push;
    // 10 close; then a few seconds of broadcasts to the other 10 for the CPU samplers.
    let mut clients = open(server.client, 20, "p").await;
    // An SSE client: its task never lends its socket to publishers, so what is pushed to
    // it is always queued first (a WebSocket that owes nothing is written to directly).
    let mut sse = TcpStream::connect(server.client).await.unwrap();
    sse.write_all(b"GET /sse?uid=sse0 HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut welcome = vec![0u8; 4096];
    let n = sse.read(&mut welcome).await.unwrap();
    assert!(String::from_utf8_lossy(&welcome[..n]).contains("200 OK"), "{}", String::from_utf8_lossy(&welcome[..n]));
    server.wait_connections(21).await;
    for i in 0..20 {
        http(server.client, "POST", "/v1/push", &format!(r#"{{"uids":["sse0"],"data":{i}}}"#)).await;
    }
    for ws in clients.iter_mut() {
        ws.send(Message::Text(r#"{"type":"ping"}"#.into())).await.unwrap();
        ws.send(Message::Ping(b"hb".to_vec().into())).await.unwrap();
    }
    for i in 0..20 {
        http(server.client, "POST", "/v1/push", &format!(r#"{{"uids":["p{i}"],"data":{i}}}"#)).await;
    }
    let rest = clients.split_off(10);
    for mut ws in clients {
        ws.close(None).await.unwrap();
    }
    let readers = drain(rest);
    let busy = load(server.client);
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    busy.abort();
    server.wait_connections(11).await;

    // Stopped together: each symbolizes its stacks as it exits.
    let outputs: Vec<(&str, String)> = std::thread::scope(|s| {
        let stopping: Vec<_> = traces.into_iter().map(|t| s.spawn(move || (t.name, t.stop()))).collect();
        stopping.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let out = |name: &str| outputs.iter().find(|(n, _)| *n == name).map(|(_, o)| o.as_str()).unwrap();

    assert_eq!(value(out("conn-lifecycle"), "@opened"), 21);
    assert_eq!(value(out("conn-lifecycle"), "@closed"), 10);
    assert_eq!(value(out("conn-lifecycle"), "@closed_by_reason[0]"), 10, "closed by the client");
    assert!(value(out("delivery-latency"), "@written") >= 20);
    assert!(out("delivery-latency").contains("@latency_us"));
    assert!(value(out("queue-depth"), "@enqueued") >= 20, "the SSE client's pushes were queued");
    assert_eq!(value(out("heartbeats"), "@heartbeats[0]"), 20, "JSON pings");
    assert_eq!(value(out("heartbeats"), "@heartbeats[1]"), 20, "WebSocket pings");
    assert!(value(out("alloc-sites"), "@allocations[1]") >= 20, "connection_task allocations");
    assert!(value(out("alloc-stacks"), "@allocations") > 0);
    assert!(out("alloc-stacks").contains("pushline::"), "allocation stacks name server functions");
    // On one Redis a push is its append script alone, which finds the uid's nodes itself:
    // 20 to WebSocket clients, 20 to the SSE one, and the broadcasts after; no HGETALL.
    assert!(value(out("redis-latency"), "@round_trips[8]") >= 40, "an append round trip per push");
    assert!(!out("redis-latency").contains("@round_trips[1]:"), "no session lookup before a push on one Redis");
    assert!(value(out("redis-latency"), "@commands[0]") >= 21, "a session write per connection");
    assert!(out("redis-latency").contains("@latency_us[8]"));

    let dir = std::env::temp_dir().join(format!("pushline-probes-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for name in ["cpu-stacks", "offcpu"] {
        let saved = dir.join(format!("{name}.out"));
        std::fs::write(&saved, out(name)).unwrap();
        let svg = dir.join(format!("{name}.svg"));
        tools(&["flamegraph", "--from-bpftrace", saved.to_str().unwrap(), "-o", svg.to_str().unwrap()]);
        let svg = std::fs::read_to_string(&svg).unwrap();
        assert!(svg.contains("<svg"), "{name} renders");
        if name == "cpu-stacks" {
            assert!(svg.contains("pushline::"), "on-CPU stacks name server functions");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
    drop((readers, sse));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tls_script_counts_handshakes() {
    require_bpftrace();
    let _alone = ONE_AT_A_TIME.lock().await;
    let dir = std::env::temp_dir().join(format!("pushline-probes-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let made = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1", "-subj", "/CN=localhost", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl runs (apt-get install -y openssl)");
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let server = Server::start(&[("PUSHLINE_TLS_CERT", cert.to_str().unwrap()), ("PUSHLINE_TLS_KEY", key.to_str().unwrap())]);
    let trace = Trace::start("tls-handshake", server.pid());
    for _ in 0..3 {
        let out = Command::new("curl")
            .args(["-sk", "-o", "/dev/null", &format!("https://{}/v1/nowhere", server.client)])
            .output()
            .expect("curl runs (apt-get install -y curl)");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let out = trace.stop();
    assert_eq!(value(&out, "@handshakes[0]"), 3, "three full handshakes");
    assert!(out.contains("@took_us[0]"), "{out}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kernel_flame_graph_names_the_tcp_stack_under_fan_out() {
    require_bpftrace();
    let _alone = ONE_AT_A_TIME.lock().await;
    let server = Server::start(&[]);
    let readers = drain(open(server.client, 200, "k").await);
    let busy = load(server.client);
    let dir = std::env::temp_dir().join(format!("pushline-kflame-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (svg, folded) = (dir.join("cpu.svg"), dir.join("cpu.folded"));
    let pid = server.pid().to_string();
    let run = tokio::task::spawn_blocking(move || {
        tools(&["flamegraph", &pid, "--kernel", "--seconds", "3", "-o", svg.to_str().unwrap(), "--folded", folded.to_str().unwrap()]);
        (std::fs::read_to_string(&svg).unwrap(), std::fs::read_to_string(&folded).unwrap())
    });
    let (svg, folded) = run.await.unwrap();
    busy.abort();
    assert!(svg.contains("<svg") && svg.contains("kernel and user"), "an SVG");
    assert!(folded.contains("tcp_sendmsg_[k]"), "fan-out writes name the kernel's tcp_sendmsg:\n{}", &folded[..folded.len().min(3000)]);
    assert!(folded.contains("pushline::"), "with the server's own frames beneath");
    std::fs::remove_dir_all(&dir).unwrap();
    drop(readers);
}
