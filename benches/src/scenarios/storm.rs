//! `storm`: N clients connect at once; time until all are connected, server CPU per
//! handshake, and what the server refused or failed to accept.

use std::time::{Duration, Instant};

use crate::driver::ServerProcess;
use crate::report::Row;
use crate::Common;

pub async fn run(common: &Common, connections: usize, parallel: usize) -> Result<Vec<Row>, String> {
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
    Ok(vec![
        Row::new("storm", "connections", connections as f64, "count"),
        Row::new("storm", "handshakes_in_flight", parallel as f64, "count"),
        Row::new("storm", "time_to_all_connected", took.as_secs_f64() * 1e3, "ms"),
        Row::new("storm", "connections_per_second", connections as f64 / took.as_secs_f64(), "1/s"),
        Row::new("storm", "server_cpu_per_handshake", cpu.total().as_secs_f64() * 1e6 / connections as f64, "us"),
        Row::new("storm", "accept_errors", accept_errors, "count"),
    ])
}
