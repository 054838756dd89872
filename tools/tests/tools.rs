//! Each `pushline-tools` command against a real server with real connections.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_audit_refuses_what_is_not_pushline() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pushline-tools"))
        .args(["memory-audit", &std::process::id().to_string()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a Pushline server"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flamegraph_of_a_busy_server_from_its_pid() {
    let server = Server::start(&[]);
    let readers = drain(open(server.client, 50, "f").await);
    let busy = load(server.client);
    let dir = std::env::temp_dir().join(format!("pushline-flame-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (svg, folded) = (dir.join("cpu.svg"), dir.join("cpu.folded"));
    tools(&["flamegraph", &server.pid().to_string(), "--seconds", "2", "-o", svg.to_str().unwrap(), "--folded", folded.to_str().unwrap()]);
    // The always-on profiler's window, by time, and its difference from a window (here
    // the same minute: the server is younger than any other).
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs().to_string();
    let window = dir.join("window.svg");
    tools(&["flamegraph", &server.pid().to_string(), "--from", &now, "--to", &now, "-o", window.to_str().unwrap()]);
    assert!(std::fs::read_to_string(&window).unwrap().contains("pushline::"), "the kept minute names server functions");
    let changed = dir.join("changed.svg");
    tools(&["flamegraph", &server.pid().to_string(), "--from", &now, "--to", &now, "--base-from", &now, "--base-to", &now, "-o", changed.to_str().unwrap()]);
    assert!(std::fs::read_to_string(&changed).unwrap().contains("what changed"), "a differential flame graph");
    busy.abort();
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.contains("<svg") && text.contains("pushline::"), "an SVG naming server functions");
    assert!(std::fs::read_to_string(&folded).unwrap().contains("pushline::"));

    // A diff of the profile with itself renders too.
    let diff = dir.join("diff.svg");
    tools(&["flamegraph", "--diff", folded.to_str().unwrap(), folded.to_str().unwrap(), "-o", diff.to_str().unwrap()]);
    assert!(std::fs::read_to_string(&diff).unwrap().contains("<svg"));
    std::fs::remove_dir_all(&dir).unwrap();
    drop(readers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heap_diff_puts_the_connection_sites_on_top() {
    const N: usize = 1000;
    let server = Server::start(&[("_RJEM_MALLOC_CONF", "lg_prof_sample:12")]);
    let dir = std::env::temp_dir().join(format!("pushline-heap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (before, after) = (dir.join("before"), dir.join("after"));
    let admin = server.admin.to_string();
    // The first heap profiles load the symbolizer's tables into the admin site; two
    // snapshots before `before` keep most of that out of the diff.
    for _ in 0..2 {
        tools(&["heap", &admin, "-o", dir.join("warm").to_str().unwrap()]);
    }
    tools(&["heap", &admin, "-o", before.to_str().unwrap()]);
    let clients = open(server.client, N, "h").await;
    let written = tools(&["heap", &server.pid().to_string(), "-o", after.to_str().unwrap()]);
    assert!(written.contains("after.svg"), "{written}");
    assert!(std::fs::read_to_string(dir.join("after.svg")).unwrap().contains("<svg"));

    let diff = tools(&["heap", "--diff", before.to_str().unwrap(), after.to_str().unwrap(), "--top", "40"]);
    // The admin site may grow too: each heap profile's symbolizer keeps its tables.
    let first_site = diff.lines().skip(1).take_while(|l| l.starts_with(' ')).find(|l| !l.contains("admin")).unwrap_or_default();
    assert!(first_site.contains("connection_task") || first_site.contains("sessions"), "{diff}");
    let stacks: Vec<&str> = diff.lines().skip_while(|l| !l.starts_with("grew, by stack")).skip(1).collect();
    let connection_path = ["pushline::gateway::", "pushline::conn::", "pushline::hub::", "pushline::listener::"];
    assert!(stacks.iter().any(|l| connection_path.iter().any(|p| l.contains(p))), "{diff}");
    std::fs::remove_dir_all(&dir).unwrap();
    drop(clients);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_and_gdb_on_a_core_count_the_connections() {
    const N: usize = 300;
    require_root();
    let server = Server::start(&[]);
    let clients = open(server.client, N, "o").await;
    let objects = tools(&["objects", &server.pid().to_string()]);
    assert!(objects.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["connections", "300"]), "{objects}");

    let dir = std::env::temp_dir().join(format!("pushline-core-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let prefix = dir.join("core");
    let gcore = std::process::Command::new("gcore").args(["-o", prefix.to_str().unwrap(), &server.pid().to_string()]).output().expect("gcore (apt-get install gdb)");
    // gcore says it saved the core and exits 0 even when writing it out failed after
    // that (a full disk, or gdb killed): its own words and the file's size tell which.
    let said = format!("{}{}", String::from_utf8_lossy(&gcore.stdout), String::from_utf8_lossy(&gcore.stderr));
    let core = format!("{}.{}", prefix.display(), server.pid());
    let size = std::fs::metadata(&core).map(|m| m.len()).unwrap_or(0);
    assert!(gcore.status.success() && said.contains("Saved corefile") && size > 0, "gcore wrote {size} bytes: {said}");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/gdb/pushline.py");
    let gdb = std::process::Command::new("gdb")
        .args(["-batch", "-ex", &format!("source {script}"), "-ex", "pushline-sites", bin("pushline").to_str().unwrap(), &core])
        .output()
        .expect("gdb (apt-get install gdb)");
    let out = String::from_utf8_lossy(&gdb.stdout);
    let row = out.lines().find(|l| l.starts_with("sessions")).unwrap_or_else(|| {
        let free = std::process::Command::new("df").arg(&dir).output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
        panic!("no site table in gdb output (core of {size} bytes; gcore said: {said}; {free}):\n{out}\n{}", String::from_utf8_lossy(&gdb.stderr))
    });
    let live_allocs: i64 = row.split_whitespace().nth(2).unwrap().parse().unwrap();
    assert!(live_allocs >= N as i64, "each connection holds its record: {row}");
    std::fs::remove_dir_all(&dir).unwrap();
    drop(clients);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_audit_watch_follows_churn_line_by_line() {
    use std::io::BufRead;
    require_root();
    let server = Server::start(&[]);
    let first = open(server.client, 100, "w").await;
    server.wait_connections(100).await;
    let mut watch = std::process::Command::new(env!("CARGO_BIN_EXE_pushline-tools"))
        .args(["memory-audit", &server.pid().to_string(), "--watch", "1", "--count", "60"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(watch.stdout.take().unwrap()).lines().map(|l| l.unwrap());
    let header = lines.next().unwrap();
    assert!(header.contains("connections") && header.contains("top growing site"), "{header}");
    let columns = |line: &str| line.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
    // The lines up to the first that shows `n` connections (a line may catch the clients
    // midway, so what grew shows on whichever line saw them arrive).
    let mut until = |n: u64| {
        let mut seen = Vec::new();
        for line in lines.by_ref() {
            let done = columns(&line)[1].parse::<u64>().ok() == Some(n);
            seen.push(line);
            if done {
                return seen;
            }
        }
        panic!("--watch never showed {n} connections: {seen:?}")
    };

    let line = until(100).pop().unwrap();
    let user: f64 = columns(&line)[2].parse().unwrap();
    assert!(user > 300.0, "user bytes per connection: {line}");

    let more = open(server.client, 300, "x").await;
    server.wait_connections(400).await;
    let lines = until(400);
    assert!(lines.iter().any(|l| l.contains("connection_task +") || l.contains("sessions +")), "the connection sites grew: {lines:?}");

    drop(more);
    server.wait_connections(100).await;
    until(100);
    watch.kill().unwrap();
    let _ = watch.wait();
    drop(first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flamegraph_of_an_idle_server_still_writes_an_svg_and_says_so() {
    let server = Server::start(&[]);
    let svg = std::env::temp_dir().join(format!("pushline-idle-{}.svg", std::process::id()));
    let pid = server.pid().to_string();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pushline-tools"))
        .args(["flamegraph", &pid, "--seconds", "1", "-o", svg.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "exit 3: no samples; {}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.contains("<svg") && text.contains("no samples in 1 s"), "{text}");
    std::fs::remove_file(&svg).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_live_query_answers_and_bad_ones_are_named() {
    let server = Server::start(&[]);
    let plain = open(server.client, 20, "q").await;
    let mut news = Vec::new();
    for i in 0..3 {
        let url = format!("ws://{}/ws?uid=reader{i}&topics=news,sport", server.client);
        news.push(tokio_tungstenite::connect_async(url).await.unwrap().0);
    }
    let sport_only = tokio_tungstenite::connect_async(format!("ws://{}/ws?uid=fan&topics=sport", server.client)).await.unwrap().0;
    server.wait_connections(24).await;
    let pid = server.pid().to_string();
    let query = |args: &[&str]| -> serde_json::Value {
        let mut all = vec!["query", pid.as_str()];
        all.extend_from_slice(args);
        serde_json::from_str(&tools(&all)).unwrap()
    };

    let list = query(&[]);
    let names: Vec<&str> = list.as_array().unwrap().iter().map(|q| q["query"].as_str().unwrap()).collect();
    assert_eq!(names, ["connections_of", "queued_above", "idle_longer_than", "top_topics", "site_delta"]);

    let mine = query(&["connections_of", "uid=q7"]);
    assert_eq!((mine["rows"].as_u64(), mine["connections"][0]["uid"].as_str()), (Some(1), Some("q7")));
    assert_eq!(query(&["connections_of", "uid=q7", "min_queue=1"])["rows"], 0, "an idle connection has nothing queued");
    assert_eq!(query(&["queued_above", "min_queue=0"])["rows"], 0);
    let idle = query(&["idle_longer_than", "seconds=0", "limit=5"]);
    assert_eq!(idle["rows"], 5, "{idle}");
    assert_eq!(query(&["idle_longer_than", "seconds=3600"])["rows"], 0);
    let top = query(&["top_topics", "limit=1"]);
    assert_eq!((top["topics"][0]["topic"].as_str(), top["topics"][0]["subscribers"].as_u64()), (Some("sport"), Some(4)), "{top}");
    let delta = query(&["site_delta", "seconds=1"]);
    let sites: Vec<&str> = delta["sites"].as_array().unwrap().iter().map(|s| s["site"].as_str().unwrap()).collect();
    assert!(sites.contains(&"connection_task") && delta["sites"][0]["live_bytes"].is_i64(), "{delta}");

    let refused = |path: &str| {
        let admin = server.admin;
        let path = path.to_owned();
        async move {
            let reply = raw_get(admin, &path).await;
            assert!(reply.starts_with("HTTP/1.1 400"), "{path}: {reply}");
            reply
        }
    };
    assert!(refused("/debug/query/drop_tables").await.contains("no query `drop_tables`; the queries are connections_of"));
    assert!(refused("/debug/query/top_topics?limit=lots").await.contains("parameter `limit`=lots: expected a whole number"));
    assert!(refused("/debug/query/top_topics?eval=1").await.contains("takes no parameter `eval`"));
    assert!(refused("/debug/query/queued_above").await.contains("needs parameter `min_queue`"));
    drop((plain, news, sport_only));
}

/// The raw HTTP answer (status line, headers, body) to a GET.
async fn raw_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).await.unwrap();
    reply
}
