//! `resume`: N clients on node A of two (on a Redis), subscribed to one topic, while
//! messages are published through node B at a steady rate; A is killed (SIGKILL) halfway
//! and its clients reconnect to B with their cursors. Reports, over every client, the
//! messages lost and received twice (both must be 0), the time from the kill until every
//! client has resumed, and Redis round trips per resume. With `--memory`: one node on the
//! memory registry, killed and started again; every client must be told
//! `recovered: false`, since the history went with the process.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

use crate::client;
use crate::driver::{self, RedisProcess, ServerProcess};
use crate::report::Row;
use crate::Common;

const TOPIC: &str = "bench";
const HISTORY: &str = r#"pushline_redis_command_seconds_count{command="history"}"#;

pub struct Settings {
    pub connections: usize,
    /// Messages per second.
    pub rate: u64,
    pub seconds: u64,
    pub memory: bool,
}

/// What one client saw, once it had the last message.
struct Report {
    received: HashSet<u64>,
    duplicates: usize,
    gaps: usize,
    /// When its `resumed` notice arrived, and what it said.
    resumed: Option<(Instant, bool)>,
}

/// The positions a client holds, as an application keeps them.
#[derive(Default)]
struct Cursor {
    since: String,
    positions: Vec<(String, String, u64)>,
}

impl Cursor {
    fn text(&self) -> String {
        let mut out = format!("s{}", self.since);
        for (stream, epoch, offset) in &self.positions {
            out.push_str(&format!(",{stream}:{epoch}:{offset}"));
        }
        out
    }
}

async fn client(i: usize, first: SocketAddr, then: SocketAddr, source: IpAddr, done: mpsc::UnboundedSender<Report>) {
    let query = format!("uid=r{i}&topics={TOPIC}");
    let mut cursor = Cursor::default();
    let mut report = Report { received: HashSet::new(), duplicates: 0, gaps: 0, resumed: None };
    let mut server = first;
    let mut resuming = false;
    loop {
        let full = if resuming { format!("{query}&cursor={}", cursor.text()) } else { query.clone() };
        let opened = match client::open(server, source, &full, None).await {
            Ok(opened) => opened,
            Err(e) => {
                // Refused (rate, or the node restarting): come back as told, or shortly.
                let wait = e.get_ref().and_then(|r| r.downcast_ref::<client::Refused>()).and_then(|r| r.retry_after);
                tokio::time::sleep(wait.unwrap_or(Duration::from_millis(50))).await;
                continue;
            }
        };
        if !resuming {
            let welcome: serde_json::Value = serde_json::from_slice(&opened.welcome).unwrap_or_default();
            cursor.since = welcome["since"].as_str().unwrap_or_default().to_owned();
        }
        let (mut stream, mut buf) = (opened.stream, opened.rest);
        let ended = loop {
            while let Some((_, payload, used)) = client::frame_payload(&buf) {
                let msg: serde_json::Value = serde_json::from_slice(&buf[payload]).unwrap_or_default();
                buf.drain(..used);
                match msg["type"].as_str() {
                    Some("resumed") => {
                        cursor.since = msg["since"].as_str().unwrap_or_default().to_owned();
                        report.resumed = Some((Instant::now(), msg["recovered"] == true));
                    }
                    Some("message") => {
                        if msg["data"]["end"] == true {
                            let _ = done.send(report);
                            return;
                        }
                        let (Some(stream_key), Some(epoch), Some(offset)) = (msg["stream"].as_str(), msg["epoch"].as_str(), msg["offset"].as_u64()) else {
                            continue;
                        };
                        match cursor.positions.iter_mut().find(|(s, _, _)| s == stream_key) {
                            Some(p) => {
                                if p.1 == epoch && offset <= p.2 {
                                    report.duplicates += 1;
                                } else if p.1 == epoch && offset > p.2 + 1 {
                                    report.gaps += 1;
                                }
                                *p = (stream_key.to_owned(), epoch.to_owned(), offset);
                            }
                            None => cursor.positions.push((stream_key.to_owned(), epoch.to_owned(), offset)),
                        }
                        if let Some(n) = msg["data"]["n"].as_u64() {
                            if !report.received.insert(n) {
                                report.duplicates += 1;
                            }
                        }
                    }
                    _ => {}
                }
            }
            match stream.read_buf(&mut buf).await {
                Ok(0) | Err(_) => break true,
                Ok(_) => {}
            }
        };
        if ended {
            server = then;
            resuming = true;
        }
    }
}

async fn publish(addr: SocketAddr, body: &str) -> bool {
    driver::http(addr, "POST", "/v1/publish", body).await.is_ok_and(|reply| reply.contains("\"id\""))
}

