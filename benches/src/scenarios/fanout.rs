//! `fanout`: N connections, one 100-byte broadcast at a time; how long until the last
//! client has it, and what each delivery costs the server in CPU, user and kernel apart.
//! Then the same against the floor (`floor/`), and Pushline's figures as ratios to it.

use std::time::{Duration, Instant};

use crate::driver::{http, ServerProcess};
use crate::report::Row;
use crate::Common;

/// One server's figures.
struct Figures {
    last_client_ms: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    cpu_us: f64,
    user_us: f64,
    kernel_us: f64,
}

/// `pushline`: wait until the server has registered every client (it welcomes them first);
/// the floor has nothing to register.
async fn measure(server: &ServerProcess, common: &Common, connections: usize, rounds: usize, pushline: bool) -> Result<Figures, String> {
    let streams = super::open_connections(server.client, connections, common.parallel, common.spread, "fan").await?;
    if pushline {
        server.wait_metric(r#"pushline_connections{transport="ws"}"#, connections as f64, Duration::from_secs(60)).await?;
    }
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
    let deliveries = (connections * rounds) as f64;
    Ok(Figures {
        last_client_ms: last_ms[last_ms.len() / 2],
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        max_ms: pct(1.0),
        cpu_us: cpu.total().as_secs_f64() * 1e6 / deliveries,
        user_us: cpu.user.as_secs_f64() * 1e6 / deliveries,
        kernel_us: cpu.system.as_secs_f64() * 1e6 / deliveries,
    })
}

pub async fn run(common: &Common, connections: usize, rounds: usize, floor: bool, floor_uring: bool) -> Result<Vec<Row>, String> {
    let pushline = measure(&ServerProcess::start(&common.server_bin, &common.server_args)?, common, connections, rounds, true).await?;
    let mut rows = vec![
        Row::new("fanout", "connections", connections as f64, "count"),
        Row::new("fanout", "rounds", rounds as f64, "count"),
        Row::new("fanout", "time_to_last_client_median", pushline.last_client_ms, "ms"),
        Row::new("fanout", "delivery_latency_p50", pushline.p50_ms, "ms"),
        Row::new("fanout", "delivery_latency_p99", pushline.p99_ms, "ms"),
        Row::new("fanout", "delivery_latency_max", pushline.max_ms, "ms"),
        Row::new("fanout", "server_cpu_per_delivery", pushline.cpu_us, "us"),
        Row::new("fanout", "server_user_cpu_per_delivery", pushline.user_us, "us"),
        Row::new("fanout", "server_kernel_cpu_per_delivery", pushline.kernel_us, "us"),
    ];
    if floor {
        let floor = measure(&ServerProcess::start_floor(floor_uring)?, common, connections, rounds, false).await?;
        rows.extend([
            Row::new("fanout", "floor_sends_per_system_call", if floor_uring { crate::floor::URING_BATCH as f64 } else { 1.0 }, "count"),
            Row::new("fanout", "floor_time_to_last_client_median", floor.last_client_ms, "ms"),
            Row::new("fanout", "floor_cpu_per_delivery", floor.cpu_us, "us"),
            Row::new("fanout", "floor_user_cpu_per_delivery", floor.user_us, "us"),
            Row::new("fanout", "floor_kernel_cpu_per_delivery", floor.kernel_us, "us"),
            Row::new("fanout", "cpu_per_delivery_vs_floor", pushline.cpu_us / floor.cpu_us, "ratio"),
            Row::new("fanout", "kernel_cpu_per_delivery_vs_floor", pushline.kernel_us / floor.kernel_us, "ratio"),
            Row::new("fanout", "last_client_vs_floor", pushline.last_client_ms / floor.last_client_ms, "ratio"),
        ]);
    }
    Ok(rows)
}
