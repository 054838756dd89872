//! `heartbeat`: what keeping connections alive costs. First N connections send nothing
//! (server CPU per connection-second idle), then each sends a JSON ping every
//! `interval` and reads the pong (server CPU per heartbeat, user and kernel apart). Then
//! the pinging against the floor (`floor/`), and Pushline's figures as ratios to it.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::client;
use crate::driver::ServerProcess;
use crate::report::Row;
use crate::Common;

/// CPU per heartbeat, in µs: (total, user, kernel), and how many heartbeats.
struct Figures {
    heartbeats: u64,
    cpu_us: f64,
    user_us: f64,
    kernel_us: f64,
}

/// Each client pings every `interval` for `window` and reads its pong.
async fn ping(server: &ServerProcess, streams: Vec<client::Stream>, interval: Duration, window: Duration) -> Figures {
    let connections = streams.len();
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
    let cpu = server.cpu_time().since(cpu_before);
    let per = |d: Duration| d.as_secs_f64() * 1e6 / heartbeats.max(1) as f64;
    Figures { heartbeats, cpu_us: per(cpu.total()), user_us: per(cpu.user), kernel_us: per(cpu.system) }
}

pub async fn run(common: &Common, connections: usize, interval: Duration, seconds: u64, floor: bool) -> Result<Vec<Row>, String> {
    let window = Duration::from_secs(seconds);
    let (idle_cpu, pushline) = {
        let server = ServerProcess::start(&common.server_bin, &common.server_args)?;
        let streams = super::open_connections(server.client, connections, common.parallel, common.spread, "hb").await?;
        server.wait_metric(r#"pushline_connections{transport="ws"}"#, connections as f64, Duration::from_secs(60)).await?;
        let idle_before = server.cpu_time();
        tokio::time::sleep(window).await;
        let idle_cpu = server.cpu_time().since(idle_before).total();
        (idle_cpu, ping(&server, streams, interval, window).await)
    };
    let mut rows = vec![
        Row::new("heartbeat", "connections", connections as f64, "count"),
        Row::new("heartbeat", "idle_cpu_per_connection_second", idle_cpu.as_secs_f64() * 1e9 / (connections as f64 * window.as_secs_f64()), "ns"),
        Row::new("heartbeat", "idle_cpu_share", idle_cpu.as_secs_f64() / window.as_secs_f64() * 100.0, "% of a core"),
        Row::new("heartbeat", "heartbeats", pushline.heartbeats as f64, "count"),
        Row::new("heartbeat", "server_cpu_per_heartbeat", pushline.cpu_us, "us"),
        Row::new("heartbeat", "server_user_cpu_per_heartbeat", pushline.user_us, "us"),
        Row::new("heartbeat", "server_kernel_cpu_per_heartbeat", pushline.kernel_us, "us"),
    ];
    if floor {
        let server = ServerProcess::start_floor(false)?;
        let streams = super::open_connections(server.client, connections, common.parallel, common.spread, "hb").await?;
        let floor = ping(&server, streams, interval, window).await;
        rows.extend([
            Row::new("heartbeat", "floor_heartbeats", floor.heartbeats as f64, "count"),
            Row::new("heartbeat", "floor_cpu_per_heartbeat", floor.cpu_us, "us"),
            Row::new("heartbeat", "floor_user_cpu_per_heartbeat", floor.user_us, "us"),
            Row::new("heartbeat", "floor_kernel_cpu_per_heartbeat", floor.kernel_us, "us"),
            Row::new("heartbeat", "cpu_per_heartbeat_vs_floor", pushline.cpu_us / floor.cpu_us, "ratio"),
            Row::new("heartbeat", "kernel_cpu_per_heartbeat_vs_floor", pushline.kernel_us / floor.kernel_us, "ratio"),
        ]);
    }
    Ok(rows)
}
