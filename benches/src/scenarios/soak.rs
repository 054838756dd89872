//! `soak`: a long run of everything at once, to see that nothing grows and nothing is
//! lost without being counted. Two nodes share a port (SO_REUSEPORT) on a Redis; N
//! clients connect, 1% of them reconnect every second, pushes arrive at a steady rate
//! and a broadcast every 10 s, 1% of the clients never read, and Redis restarts empty
//! halfway. Every `sample` seconds it records each node's RSS and always-on profiler
//! memory (its allocation site), Redis memory, connections and drops by reason (the CSV
//! time series, `--csv`), and at the end it compares the last sample with the first after
//! warm-up and counts panics in the servers' logs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::task::JoinHandle;

use crate::client;
use crate::driver::{http, Nodes};
use crate::report::Row;
use crate::Common;

/// Drop reasons sampled (the label values of `pushline_messages_dropped_total`).
const DROPS: [&str; 8] = [
    "queue_full",
    "slow_consumer",
    "connection_closed",
    "node_over_budget",
    "registry_unavailable",
    "node_unreachable",
    "bad_relay",
    "relay_backlog",
];

pub struct Settings {
    pub connections: usize,
    pub minutes: u64,
    /// Pushes per second, to random uids.
    pub rate: u64,
    pub sample: Duration,
    pub csv: Option<std::path::PathBuf>,
}

/// One client: a task that reads and discards what it is sent (or, for a slow client,
/// holds the socket and never reads).
fn client_task(addr: std::net::SocketAddr, uid: usize, slow: bool, spread: u8, received: Arc<AtomicU64>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let source = client::source_ip(uid, spread);
        let buffer = slow.then_some(4096);
        let Ok(mut stream) = client::connect_with(addr, source, &format!("s{uid}"), buffer).await else { return };
        if slow {
            std::future::pending::<()>().await;
        }
        let mut buf = Vec::with_capacity(4096);
        loop {
            if stream.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                return;
            }
            while let Some((opcode, len)) = client::frame(&buf) {
                if opcode == 1 {
                    received.fetch_add(1, Ordering::Relaxed);
                }
                buf.drain(..len);
            }
        }
    })
}

/// What one sample saw.
struct Sample {
    at_s: f64,
    rss: Vec<u64>,
    /// Live bytes of the `profiler` allocation site, per node.
    profiler: Vec<f64>,
    redis_bytes: f64,
    connections: f64,
    drops: Vec<f64>,
}

