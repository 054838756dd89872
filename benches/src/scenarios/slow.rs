//! `slow`: a share of clients stop reading while 16 KB broadcasts keep coming. The server's
//! memory must stay within its queue budget, healthy clients' latency must not suffer,
//! and every message the slow ones miss must be counted as dropped.

use std::time::{Duration, Instant};

use crate::client;
use crate::driver::{http, ServerProcess};
use crate::report::Row;
use crate::Common;

pub async fn run(common: &Common, connections: usize, slow_percent: usize, rounds: usize) -> Result<Vec<Row>, String> {
    let server = ServerProcess::start(&common.server_bin, &common.server_args)?;
    let slow_count = connections * slow_percent / 100;
    let healthy = connections - slow_count;
    let streams = super::open_connections(server.client, healthy, common.parallel, common.spread, "s").await?;
    // The slow clients: a 4 KiB receive window, and never read again after the welcome.
    let mut slow = Vec::with_capacity(slow_count);
    for i in 0..slow_count {
        let source = client::source_ip(i, common.spread);
        slow.push(client::connect_with(server.client, source, &format!("slow{i}"), Some(4096)).await.map_err(|e| e.to_string())?);
    }
    server.wait_metric(r#"pushline_connections{transport="ws"}"#, connections as f64, Duration::from_secs(60)).await?;
    let mut rx = super::arrivals(streams);
    let rss0 = server.rss_bytes();
    let body = format!(r#"{{"data":"{}"}}"#, "x".repeat(16_000));
    let (mut latencies, mut max_queued) = (Vec::with_capacity(healthy * rounds), 0f64);
    // Each slow client may hold --queue-max-bytes in its queue (the server's default unless
    // passed with --server-arg=--queue-max-bytes=N).
    let per_queue = common
        .server_args
        .iter()
        .find_map(|a| a.strip_prefix("--queue-max-bytes=").and_then(|n| n.parse::<f64>().ok()))
        .unwrap_or(262_144.0);
    let queue_budget = slow_count as f64 * per_queue;
    for _ in 0..rounds {
        let start = Instant::now();
        http(server.client, "POST", "/v1/broadcast", &body).await?;
        for _ in 0..healthy {
            let at = tokio::time::timeout(Duration::from_secs(30), rx.recv()).await.map_err(|_| "healthy clients stalled")?.ok_or("clients gone")?;
            latencies.push(at.saturating_duration_since(start));
        }
        max_queued = max_queued.max(server.metric("pushline_outbound_queued_bytes").await);
    }
    let rss1 = server.rss_bytes();
    let dropped = server.metric(r#"pushline_messages_dropped_total{reason="queue_full"}"#).await
        + server.metric(r#"pushline_messages_dropped_total{reason="slow_consumer"}"#).await;
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)].as_secs_f64() * 1e3;
    drop(slow);
    Ok(vec![
        Row::new("slow", "connections", connections as f64, "count"),
        Row::new("slow", "slow_clients", slow_count as f64, "count"),
        Row::new("slow", "rounds", rounds as f64, "count"),
        Row::new("slow", "healthy_latency_p50", pct(0.50), "ms"),
        Row::new("slow", "healthy_latency_p99", pct(0.99), "ms"),
        Row::new("slow", "max_outbound_queued", max_queued, "bytes"),
        Row::new("slow", "queue_budget_of_slow_clients", queue_budget, "bytes"),
        Row::new("slow", "server_rss_growth", rss1 as f64 - rss0 as f64, "bytes"),
        Row::new("slow", "dropped_for_slow_clients", dropped, "count"),
    ])
}
