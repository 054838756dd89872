//! `storm`: N clients connect at once; time until all are connected, server CPU per
//! handshake, and what the server refused or failed to accept. With `reconnect`, they
//! then all drop at once and come back as fast as they can, waiting what each refusal's
//! `Retry-After` says: against `--max-connect-rate R`, the accept rate should hold at R
//! and every client be back within N/R seconds plus the jitter.

use std::time::{Duration, Instant};

use crate::client;
use crate::driver::ServerProcess;
use crate::report::Row;
use crate::Common;

pub async fn run(common: &Common, connections: usize, parallel: usize, reconnect: bool) -> Result<Vec<Row>, String> {
    let server = ServerProcess::start(&common.server_bin, &common.server_args)?;
    let cpu0 = server.cpu_time();
    let start = Instant::now();
    let held = super::open_connections(server.client, connections, parallel, common.spread, "storm").await?;
    server.wait_metric(r#"pushline_connections{transport="ws"}"#, connections as f64, Duration::from_secs(60)).await?;
    let took = start.elapsed();
    let cpu = server.cpu_time().since(cpu0);
    let accept_errors = server.metric(r#"pushline_accept_errors_total{kind="file_limit"}"#).await
        + server.metric(r#"pushline_accept_errors_total{kind="other"}"#).await;
    drop(held);
    let mut rows = Vec::new();
    if reconnect {
        server.wait_metric_until(r#"pushline_connections{transport="ws"}"#, Duration::from_secs(60), |n| n == 0.0).await?;
        let refusals_before = server.metric(r#"pushline_connections_refused_total{reason="connect_rate"}"#).await;
        let (cpu1, again) = (server.cpu_time(), Instant::now());
        let mut set = tokio::task::JoinSet::new();
        for i in 0..connections {
            let (addr, spread) = (server.client, common.spread);
            set.spawn(async move {
                loop {
                    match client::connect(addr, client::source_ip(i, spread), &format!("storm{i}")).await {
                        Ok(stream) => return Ok(stream),
                        Err(e) => match e.get_ref().and_then(|e| e.downcast_ref::<client::Refused>()) {
                            Some(refused) => tokio::time::sleep(refused.retry_after.unwrap_or(Duration::from_secs(1))).await,
                            None => return Err(e.to_string()),
                        },
                    }
                }
            });
        }
        let mut back = Vec::with_capacity(connections);
        while let Some(joined) = set.join_next().await {
            back.push(joined.map_err(|e| e.to_string())??);
        }
        let took = again.elapsed();
        let cpu = server.cpu_time().since(cpu1);
        let refused = server.metric(r#"pushline_connections_refused_total{reason="connect_rate"}"#).await - refusals_before;
        rows.extend([
            Row::new("storm", "reconnect_time_to_all_back", took.as_secs_f64() * 1e3, "ms"),
            Row::new("storm", "reconnect_accepted_per_second", connections as f64 / took.as_secs_f64(), "1/s"),
            Row::new("storm", "reconnect_refused_connect_rate", refused, "count"),
            Row::new("storm", "reconnect_server_cpu_per_accepted", cpu.total().as_secs_f64() * 1e6 / connections as f64, "us"),
        ]);
        drop(back);
    }
    rows.splice(0..0, vec![
        Row::new("storm", "connections", connections as f64, "count"),
        Row::new("storm", "handshakes_in_flight", parallel as f64, "count"),
        Row::new("storm", "time_to_all_connected", took.as_secs_f64() * 1e3, "ms"),
        Row::new("storm", "connections_per_second", connections as f64 / took.as_secs_f64(), "1/s"),
        Row::new("storm", "server_cpu_per_handshake", cpu.total().as_secs_f64() * 1e6 / connections as f64, "us"),
        Row::new("storm", "accept_errors", accept_errors, "count"),
    ]);
    Ok(rows)
}
