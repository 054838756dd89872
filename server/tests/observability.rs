//! The server explains itself: CPU and heap profiles, per-site allocation counters,
//! memory and object counts. Each test runs its own `pushline` process, since profiles
//! and allocation counters are process-wide.

mod common;


use common::*;
use pushline_alloc::symbolize::Kind;
use serde_json::json;

/// Broadcasts to the server's clients until dropped, so profiles see it busy.
struct Load(tokio::task::JoinHandle<()>);

impl Load {
    fn start(addr: std::net::SocketAddr) -> Load {
        Load(tokio::spawn(async move {
            let http = reqwest::Client::new();
            loop {
                let body = json!({"data": {"blob": "x".repeat(512)}}).to_string();
                let _ = http.post(format!("http://{addr}/v1/broadcast")).body(body).send().await;
            }
        }))
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Keeps the clients reading, so broadcasts are written, not queued.
fn drain(clients: Vec<Ws>) -> Vec<tokio::task::JoinHandle<()>> {
    use futures_util::StreamExt;
    clients.into_iter().map(|mut ws| tokio::spawn(async move { while let Some(Ok(_)) = ws.next().await {} })).collect()
}

async fn get_bytes(url: String) -> (u16, Vec<u8>) {
    let response = reqwest::get(url).await.expect("request");
    let status = response.status().as_u16();
    (status, response.bytes().await.expect("body").to_vec())
}

#[tokio::test]
async fn cpu_profile_of_a_busy_server_names_its_functions() {
    // Dense heap sampling too, so the heap profile holds the connections' stacks, and both
    // samplers run at once under load.
    let server = Process::spawn_with_env(&["--profile-hz", "99"], None, &[("_RJEM_MALLOC_CONF", "lg_prof_sample:12")]);
    let readers = drain(many_ws(server.client, 50, "c").await);
    let admin = server.admin;
    let load = Load::start(server.client);

    // Two bursts asked at once, while the load runs: one is taken, the other refused.
    let url = format!("http://{admin}/debug/pprof/profile?seconds=2&symbolize=none");
    let (a, b) = tokio::join!(get_bytes(url.clone()), get_bytes(url));
    let (((200, gzipped), (409, refused)) | ((409, refused), (200, gzipped))) = (a, b) else {
        panic!("expected one 200 and one 409");
    };
    assert!(String::from_utf8_lossy(&refused).contains("already running"));
    // Raw addresses and mappings: named here, from the binary on disk, as the tools do.
    let folded = pushline_alloc::symbolize::folded(&gzipped, Kind::Cpu, &mut Default::default()).expect("a gzipped profile.proto");
    // Named from the binary on disk: a pushline function, or one instantiated for a
    // pushline type (`poll<pushline::listener::..>`); a raw address would be `pushline+0x..`.
    // (A burst of broadcasts spends most samples in `send`, so which frames it catches varies.)
    assert!(folded.iter().any(|l| l.contains("pushline::")), "server functions in the burst: {:#?}", &folded);
    drop(load);

    // The always-on window: the last minute, answered at once, names the delivery path.
    let (status, folded) = get_bytes(format!("http://{admin}/debug/pprof/profile?minutes=1&format=folded")).await;
    assert_eq!(status, 200);
    let folded = String::from_utf8(folded).unwrap();
    assert!(folded.lines().all(|l| l.rsplit_once(' ').is_some_and(|(_, n)| n.parse::<u64>().is_ok())), "folded lines end in a count");
    assert!(folded.lines().any(|l| l.starts_with("pushline-core-") && l.contains("pushline::")), "the core threads' stacks: {folded:.2000}");
    let (status, svg) = get_bytes(format!("http://{admin}/debug/pprof/profile?minutes=1&format=svg")).await;
    assert_eq!(status, 200);
    let svg = String::from_utf8(svg).unwrap();
    assert!(svg.starts_with("<?xml") && svg.contains("pushline::"), "a flame graph naming server functions");

    // go tool pprof, the ecosystem's reader, reads the CPU and heap profiles and shows
    // Pushline's own functions (named by the server's worker, so it needs no binary).
    for (path, kind) in [("profile?minutes=1", "cpu"), ("heap", "inuse_space")] {
        let said = go_pprof_top(&format!("http://{admin}/debug/pprof/{path}"));
        assert!(said.contains(&format!("Type: {kind}")) && said.contains("pushline::"), "go tool pprof -top {path} names Pushline's functions:\n{said}");
    }

    // Outside what is kept: a 400 that says what is.
    for (query, says) in [
        ("minutes=0", "from 1 to"),
        ("minutes=18446744073709551615", "from 1 to"),
        ("minutes=1&from=2001-01-01T00:00:00Z", "not both"),
        ("from=2001-01-01T00:00:00Z", "not kept"),
        ("to=2001-01-01T00:00:00Z", "not kept"),
        ("seconds=0", "seconds"),
    ] {
        let (status, body) = get_bytes(format!("http://{admin}/debug/pprof/profile?{query}")).await;
        let body = String::from_utf8_lossy(&body);
        assert_eq!(status, 400, "{query}: {body}");
        assert!(body.contains(says), "{query}: {body}");
    }
    let text = metrics(admin).await;
    assert!(metric(&text, "pushline_profiler_samples_total") > 0.0);
    assert_eq!(metric(&text, r#"pushline_profiler_samples_dropped_total{reason="ring_full"}"#), 0.0);
    drop(readers);
}

/// The difference of two kept windows shows what changed: a minute of metrics scrapes,
/// then a minute of broadcasts. The broadcast path grew from nothing and the metrics
/// render shrank to nothing, in the folded diff (`stack base now`), and `go tool pprof`
/// reads the pprof diff (the base counts negative) and names both.
#[tokio::test]
async fn the_difference_of_two_minutes_names_what_only_the_second_ran() {
    let server = Process::spawn(&["--profile-hz", "99"], None);
    let admin = server.admin;
    let unix = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    let minute = || unix().as_secs() / 60;
    // The first window: scrapes (Metrics::render) in the last 5 s of a minute (what the
    // clock says is the only signal; a few seconds keep a debug build's deep stacks well
    // inside the stack table).
    let mut base = minute();
    if (base + 1) * 60 - unix().as_secs() < 6 {
        base += 1;
    }
    tokio::time::sleep(std::time::Duration::from_secs((base + 1) * 60 - 5).saturating_sub(unix())).await;
    let http = reqwest::Client::new();
    while minute() == base {
        let _ = http.get(format!("http://{admin}/metrics")).send().await.unwrap().bytes().await;
    }
    // The second: broadcasts to readers, for a few seconds of its minute.
    let now = minute();
    let readers = drain(many_ws(server.client, 50, "d").await);
    let load = Load::start(server.client);
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    drop(load);
    drop(readers);
    assert_eq!(minute(), now, "the load fit in its minute");
    tokio::time::sleep(pushline_profiler::DRAINED_WITHIN).await;

    let query = format!("from={}&to={}&base_from={}&base_to={}", now * 60, now * 60, base * 60, base * 60);
    let (status, folded) = get_bytes(format!("http://{admin}/debug/pprof/profile?{query}&format=folded")).await;
    let folded = String::from_utf8(folded).unwrap();
    assert_eq!(status, 200, "{folded}");
    let counts = |line: &str| -> (u64, u64) {
        let mut fields = line.rsplitn(3, ' ');
        let now = fields.next().unwrap().parse().unwrap();
        (fields.next().unwrap().parse().unwrap(), now)
    };
    let grew: u64 = folded.lines().filter(|l| l.contains("Hub::broadcast")).map(|l| counts(l)).filter(|(b, _)| *b == 0).map(|(_, n)| n).sum();
    let shrank: u64 = folded.lines().filter(|l| l.contains("Metrics::render")).map(|l| counts(l)).filter(|(_, n)| *n == 0).map(|(b, _)| b).sum();
    assert!(grew > 0 && shrank > 0, "broadcast grew from nothing ({grew}), render shrank to nothing ({shrank}):\n{folded:.3000}");
    let (status, svg) = get_bytes(format!("http://{admin}/debug/pprof/profile?{query}&format=svg")).await;
    assert!(status == 200 && String::from_utf8_lossy(&svg).contains("what changed"), "a differential flame graph");
    let said = go_pprof(&format!("http://{admin}/debug/pprof/profile?{query}"), &["-top", "-cum", "-nodecount=2000"]);
    let line = |name: &str| said.lines().find(|l| l.ends_with(name)).unwrap_or_else(|| panic!("go tool pprof names {name}:\n{said}")).to_owned();
    let negative = |line: &str| line.split_whitespace().any(|field| field.starts_with('-'));
    assert!(!negative(&line("pushline::hub::Hub::broadcast::{{closure}}")), "what only the window ran counts positive");
    assert!(negative(&line("pushline::telemetry::Metrics::render")), "what only the base ran counts negative");

    // A base needs a window, and must be kept.
    for (query, says) in [
        ("base_minutes=1", "give minutes="),
        ("minutes=1&base_from=2001-01-01T00:00:00Z&base_to=2001-01-01T00:01:00Z", "not kept"),
        ("minutes=1&base_minutes=1&base_from=0", "not both"),
        ("minutes=1&base_from=0", "together"),
    ] {
        let (status, body) = get_bytes(format!("http://{admin}/debug/pprof/profile?{query}")).await;
        let body = String::from_utf8_lossy(&body);
        assert!(status == 400 && body.contains(says), "{query}: {status} {body}");
    }
}

/// What `go tool pprof -top` says of the profile at `url`, every node listed: Pushline's
/// own functions hold little flat time, and a top 300 by flat time can miss them all.
fn go_pprof_top(url: &str) -> String {
    go_pprof(url, &["-top", "-nodecount=100000"])
}

/// What `go tool pprof` with `report` says of the profile at `url` (saved to a file first,
/// so the test's own timeout bounds the download).
fn go_pprof(url: &str, report: &[&str]) -> String {
    let file = std::env::temp_dir().join(format!("pushline-profile-{}-{}.pb.gz", std::process::id(), url.len()));
    let fetched = std::process::Command::new("curl").args(["-sf", "-o"]).arg(&file).arg(url).status().expect("curl runs");
    assert!(fetched.success(), "curl {url}");
    let top = std::process::Command::new("go")
        .args(["tool", "pprof"])
        .args(report)
        .arg(&file)
        .output()
        .unwrap_or_else(|e| panic!("cannot run go ({e}): install it with `apt-get install -y golang-go` (scripts/test does this as root)"));
    std::fs::remove_file(&file).unwrap();
    let said = String::from_utf8_lossy(&top.stdout).into_owned() + &String::from_utf8_lossy(&top.stderr);
    assert!(top.status.success(), "go tool pprof {report:?} {url}: {said}");
    said
}

/// The profiler's cost stays small: its site after bursts at the highest rate, and the
/// server's resident memory, which one profile of the collector before grew by ~290 MB.
#[tokio::test]
async fn profiles_cost_the_server_almost_nothing_to_keep() {
    let server = Process::spawn(&[], None);
    let readers = drain(many_ws(server.client, 20, "m").await);
    let admin = server.admin;
    let _load = Load::start(server.client);
    let before = rss(&server);
    for _ in 0..3 {
        let (status, _) = get_bytes(format!("http://{admin}/debug/pprof/profile?seconds=1&frequency=1000")).await;
        assert_eq!(status, 200);
    }
    let after = rss(&server);
    let text = metrics(admin).await;
    let profiler = metric(&text, r#"pushline_alloc_site_live_bytes{site="profiler"}"#);
    eprintln!("profiler site {profiler} B; RSS {before} -> {after}");
    assert!(profiler < 4.0 * 1_048_576.0, "the profiler holds {profiler} bytes");
    assert!(after < before + 16 * 1_048_576, "RSS {before} -> {after} over three bursts at 1000 Hz");
    drop(readers);
}

/// Live bytes of the sites that grow with connections, from /debug/memory.
async fn connection_site_bytes(admin: std::net::SocketAddr) -> i64 {
    let memory = get_json(admin, "/debug/memory").await;
    memory["sites"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| ["connection_task", "sessions", "outbound_queue", "topics"].contains(&s["site"].as_str().unwrap()))
        .map(|s| s["live_bytes"].as_i64().unwrap())
        .sum()
}

#[tokio::test]
async fn site_counters_grow_with_connections_and_return_when_they_close() {
    const N: usize = 500;
    let server = Process::spawn(&[], None);
    // One round first, so tables have grown to hold N and stay that size: what is
    // measured after is what connections themselves hold.
    drop(many_ws(server.client, N, "warm").await);
    wait_metric(server.admin, r#"pushline_connections{transport="ws"}"#, |v| v == 0.0).await;
    let baseline = connection_site_bytes(server.admin).await;

    let clients = many_ws(server.client, N, "s").await;
    let objects = get_json(server.admin, "/debug/objects").await;
    assert_eq!((objects["connections"].as_u64(), objects["sessions"].as_u64()), (Some(N as u64), Some(N as u64)), "{objects}");
    let memory = get_json(server.admin, "/debug/memory").await;
    assert_eq!(memory["connections"]["total"], N);
    let grown = connection_site_bytes(server.admin).await - baseline;
    let per_connection = grown as f64 / N as f64;
    assert!((150.0..4000.0).contains(&per_connection), "{per_connection} bytes per connection at the connection sites");
    let text = metrics(server.admin).await;
    assert!(metric(&text, r#"pushline_alloc_site_live_bytes{site="connection_task"}"#) > 0.0);
    assert!(metric(&text, r#"pushline_alloc_site_allocations_total{site="sessions"}"#) >= N as f64);

    let listed = get_json(server.admin, "/debug/connections?limit=10").await;
    assert_eq!(listed["total"], N);
    assert_eq!(listed["connections"].as_array().unwrap().len(), 10);
    let session = get_json(server.admin, "/debug/sessions/s7").await;
    assert_eq!(session["connections"][0]["uid"], "s7");
    assert_eq!(session["connections"][0]["transport"], "ws");

    drop(clients);
    wait_metric(server.admin, r#"pushline_connections{transport="ws"}"#, |v| v == 0.0).await;
    let left = connection_site_bytes(server.admin).await - baseline;
    assert!(left < grown / 10 + 16 * 1024, "{left} of {grown} bytes still live after every connection closed");
    let (status, _) = get_bytes(format!("http://{}/debug/sessions/s7", server.admin)).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn heap_profile_charges_connection_memory_to_the_connection_path() {
    const N: usize = 1000;
    // Sample about every 4 KiB instead of 512 KiB, so a thousand connections show.
    let server = Process::spawn_with_env(&[], None, &[("_RJEM_MALLOC_CONF", "lg_prof_sample:12")]);
    let _clients = many_ws(server.client, N, "h").await;

    let (status, folded) = get_bytes(format!("http://{}/debug/pprof/heap?format=folded", server.admin)).await;
    assert_eq!(status, 200);
    let folded = String::from_utf8(folded).unwrap();
    let on_connection_path: i64 = folded
        .lines()
        .filter(|l| ["pushline::gateway::", "pushline::client::", "pushline::conn::", "pushline::hub::", "pushline::listener::"].iter().any(|p| l.contains(p)))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, n)| n.parse::<i64>().ok()))
        .sum();
    // At least each connection's record (192 bytes in jemalloc's class); sampled, so an
    // estimate (about 270 bytes a connection with the hub's and the driver's slots).
    assert!(on_connection_path > (N * 192) as i64, "{on_connection_path} live bytes under the connection path for {N} connections");

    let (status, gzipped) = get_bytes(format!("http://{}/debug/pprof/heap", server.admin)).await;
    assert_eq!(status, 200);
    assert_eq!(&gzipped[..2], &[0x1f, 0x8b], "gzipped profile.proto");
    let (status, svg) = get_bytes(format!("http://{}/debug/pprof/heap?format=svg", server.admin)).await;
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&svg).contains("<svg"));
}

#[tokio::test]
async fn ten_heap_profiles_leave_the_server_the_size_it_was() {
    // Dense sampling, so the profile holds the connections' stacks.
    let server = Process::spawn_with_env(&[], None, &[("_RJEM_MALLOC_CONF", "lg_prof_sample:12")]);
    let _clients = many_ws(server.client, 100, "t").await;
    let svg = |n: usize| {
        let admin = server.admin;
        async move {
            let (status, svg) = get_bytes(format!("http://{admin}/debug/pprof/heap?format=svg")).await;
            let svg = String::from_utf8_lossy(&svg).into_owned();
            assert_eq!(status, 200, "profile {n}: {svg}");
            svg
        }
    };
    let before = rss(&server);
    let first = svg(1).await;
    assert!(first.contains("pushline::"), "the worker named the server's functions");
    let after_one = rss(&server);
    for n in 2..=10 {
        svg(n).await;
    }
    let after_ten = rss(&server);
    let mib = |b: u64| b as f64 / 1_048_576.0;
    eprintln!("RSS {:.1} MiB before, {:.1} after one heap profile, {:.1} after ten", mib(before), mib(after_one), mib(after_ten));
    // Symbolizing loads the binary's DWARF (68 MB for a debug build) in the worker, not here.
    assert!(after_ten < before + 8 * 1_048_576, "RSS {:.1} MiB -> {:.1} MiB over ten heap profiles", mib(before), mib(after_ten));
    assert!(after_ten < after_one + 2 * 1_048_576, "RSS grew from {:.1} MiB after one profile to {:.1} after ten", mib(after_one), mib(after_ten));

}

fn rss(server: &Process) -> u64 {
    pushline_alloc::process::Resident::of(server.child.id()).unwrap().rss
}

#[tokio::test]
async fn memory_an_attack_took_goes_back_after_it_ends() {
    const CLIENTS: usize = 20;
    // Queues big enough to hold what the kernel's socket buffers do not; history, which
    // keeps what it may for clients that come back, within a small budget.
    let server = Process::spawn(&["--queue-max-bytes", "16777216", "--queue-max-messages", "100000", "--history-max-bytes", "4194304"], None);
    let http = reqwest::Client::new();
    let blob = "x".repeat(50_000);
    let flood = |uids: Vec<String>, round: usize| {
        let (http, blob) = (http.clone(), blob.clone());
        let addr = server.client;
        async move {
            let pushes = uids.into_iter().map(|uid| {
                let body = json!({"uids": [uid], "data": {"round": round, "blob": blob}}).to_string();
                http.post(format!("http://{addr}/v1/push")).body(body).send()
            });
            futures_util::future::join_all(pushes).await;
        }
    };
    let fresh = rss(&server);
    let queries: Vec<String> = (0..CLIENTS).map(|i| format!("uid=slow{i}")).collect();
    let clients: Vec<_> = futures_util::future::join_all(queries.iter().map(|q| slow_ws(server.client, q))).await;
    for round in 0..120 {
        flood((0..CLIENTS).map(|i| format!("slow{i}")).collect(), round).await;
    }
    let peak = rss(&server);
    assert!(peak > fresh + (50 << 20), "the attack took memory: {fresh} -> {peak}");
    drop(clients);
    wait_metric(server.admin, r#"pushline_connections{transport="ws"}"#, |v| v == 0.0).await;
    // jemalloc's background thread returns freed pages within its decay time (10 s).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(40);
    loop {
        let now = rss(&server);
        // What stays is history (within its 4 MiB) and the allocator's own: a fifth of
        // the attack's ~80 MB at most.
        if now < fresh + (peak - fresh) / 5 {
            eprintln!("RSS {fresh} fresh, {peak} at the peak of the attack, {now} after it");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "RSS stayed at {now} after the attack (fresh {fresh}, peak {peak})");
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// `--io-threads 3`: three core threads serve the connections, the workers metric adds up
/// every runtime, and a broadcast split over the cores (`--fanout-batch 4`: 30 connections
/// is more than two batches) reaches every client once.
#[tokio::test]
async fn connections_live_on_the_core_threads_and_a_split_broadcast_reaches_all() {
    let server = Process::spawn_with_env(&["--io-threads", "3", "--fanout-batch", "4"], None, &[("TOKIO_WORKER_THREADS", "1")]);
    let pid = server.child.id();
    let names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .map(|task| std::fs::read_to_string(task.path().join("comm")).unwrap_or_default().trim().to_owned())
        .collect();
    let mut cores: Vec<&str> = names.iter().map(String::as_str).filter(|n| n.starts_with("pushline-core-")).collect();
    cores.sort();
    assert_eq!(cores, ["pushline-core-0", "pushline-core-1", "pushline-core-2"], "{names:?}");
    let text = metrics(server.admin).await;
    assert_eq!(metric(&text, "pushline_tokio_workers"), 4.0, "three cores and the accepting runtime's one worker");

    let mut clients = many_ws(server.client, 30, "c").await;
    let (status, reply) = post(server.client, "/v1/broadcast", json!({"data": "to all"})).await;
    assert_eq!((status, reply["delivered"].as_u64()), (200, Some(30)), "{reply}");
    for ws in clients.iter_mut() {
        let msg = next_json(ws).await;
        assert_eq!(msg["data"], "to all", "{msg}");
    }
}

/// A CPU profile whose client hangs up stops then, not at its `seconds`: the next one is
/// not refused as "already running" for the rest of the first one's minute.
#[tokio::test]
async fn a_cpu_profile_ends_when_its_client_hangs_up() {
    use tokio::io::AsyncWriteExt;
    let server = Process::spawn(&[], None);
    let admin = server.admin;
    let mut asking = tokio::net::TcpStream::connect(admin).await.unwrap();
    asking.write_all(b"GET /debug/pprof/profile?seconds=60 HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let running = loop {
        let (status, body) = get_bytes(format!("http://{admin}/debug/pprof/profile?seconds=1")).await;
        if status == 409 {
            break body;
        }
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    };
    assert!(String::from_utf8_lossy(&running).contains("already running"));
    drop(asking);
    let started = std::time::Instant::now();
    loop {
        let (status, body) = get_bytes(format!("http://{admin}/debug/pprof/profile?seconds=1")).await;
        if status == 200 {
            break;
        }
        assert_eq!(status, 409, "{}", String::from_utf8_lossy(&body));
        assert!(started.elapsed() < std::time::Duration::from_secs(20), "the hung-up profile still runs after {:?}", started.elapsed());
    }
}