pub async fn run(common: &Common, settings: Settings) -> Result<Vec<Row>, String> {
    let n = settings.connections;
    let total = settings.rate * settings.seconds;
    let mut args = vec![format!("--history-size={}", total + 100), "--max-topics-per-connection=4".to_string()];
    let redis = if settings.memory { None } else { Some(RedisProcess::start()?) };
    if let Some(redis) = &redis {
        args.extend(["--registry".into(), "redis".into(), "--redis-url".into(), redis.url()]);
    }
    args.extend(common.server_args.iter().cloned());
    let port = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?.local_addr().map_err(|e| e.to_string())?.port();
    let with_port = |args: &[String]| {
        let mut a = args.to_vec();
        a.push(format!("--listen=127.0.0.1:{port}"));
        a
    };
    let mut a = ServerProcess::start(&common.server_bin, &with_port(&args))?;
    let b = if settings.memory { None } else { Some(ServerProcess::start(&common.server_bin, &args)?) };
    let survivor = survivor_addr(&a, &b);

    let (done, mut reports) = mpsc::unbounded_channel();
    for i in 0..n {
        let done = done.clone();
        let source = client::source_ip(i, common.spread);
        let first = a.client;
        tokio::spawn(client(i, first, survivor, source, done));
        if i % common.parallel == common.parallel - 1 {
            a.wait_metric("pushline_connections{transport=\"ws\"}", (i + 1) as f64, Duration::from_secs(60)).await?;
        }
    }
    a.wait_metric("pushline_connections{transport=\"ws\"}", n as f64, Duration::from_secs(60)).await?;
    if let Some(b) = &b {
        // Until node A has told Redis it listens to the topic, nothing of it is kept.
        let probe = format!(r#"{{"topic":"{TOPIC}","data":{{"probe":true}}}}"#);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !driver::http(b.client, "POST", "/v1/publish", &probe).await.unwrap_or_default().contains("\"stored\":1") {
            if Instant::now() > deadline {
                return Err("the topic was never kept".into());
            }
        }
    }
    let history_before = match &b {
        Some(b) => b.metric(HISTORY).await,
        None => 0.0,
    };

    let mut tick = tokio::time::interval(Duration::from_secs(1) / settings.rate.max(1) as u32);
    let mut killed_at = None;
    let mut published = 0u64;
    let mut n_next = 0u64;
    while n_next < total {
        tick.tick().await;
        if n_next == total / 2 && killed_at.is_none() {
            a.kill();
            killed_at = Some(Instant::now());
            if settings.memory {
                a = ServerProcess::start(&common.server_bin, &with_port(&args))?;
            }
        }
        if publish(survivor_addr(&a, &b), &format!(r#"{{"topic":"{TOPIC}","data":{{"n":{n_next}}}}}"#)).await {
            published += 1;
            n_next += 1;
        }
    }
    let killed_at = killed_at.ok_or("never killed")?;
    let target = survivor_addr(&a, &b);
    let mut finished = Vec::with_capacity(n);
    let deadline = Instant::now() + Duration::from_secs(120);
    while finished.len() < n {
        publish(target, &format!(r#"{{"topic":"{TOPIC}","data":{{"end":true}}}}"#)).await;
        match tokio::time::timeout(Duration::from_secs(1), reports.recv()).await {
            Ok(Some(report)) => finished.push(report),
            Ok(None) => break,
            Err(_) if Instant::now() > deadline => return Err(format!("only {} of {n} clients got the last message", finished.len())),
            Err(_) => {}
        }
        while let Ok(report) = reports.try_recv() {
            finished.push(report);
        }
    }
    let server = b.as_ref().unwrap_or(&a);
    let history_reads = server.metric(HISTORY).await - history_before;
    let lost: u64 = finished.iter().map(|r| published - r.received.len() as u64).sum();
    let duplicates: usize = finished.iter().map(|r| r.duplicates).sum();
    let gaps: usize = finished.iter().map(|r| r.gaps).sum();
    let resumed: Vec<(Instant, bool)> = finished.iter().filter_map(|r| r.resumed).collect();
    let last_resumed = resumed.iter().map(|(at, _)| *at).max().map_or(0.0, |at| at.duration_since(killed_at).as_secs_f64() * 1e3);
    let not_recovered = resumed.iter().filter(|(_, recovered)| !recovered).count();
    let scenario = if settings.memory { "resume_memory" } else { "resume" };
    Ok(vec![
        Row::new(scenario, "connections", n as f64, "count"),
        Row::new(scenario, "published", published as f64, "messages"),
        Row::new(scenario, "resumed", resumed.len() as f64, "clients"),
        Row::new(scenario, "not_recovered", not_recovered as f64, "clients"),
        Row::new(scenario, "lost", lost as f64, "messages"),
        Row::new(scenario, "duplicated", duplicates as f64, "messages"),
        Row::new(scenario, "gaps_seen", gaps as f64, "count"),
        Row::new(scenario, "kill_to_all_resumed", last_resumed, "ms"),
        Row::new(scenario, "redis_history_round_trips_per_resume", history_reads / resumed.len().max(1) as f64, "round trips"),
    ])
}

fn survivor_addr(a: &ServerProcess, b: &Option<ServerProcess>) -> SocketAddr {
    b.as_ref().map_or(a.client, |b| b.client)
}
