//! `storm`: N clients connect at once; time until all are connected, server CPU per
//! handshake, and what the server refused or failed to accept. With `reconnect`, they
//! then all drop at once and come back as fast as they can. Clients always wait what a
//! refusal's `Retry-After` says: against `--max-connect-rate R`, the accept rate should
//! hold at R, every client be back within N/R seconds plus the jitter, and the server's
//! CPU per accepted handshake and its memory stay where they were.

use std::time::{Duration, Instant};

use crate::client;
use crate::driver::ServerProcess;
use crate::report::Row;
use crate::Common;

const CONNECTIONS: &str = r#"pushline_connections{transport="ws"}"#;
const RATE_REFUSALS: &str = r#"pushline_connections_refused_total{reason="connect_rate"}"#;
const TLS_FULL: &str = r#"pushline_tls_handshakes_total{kind="full"}"#;
const TLS_RESUMED: &str = r#"pushline_tls_handshakes_total{kind="resumed"}"#;

/// Connects clients `storm{i}`, `parallel` handshakes at a time, each retrying after what
/// a refusal's `Retry-After` says (1 s without one); fails on any other error.
async fn connect_all(server: &ServerProcess, n: usize, parallel: usize, spread: u8) -> Result<Vec<client::Stream>, String> {
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(parallel));
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        let (addr, permits) = (server.client, permits.clone());
        set.spawn(async move {
            loop {
                let permit = permits.acquire().await.map_err(|e| e.to_string())?;
                let attempt = client::connect(addr, client::source_ip(i, spread), &format!("storm{i}")).await;
                drop(permit);
                match attempt {
                    Ok(stream) => return Ok(stream),
                    Err(e) => match e.get_ref().and_then(|e| e.downcast_ref::<client::Refused>()) {
                        Some(refused) => tokio::time::sleep(refused.retry_after.unwrap_or(Duration::from_secs(1))).await,
                        None => return Err(format!("connection {i}: {e}")),
                    },
                }
            }
        });
    }
    let mut streams = Vec::with_capacity(n);
    while let Some(joined) = set.join_next().await {
        streams.push(joined.map_err(|e| e.to_string())??);
    }
    Ok(streams)
}

pub async fn run(common: &Common, connections: usize, parallel: usize, reconnect: bool) -> Result<Vec<Row>, String> {
    let server = ServerProcess::start(&common.server_bin, &common.server_args)?;
    let n = connections as f64;
    let cpu0 = server.cpu_time();
    let start = Instant::now();
    let held = connect_all(&server, connections, parallel, common.spread).await?;
    server.wait_metric(CONNECTIONS, n, Duration::from_secs(60)).await?;
    let took = start.elapsed();
    let cpu = server.cpu_time().since(cpu0);
    let refused = server.metric(RATE_REFUSALS).await;
    let rss_connected = server.rss_bytes();
    let accept_errors = server.metric(r#"pushline_accept_errors_total{kind="file_limit"}"#).await
        + server.metric(r#"pushline_accept_errors_total{kind="other"}"#).await;
    let mut rows = vec![
        Row::new("storm", "connections", n, "count"),
        Row::new("storm", "handshakes_in_flight", parallel as f64, "count"),
        Row::new("storm", "time_to_all_connected", took.as_secs_f64() * 1e3, "ms"),
        Row::new("storm", "connections_per_second", n / took.as_secs_f64(), "1/s"),
        Row::new("storm", "refused_connect_rate", refused, "count"),
        Row::new("storm", "server_cpu_per_handshake", cpu.total().as_secs_f64() * 1e6 / n, "us"),
        Row::new("storm", "rss_connected", rss_connected as f64, "bytes"),
        Row::new("storm", "accept_errors", accept_errors, "count"),
        Row::new("storm", "tls_full_handshakes", server.metric(TLS_FULL).await, "count"),
        Row::new("storm", "tls_resumed_handshakes", server.metric(TLS_RESUMED).await, "count"),
    ];
    drop(held);
    if reconnect {
        server.wait_metric_until(CONNECTIONS, Duration::from_secs(60), |c| c == 0.0).await?;
        let refused_before = server.metric(RATE_REFUSALS).await;
        let (full_before, resumed_before) = (server.metric(TLS_FULL).await, server.metric(TLS_RESUMED).await);
        let (cpu1, again) = (server.cpu_time(), Instant::now());
        let back = connect_all(&server, connections, parallel, common.spread).await?;
        server.wait_metric(CONNECTIONS, n, Duration::from_secs(60)).await?;
        let took = again.elapsed();
        let cpu = server.cpu_time().since(cpu1);
        let refused = server.metric(RATE_REFUSALS).await - refused_before;
        rows.extend([
            Row::new("storm", "reconnect_time_to_all_back", took.as_secs_f64() * 1e3, "ms"),
            Row::new("storm", "reconnect_accepted_per_second", n / took.as_secs_f64(), "1/s"),
            Row::new("storm", "reconnect_refused_connect_rate", refused, "count"),
            Row::new("storm", "reconnect_server_cpu_per_accepted", cpu.total().as_secs_f64() * 1e6 / n, "us"),
            Row::new("storm", "reconnect_rss_back", server.rss_bytes() as f64, "bytes"),
            Row::new("storm", "reconnect_tls_full_handshakes", server.metric(TLS_FULL).await - full_before, "count"),
            Row::new("storm", "reconnect_tls_resumed_handshakes", server.metric(TLS_RESUMED).await - resumed_before, "count"),
            Row::new("storm", "server_panics", server.panics.load(std::sync::atomic::Ordering::Relaxed) as f64, "count"),
        ]);
        drop(back);
    }
    Ok(rows)
}
