//! `fanout`: N connections, one 100-byte broadcast at a time; how long until the last
//! client has it, and what each delivery costs the server in CPU.

use std::time::{Duration, Instant};

use crate::driver::{http, ServerProcess};
use crate::report::Row;
use crate::Common;

pub async fn run(common: &Common, connections: usize, rounds: usize) -> Result<Vec<Row>, String> {
    let server = ServerProcess::start(&common.server_bin, &common.server_args)?;
    let streams = super::open_connections(server.client, connections, common.parallel, common.spread, "fan").await?;
    server.wait_metric(r#"pushline_connections{transport="ws"}"#, connections as f64, Duration::from_secs(60)).await?;

    let mut rx = super::arrivals(streams);

    // 100 bytes of JSON data, as in the talk.
    let body = format!(r#"{{"data":"{}"}}"#, "x".repeat(98));
    let mut last_ms = Vec::new();
    let mut all = Vec::with_capacity(connections * rounds);
    let cpu_before = server.cpu_time();
    for _ in 0..rounds {
        let start = Instant::now();
        let reply = http(server.client, "POST", "/v1/broadcast", &body).await?;
        if !reply.contains(&format!(r#""delivered":{connections}"#)) {
            return Err(format!("broadcast reached fewer than {connections}: {reply}"));
        }
        let mut latencies = Vec::with_capacity(connections);
        while latencies.len() < connections {
            let at = tokio::time::timeout(Duration::from_secs(30), rx.recv())
                .await
                .map_err(|_| format!("only {} of {connections} clients got the broadcast", latencies.len()))?
                .ok_or("clients gone")?;
            latencies.push(at.saturating_duration_since(start));
        }
        latencies.sort();
        last_ms.push(latencies[connections - 1].as_secs_f64() * 1e3);
        all.extend(latencies);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let cpu = server.cpu_time().since(cpu_before);
    all.sort();
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)].as_secs_f64() * 1e3;
    last_ms.sort_by(f64::total_cmp);
    let median_last = last_ms[last_ms.len() / 2];
    Ok(vec![
        Row::new("fanout", "connections", connections as f64, "count"),
        Row::new("fanout", "rounds", rounds as f64, "count"),
        Row::new("fanout", "time_to_last_client_median", median_last, "ms"),
        Row::new("fanout", "delivery_latency_p50", pct(0.50), "ms"),
        Row::new("fanout", "delivery_latency_p99", pct(0.99), "ms"),
        Row::new("fanout", "delivery_latency_max", pct(1.0), "ms"),
        Row::new("fanout", "server_cpu_per_delivery", cpu.total().as_secs_f64() * 1e6 / (connections * rounds) as f64, "us"),
        Row::new("fanout", "server_user_cpu_per_delivery", cpu.user.as_secs_f64() * 1e6 / (connections * rounds) as f64, "us"),
    ])
}
