//! `idle`: hold N idle WebSocket (or SSE) connections and report what each costs the
//! server: RSS growth per connection (user space), and kernel TCP memory per connection.
//! With `--presence-topic T`, every connection (a uid of its own) is a member of the
//! presence topic T: what a member costs is the difference from a run without.

use std::time::Duration;

use crate::driver::{tcp_kernel_bytes, ServerProcess};
use crate::report::Row;
use crate::Common;

/// Connections opened before the baseline, so one-time costs (thread-local buffers,
/// runtime growth, first map allocations) are not charged to the rest.
const WARMUP: usize = 200;

const ALLOCATED: &str = r#"pushline_jemalloc_bytes{stat="allocated"}"#;

/// Live bytes of the connection_task, sessions, other and tls sites.
async fn site_bytes(server: &ServerProcess) -> [f64; 4] {
    let mut out = [0.0; 4];
    for (i, site) in ["connection_task", "sessions", "other", "tls"].iter().enumerate() {
        out[i] = server.metric(&format!(r#"pushline_alloc_site_live_bytes{{site="{site}"}}"#)).await;
    }
    out
}

/// memory-audit of the server (the `pushline-tools` next to this binary, as root): its
/// user space and kernel bytes per connection.
fn audit(pid: u32) -> Result<(f64, f64), String> {
    let tools = std::env::current_exe().map_err(|e| e.to_string())?.with_file_name("pushline-tools");
    let out = std::process::Command::new(&tools).args(["memory-audit", &pid.to_string(), "--json"]).output().map_err(|e| format!("{}: {e}", tools.display()))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
    }
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
    let figure = |v: &serde_json::Value| v.as_f64().ok_or_else(|| format!("memory-audit gave no figure: {report}"));
    Ok((figure(&report["user_space"]["total"])?, figure(&report["per_connection"]["kernel"])?))
}

fn anon(pid: u32) -> u64 {
    pushline_alloc::process::Resident::of(pid).map_or(0, |r| r.anon)
}

pub async fn run(common: &Common, connections: usize, hold: u64, sse: bool, presence_topic: Option<&str>, pusher: bool, topic: Option<&str>) -> Result<Vec<Row>, String> {
    if topic.is_some() && (sse || presence_topic.is_some()) {
        return Err("--topic subscribes WebSocket or Pusher connections; it goes with neither --sse nor --presence-topic".into());
    }
    let mut args = common.server_args.clone();
    if let Some(topic) = presence_topic {
        args.push(format!("--presence-topics={topic}"));
    }
    if pusher {
        let (id, key, secret) = super::pusher::APP;
        args.push(format!("--pusher-app={id}:{key}:{secret}"));
    }
    let server = ServerProcess::start(&common.server_bin, &args)?;
    let open = |n: usize, prefix: &'static str| async move {
        let (addr, spread) = (server.client, common.spread);
        match (sse, presence_topic.or(topic)) {
            (_, Some(channel)) if pusher => {
                let channel = channel.to_owned();
                super::open_in_batches(0..n, common.parallel, "Pusher client", move |i| {
                    let channel = channel.clone();
                    async move { super::pusher::subscribed(addr, i, spread, &channel).await }
                })
                .await
            }
            _ if pusher => super::open_pusher(server.client, n, common.parallel, common.spread, prefix).await,
            (true, _) => super::open_sse_connections(server.client, n, common.parallel, common.spread, prefix).await,
            (false, Some(topic)) => super::open_subscribed(server.client, n, common.parallel, common.spread, prefix, topic).await,
            (false, None) => super::open_connections(server.client, n, common.parallel, common.spread, prefix).await,
        }
    };
    let gauge = match (sse, pusher) {
        (_, true) => r#"pushline_connections{transport="pusher"}"#,
        (true, _) => r#"pushline_connections{transport="sse"}"#,
        _ => r#"pushline_connections{transport="ws"}"#,
    };
    // Before any connection: where memory-audit measures growth from, too.
    let anon_fresh = anon(server.pid());
    let warm = open(WARMUP, "warm").await?;
    server.wait_metric(gauge, WARMUP as f64, Duration::from_secs(30)).await?;
    let (rss0, kernel0) = (server.rss_bytes(), tcp_kernel_bytes());
    let heap0 = server.metric(ALLOCATED).await as u64;
    let sites0 = site_bytes(&server).await;

    let n = connections.saturating_sub(WARMUP);
    let held = open(n, "idle").await?;
    server.wait_metric(gauge, connections as f64, Duration::from_secs(60)).await?;
    // Let the allocator and the kernel settle before the reading: pages the handshakes
    // used and freed go back within jemalloc's decay time (10 s), so what is left is
    // what idle connections hold.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let (rss1, kernel1) = (server.rss_bytes(), tcp_kernel_bytes());
    let heap1 = server.metric(ALLOCATED).await as u64;
    let sites1 = site_bytes(&server).await;

    let per = |a: u64, b: u64| (b.saturating_sub(a)) as f64 / n as f64;
    let anon_growth = (anon(server.pid()) as f64 - anon_fresh as f64) / connections as f64;
    let audited = audit(server.pid());
    let rows = vec![
        Row::new("idle", "connections", connections as f64, "count"),
        Row::new("idle", "server_rss_total", rss1 as f64, "bytes"),
        Row::new("idle", "server_rss_per_connection", per(rss0, rss1), "bytes"),
        Row::new("idle", "server_heap_allocated_per_connection", per(heap0, heap1), "bytes"),
        Row::new("idle", "site_connection_task_per_connection", (sites1[0] - sites0[0]) / n as f64, "bytes"),
        Row::new("idle", "site_sessions_per_connection", (sites1[1] - sites0[1]) / n as f64, "bytes"),
        Row::new("idle", "site_other_per_connection", (sites1[2] - sites0[2]) / n as f64, "bytes"),
        Row::new("idle", "site_tls_per_connection", (sites1[3] - sites0[3]) / n as f64, "bytes"),
        // Both ends of each loopback connection are on this machine: half is the server's.
        Row::new("idle", "kernel_tcp_per_connection_server_side", per(kernel0, kernel1) / 2.0, "bytes"),
    ];
    // memory-audit's figures beside the machine's: its user space is the anonymous memory
    // grown since just before the first connection (warm-up included), so it is compared
    // with the same, read here from /proc.
    let mut rows = rows;
    match audited {
        Ok((user, kernel)) => {
            rows.push(Row::new("idle", "anon_growth_per_connection", anon_growth, "bytes"));
            rows.push(Row::new("idle", "audit_user_space_per_connection", user, "bytes"));
            rows.push(Row::new("idle", "audit_vs_anon_growth", user / anon_growth, "ratio"));
            rows.push(Row::new("idle", "audit_kernel_per_connection", kernel, "bytes"));
        }
        Err(e) => eprintln!("idle: no memory-audit figures: {e}"),
    }
    tokio::time::sleep(Duration::from_secs(hold)).await;
    drop((warm, held));
    Ok(rows)
}
