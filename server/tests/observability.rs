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
    let server = Process::spawn(&[], None);
    let readers = drain(many_ws(server.client, 50, "c").await);
    let _load = Load::start(server.client);
    let admin = server.admin;

    let first = tokio::spawn(get_bytes(format!("http://{admin}/debug/pprof/profile?seconds=3")));
    // The second asks while the first runs (it takes 3 s; this asks after 0.5 s).
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let (status, body) = get_bytes(format!("http://{admin}/debug/pprof/profile?seconds=1")).await;
    assert_eq!(status, 409, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("already running"));

    let (status, gzipped) = first.await.unwrap();
    assert_eq!(status, 200);
    // Raw addresses and mappings: named here, from the binary on disk, as the tools do.
    let folded = pushline_alloc::symbolize::folded(&gzipped, Kind::Cpu, &mut Default::default()).expect("a gzipped profile.proto");
    assert!(!folded.is_empty(), "the busy server was sampled");
    assert!(folded.iter().any(|l| l.contains(";pushline::")), "server functions in the profile: {:?}", &folded[..folded.len().min(5)]);

    let (status, svg) = get_bytes(format!("http://{admin}/debug/pprof/profile?seconds=2&format=svg")).await;
    assert_eq!(status, 200);
    let svg = String::from_utf8(svg).unwrap();
    assert!(svg.starts_with("<?xml") && svg.contains("<svg"), "an SVG document");
    assert!(svg.contains("pushline::"), "the flame graph names server functions");

    let (status, folded) = get_bytes(format!("http://{admin}/debug/pprof/profile?seconds=1&format=folded")).await;
    assert_eq!(status, 200);
    let folded = String::from_utf8(folded).unwrap();
    assert!(folded.lines().all(|l| l.rsplit_once(' ').is_some_and(|(_, n)| n.parse::<u64>().is_ok())), "folded lines end in a count");
    assert!(folded.contains("pushline::"));

    let (status, body) = get_bytes(format!("http://{admin}/debug/pprof/profile?seconds=0")).await;
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
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
    assert!((300.0..4000.0).contains(&per_connection), "{per_connection} bytes per connection at the connection sites");
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
    assert!(on_connection_path > (N * 300) as i64, "{on_connection_path} live bytes under the connection path for {N} connections");

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
        if now < fresh + (peak - fresh) / 10 {
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
