//! `registry`: what sessions cost Redis. K nodes on one `redis-server` share a port; N
//! clients connect, each sends one heartbeat, then all disconnect. For each phase: Redis
//! commands per operation (from INFO commandstats) and round trips per operation (the
//! nodes' own Redis latency histogram counts), plus Redis memory per session.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::client;
use crate::driver::{Nodes, RedisProcess};
use crate::report::Row;
use crate::Common;

const SESSIONS: &str = "pushline_registry_sessions";
const WRITES: &str = r#"pushline_redis_command_seconds_count{command="sessions"}"#;

/// Commands Redis processed, less the nodes' liveness refreshes (SET), which run on a
/// timer whatever the clients do.
pub fn commands(info: &std::collections::HashMap<String, f64>) -> f64 {
    let all = info.get("total_commands_processed").copied().unwrap_or(0.0);
    // INFO itself and the liveness SETs are not the clients' doing.
    all - info.get("calls_set").copied().unwrap_or(0.0) - info.get("calls_info").copied().unwrap_or(0.0)
}

async fn snapshot(redis: &RedisProcess, nodes: &Nodes) -> Result<(f64, f64, f64), String> {
    let info = redis.info().await?;
    Ok((commands(&info), nodes.metric(WRITES).await, info.get("used_memory").copied().unwrap_or(0.0)))
}

pub async fn run(common: &Common, connections: usize, k: usize) -> Result<Vec<Row>, String> {
    if k < 2 {
        return Err("--nodes must be at least 2: one node uses no Redis".into());
    }
    let nodes = Nodes::start(common, k, true)?;
    let redis = nodes.redis.as_ref().ok_or("no Redis")?;
    let addr = nodes.servers[0].client;
    let (c0, rt0, mem0) = snapshot(redis, &nodes).await?;

    let started = Instant::now();
    let mut streams = super::open_connections(addr, connections, common.parallel, common.spread, "r").await?;
    nodes.wait_metric(SESSIONS, connections as f64, Duration::from_secs(60)).await?;
    let connect_time = started.elapsed();
    let (c1, rt1, mem1) = snapshot(redis, &nodes).await?;

    let ping = client::text_frame(br#"{"type":"ping"}"#);
    let mut buf = [0u8; 64];
    for stream in streams.iter_mut() {
        stream.write_all(&ping).await.map_err(|e| e.to_string())?;
    }
    for stream in streams.iter_mut() {
        if stream.read(&mut buf).await.map_err(|e| e.to_string())? == 0 {
            return Err("a client was closed during the heartbeat round".into());
        }
    }
    let (c2, rt2, _) = snapshot(redis, &nodes).await?;

    drop(streams);
    nodes.wait_metric_until(SESSIONS, Duration::from_secs(60), |n| n <= 0.0).await?;
    let (c3, rt3, _) = snapshot(redis, &nodes).await?;

    let n = connections as f64;
    Ok(vec![
        Row::new("registry", "nodes", k as f64, "count"),
        Row::new("registry", "connections", n, "count"),
        Row::new("registry", "connect_all", connect_time.as_secs_f64() * 1e3, "ms"),
        Row::new("registry", "redis_commands_per_connect", (c1 - c0) / n, "commands"),
        Row::new("registry", "redis_round_trips_per_connect", (rt1 - rt0) / n, "round trips"),
        Row::new("registry", "redis_memory_per_session", (mem1 - mem0) / n, "bytes"),
        Row::new("registry", "redis_commands_per_heartbeat", (c2 - c1) / n, "commands"),
        Row::new("registry", "redis_round_trips_per_heartbeat", (rt2 - rt1) / n, "round trips"),
        Row::new("registry", "redis_commands_per_disconnect", (c3 - c2) / n, "commands"),
        Row::new("registry", "redis_round_trips_per_disconnect", (rt3 - rt2) / n, "round trips"),
    ])
}