async fn sample(nodes: &Nodes, started: Instant) -> Sample {
    let mut drops = Vec::new();
    for reason in DROPS {
        drops.push(nodes.metric(&format!(r#"pushline_messages_dropped_total{{reason="{reason}"}}"#)).await);
    }
    let redis_bytes = match &nodes.redis {
        Some(redis) => redis.info().await.ok().and_then(|i| i.get("used_memory_dataset").copied()).unwrap_or(0.0),
        None => 0.0,
    };
    let mut profiler = Vec::new();
    for server in &nodes.servers {
        profiler.push(server.metric(r#"pushline_alloc_site_live_bytes{site="profiler"}"#).await);
    }
    Sample {
        at_s: started.elapsed().as_secs_f64(),
        rss: nodes.servers.iter().map(|s| s.rss_bytes()).collect(),
        profiler,
        redis_bytes,
        connections: nodes.metric(r#"pushline_connections{transport="ws"}"#).await,
        drops,
    }
}

pub async fn run(common: &Common, settings: Settings) -> Result<Vec<Row>, String> {
    let Settings { connections, minutes, rate, sample: every, csv } = settings;
    let mut nodes = Nodes::start(common, 2, true)?;
    let addr = nodes.servers[0].client;
    let received = Arc::new(AtomicU64::new(0));
    let slow = |uid: usize| uid % 100 == 0;
    let mut clients: Vec<JoinHandle<()>> =
        (0..connections).map(|uid| client_task(addr, uid, slow(uid), common.spread, received.clone())).collect();
    nodes.wait_metric(r#"pushline_connections{transport="ws"}"#, connections as f64 * 0.99, Duration::from_secs(120)).await?;

    // Pushes to random uids, and a broadcast every 10 s; every answer is counted.
    let answers: Arc<[AtomicU64; 3]> = Arc::new([AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)]);
    let publishing = {
        let answers = answers.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(Duration::from_micros(1_000_000 / rate.max(1)));
            let mut n: u64 = 0;
            loop {
                ticks.tick().await;
                n += 1;
                let (path, body) = if n % (rate.max(1) * 10) == 0 {
                    ("/v1/broadcast", format!(r#"{{"data":{{"n":{n}}}}}"#))
                } else {
                    let uid = (n.wrapping_mul(2_654_435_761)) as usize % connections;
                    ("/v1/push", format!(r#"{{"uids":["s{uid}"],"data":{{"n":{n},"pad":"{}"}}}}"#, "x".repeat(200)))
                };
                let answers = answers.clone();
                tokio::spawn(async move {
                    let slot = match http(addr, "POST", path, &body).await {
                        Ok(reply) if reply.contains(r#""id""#) && !reply.contains(r#""error""#) => 0,
                        Ok(_) => 1,
                        Err(_) => 2,
                    };
                    answers[slot].fetch_add(1, Ordering::Relaxed);
                });
            }
        })
    };

    let started = Instant::now();
    let total = Duration::from_secs(minutes * 60);
    let warm_up = (total / 10).max(every);
    let mut samples: Vec<Sample> = vec![sample(&nodes, started).await];
    let mut next_sample = every;
    let mut restarted = false;
    let mut churn = tokio::time::interval(Duration::from_secs(1));
    let mut turn = 0usize;
    while started.elapsed() < total {
        churn.tick().await;
        // 1% of the clients go away and come back.
        for k in 0..connections.div_ceil(100) {
            let uid = (turn * 7919 + k * 104_729) % connections;
            clients[uid].abort();
            clients[uid] = client_task(addr, uid, slow(uid), common.spread, received.clone());
        }
        turn += 1;
        if !restarted && started.elapsed() >= total / 2 {
            if let Some(redis) = nodes.redis.as_mut() {
                eprintln!("soak: restarting Redis empty at {:.0} s", started.elapsed().as_secs_f64());
                redis.restart()?;
            }
            restarted = true;
        }
        if started.elapsed() >= next_sample {
            let s = sample(&nodes, started).await;
            eprintln!(
                "soak {:>6.0} s: rss {:?} MB, profiler {:?} KB, redis {:.1} MB, {} connections, drops {:?}",
                s.at_s,
                s.rss.iter().map(|r| r / (1 << 20)).collect::<Vec<_>>(),
                s.profiler.iter().map(|p| (p / 1024.0) as u64).collect::<Vec<_>>(),
                s.redis_bytes / (1 << 20) as f64,
                s.connections,
                s.drops
            );
            samples.push(s);
            next_sample += every;
        }
    }
    publishing.abort();
    let last = sample(&nodes, started).await;
    samples.push(last);

    if let Some(path) = &csv {
        let mut text = format!("seconds,{},{},redis_dataset_bytes,connections,{}\n",
            (0..nodes.servers.len()).map(|i| format!("rss_node{i}")).collect::<Vec<_>>().join(","),
            (0..nodes.servers.len()).map(|i| format!("profiler_node{i}")).collect::<Vec<_>>().join(","),
            DROPS.map(|d| format!("dropped_{d}")).join(","));
        for s in &samples {
            let rss: Vec<String> = s.rss.iter().map(u64::to_string).collect();
            let profiler: Vec<String> = s.profiler.iter().map(|p| format!("{p}")).collect();
            let drops: Vec<String> = s.drops.iter().map(|d| format!("{d}")).collect();
            text.push_str(&format!("{:.0},{},{},{},{},{}\n", s.at_s, rss.join(","), profiler.join(","), s.redis_bytes, s.connections, drops.join(",")));
        }
        std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }

    let after_warm_up = samples.iter().find(|s| s.at_s >= warm_up.as_secs_f64()).unwrap_or(&samples[0]);
    let last = samples.last().unwrap_or(after_warm_up);
    let rss_of = |s: &Sample| s.rss.iter().sum::<u64>() as f64;
    let growth = |a: f64, b: f64| if a > 0.0 { (b - a) / a * 100.0 } else { 0.0 };
    let panics: usize = nodes.servers.iter().map(|s| s.panics.load(Ordering::Relaxed)).sum();
    let mut rows = vec![
        Row::new("soak", "connections", connections as f64, "count"),
        Row::new("soak", "minutes", minutes as f64, "min"),
        Row::new("soak", "rss_after_warm_up", rss_of(after_warm_up), "bytes"),
        Row::new("soak", "rss_at_end", rss_of(last), "bytes"),
        Row::new("soak", "rss_growth_after_warm_up", growth(rss_of(after_warm_up), rss_of(last)), "%"),
        Row::new("soak", "profiler_site_largest_node_at_end", last.profiler.iter().copied().fold(0.0, f64::max), "bytes"),
        Row::new("soak", "profiler_site_largest_node_ever", samples.iter().flat_map(|s| s.profiler.iter().copied()).fold(0.0, f64::max), "bytes"),
        Row::new("soak", "redis_dataset_after_warm_up", after_warm_up.redis_bytes, "bytes"),
        Row::new("soak", "redis_dataset_at_end", last.redis_bytes, "bytes"),
        Row::new("soak", "publishes_answered_200", answers[0].load(Ordering::Relaxed) as f64, "count"),
        Row::new("soak", "publishes_answered_other", answers[1].load(Ordering::Relaxed) as f64, "count"),
        Row::new("soak", "publishes_failed", answers[2].load(Ordering::Relaxed) as f64, "count"),
        Row::new("soak", "messages_received", received.load(Ordering::Relaxed) as f64, "count"),
        Row::new("soak", "server_panics", panics as f64, "count"),
    ];
    for (reason, value) in DROPS.iter().zip(&last.drops) {
        rows.push(Row::new("soak", reason, *value, "dropped"));
    }
    Ok(rows)
}
