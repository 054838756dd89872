//! `heartbeat`: what keeping connections alive costs. First N connections send nothing
//! (server CPU per connection-second idle), then each sends a JSON ping every
//! `interval` and reads the pong (server CPU per heartbeat).

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::client;
use crate::driver::ServerProcess;
use crate::report::Row;
use crate::Common;

pub async fn run(common: &Common, connections: usize, interval: Duration, seconds: u64) -> Result<Vec<Row>, String> {
    let server = ServerProcess::start(&common.server_bin, &common.server_args)?;
    let streams = super::open_connections(server.client, connections, common.parallel, common.spread, "hb").await?;
    server.wait_metric(r#"pushline_connections{transport="ws"}"#, connections as f64, Duration::from_secs(60)).await?;
    let window = Duration::from_secs(seconds);

    let idle_before = server.cpu_time();
    tokio::time::sleep(window).await;
    let idle_cpu = server.cpu_time().since(idle_before).total();

    let ping = client::text_frame(br#"{"type":"ping"}"#);
    let stop_at = Instant::now() + window;
    let cpu_before = server.cpu_time();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, mut stream) in streams.into_iter().enumerate() {
        let ping = ping.clone();
        tasks.spawn(async move {
            // Spread the first pings over one interval, as real clients' are.
            let offset = interval.mul_f64(i as f64 / connections as f64);
            let mut next = tokio::time::Instant::now() + offset;
            let (mut sent, mut buf) = (0u64, [0u8; 64]);
            while next < stop_at.into() {
                tokio::time::sleep_until(next).await;
                if stream.write_all(&ping).await.is_err() || stream.read(&mut buf).await.unwrap_or(0) == 0 {
                    break;
                }
                sent += 1;
                next += interval;
            }
            sent
        });
    }
    let mut heartbeats = 0;
    while let Some(sent) = tasks.join_next().await {
        heartbeats += sent.unwrap_or(0);
    }
    let busy_cpu = server.cpu_time().since(cpu_before);
    Ok(vec![
        Row::new("heartbeat", "connections", connections as f64, "count"),
        Row::new("heartbeat", "idle_cpu_per_connection_second", idle_cpu.as_secs_f64() * 1e9 / (connections as f64 * window.as_secs_f64()), "ns"),
        Row::new("heartbeat", "idle_cpu_share", idle_cpu.as_secs_f64() / window.as_secs_f64() * 100.0, "% of a core"),
        Row::new("heartbeat", "heartbeats", heartbeats as f64, "count"),
        Row::new("heartbeat", "server_cpu_per_heartbeat", busy_cpu.total().as_secs_f64() * 1e6 / heartbeats.max(1) as f64, "us"),
        Row::new("heartbeat", "server_user_cpu_per_heartbeat", busy_cpu.user.as_secs_f64() * 1e6 / heartbeats.max(1) as f64, "us"),
        Row::new("heartbeat", "server_kernel_cpu_per_heartbeat", busy_cpu.system.as_secs_f64() * 1e6 / heartbeats.max(1) as f64, "us"),
    ])
}
