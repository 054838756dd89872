//! `scale`: more connections than one process may hold. K server processes share a port
//! with SO_REUSEPORT (nodes on one Redis when K > 1) and W client processes (this binary's
//! hidden `worker` command) each open their share from source addresses of their own.
//! Reports time to all-connected, the CPU each side spent connecting (servers, clients,
//! Redis), server memory per connection summed over the nodes, Redis memory per session,
//! client memory separately, and one broadcast to everyone. Then the same connections and
//! one broadcast against as many floor servers (`floor/`) on one port, each broadcasting
//! to its own share, and Pushline's times as ratios to theirs.
//!
//! With more nodes than cores, each node gets one core thread (`--io-threads`, unless
//! given): a node's share of the machine is a fraction of a core, and a second thread
//! would only add context switches.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::driver::{cpu_time, http, rss_bytes, CpuTime, Nodes};
use crate::report::Row;
use crate::Common;

/// File descriptors a process keeps for itself (listeners, Redis, logs, runtime).
const RESERVED_FDS: u64 = 200;

fn read_number(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.split_whitespace().next()?.parse().ok()
}

/// Says which limit a run of `connections` over `k` servers and `w` clients would meet.
fn check_limits(connections: usize, k: usize, w: usize) -> Result<(), String> {
    let (_, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).map_err(|e| format!("getrlimit: {e}"))?;
    let per_process = hard.saturating_sub(RESERVED_FDS);
    for (who, count, flag) in [("server", k, "--nodes"), ("client", w, "--workers")] {
        let each = connections.div_ceil(count.max(1)) as u64;
        // SO_REUSEPORT spreads connections by hash: leave room for an uneven share.
        let each = if who == "server" { each + each / 20 } else { each };
        if each > per_process {
            return Err(format!(
                "{connections} connections over {count} {who} process(es) is ~{each} each, over the open-file hard limit \
                 ({hard} here, less {RESERVED_FDS} kept for the process); raise `ulimit -Hn` or use more {flag}"
            ));
        }
    }
    if let Some(max) = read_number("/proc/sys/net/netfilter/nf_conntrack_max") {
        // Only a limit where a firewall rule makes conntrack track these connections;
        // then connects past it fail, so say so before they do.
        if connections as u64 > max {
            eprintln!(
                "pushline-bench: {connections} connections exceed net.netfilter.nf_conntrack_max ({max}); if conntrack \
                 tracks loopback here, connects past it fail: sysctl -w net.netfilter.nf_conntrack_max={}",
                connections * 2
            );
        }
    }
    let files = read_number("/proc/sys/fs/file-max").unwrap_or(u64::MAX);
    if (2 * connections) as u64 > files {
        return Err(format!("both ends of {connections} connections need {} files, over fs.file-max ({files})", 2 * connections));
    }
    Ok(())
}

struct Worker {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Worker {
    fn spawn(common: &Common, server: std::net::SocketAddr, first: usize, count: usize, net: usize) -> Result<Worker, String> {
        let me = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut child = Command::new(me)
            .args(["--parallel", &common.parallel.to_string(), "--spread", &common.spread.to_string()])
            .args(["worker", "--server", &server.to_string(), "--first", &first.to_string()])
            .args(["--connections", &count.to_string(), "--net", &net.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start a client worker: {e}"))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || BufReader::new(stdout).lines().map_while(Result::ok).for_each(|l| drop(tx.send(l))));
        Ok(Worker { child, lines })
    }

    /// The next line starting with `word`, and the number after it.
    fn expect(&self, word: &str, within: Duration) -> Result<u64, String> {
        let deadline = Instant::now() + within;
        loop {
            let line = self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .map_err(|_| format!("client worker {} did not say `{word}` in time", self.child.id()))?;
            if let Some(error) = line.strip_prefix("error ") {
                return Err(format!("client worker {}: {error}", self.child.id()));
            }
            if let Some(n) = line.strip_prefix(word).and_then(|r| r.trim().parse().ok()) {
                return Ok(n);
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Closing stdin tells the worker to close its connections and exit.
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// Clients connected to some nodes: how long it took and what it cost each side.
struct Connected {
    clients: Vec<Worker>,
    opened: usize,
    took: Duration,
    server_cpu: CpuTime,
    client_cpu: Duration,
}

/// Starts `workers` client processes that open `connections` to `nodes` between them,
/// from source networks `net..net + workers`, and waits until every one is open.
fn connect(common: &Common, nodes: &Nodes, connections: usize, workers: usize, net: usize) -> Result<Connected, String> {
    let (started, cpu0) = (Instant::now(), nodes.cpu_time());
    let per = connections.div_ceil(workers);
    let mut clients = Vec::new();
    for w in 0..workers {
        let first = w * per;
        let count = per.min(connections.saturating_sub(first));
        if count > 0 {
            clients.push(Worker::spawn(common, nodes.servers[0].client, first, count, net + w)?);
        }
    }
    let mut opened = 0;
    for client in &clients {
        opened += client.expect("opened", Duration::from_secs(600))? as usize;
    }
    let (took, server_cpu) = (started.elapsed(), nodes.cpu_time().since(cpu0));
    // Each worker was started for this: everything it has spent so far went into connecting.
    let client_cpu = clients.iter().map(|c| cpu_time(c.child.id()).total()).sum();
    Ok(Connected { clients, opened, took, server_cpu, client_cpu })
}

/// When the last client received the broadcast sent at `sent_ms`, in ms after it.
fn last_delivery(clients: &[Worker], sent_ms: u64) -> Result<f64, String> {
    let mut last_ms = 0;
    for client in clients {
        last_ms = last_ms.max(client.expect("received", Duration::from_secs(120))?);
    }
    Ok(last_ms.saturating_sub(sent_ms) as f64)
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

pub async fn run(common: &Common, connections: usize, k: usize, workers: usize, floor: bool) -> Result<Vec<Row>, String> {
    check_limits(connections, k, workers)?;
    if 2 * workers > 253 {
        return Err(format!("--workers {workers}: each worker takes a source network of its own, twice with the floor; at most 126"));
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut common = common.clone();
    if !common.server_args.iter().any(|a| a.starts_with("--io-threads")) {
        common.server_args.push(format!("--io-threads={}", (cores / k).max(1)));
    }
    let common = &common;
    let nodes = Nodes::start(common, k, true)?;
    let redis_cpu = || nodes.redis.as_ref().map_or_else(CpuTime::default, |r| cpu_time(r.pid()));
    let rss0 = nodes.rss_bytes();
    let redis_memory = |info: &std::collections::HashMap<String, f64>| info.get("used_memory").copied().unwrap_or(0.0);
    let redis0 = match &nodes.redis {
        Some(r) => redis_memory(&r.info().await?),
        None => 0.0,
    };

    const ROUND_TRIPS: &str = "pushline_redis_command_seconds_count";
    let trips0 = nodes.metric_total(ROUND_TRIPS).await;
    let redis_cpu0 = redis_cpu();
    let connected = connect(common, &nodes, connections, workers, 0)?;
    let redis_connect_cpu = redis_cpu().since(redis_cpu0);
    let (opened, connect_all) = (connected.opened, connected.took.as_secs_f64());
    nodes.wait_metric(r#"pushline_connections{transport="ws"}"#, opened as f64, Duration::from_secs(120)).await?;
    if k > 1 {
        nodes.wait_metric("pushline_registry_sessions", opened as f64, Duration::from_secs(120)).await?;
    }
    let registry_trips = nodes.metric_total(ROUND_TRIPS).await - trips0;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss1 = nodes.rss_bytes();
    let redis1 = match &nodes.redis {
        Some(r) => redis_memory(&r.info().await?),
        None => 0.0,
    };
    let mut per_node = Vec::new();
    for server in &nodes.servers {
        per_node.push(server.metric(r#"pushline_connections{transport="ws"}"#).await);
    }
    let client_rss: u64 = connected.clients.iter().map(|c| rss_bytes(c.child.id())).sum();

    let sent_ms = now_ms();
    let reply = http(nodes.servers[0].client, "POST", "/v1/broadcast", &format!(r#"{{"data":"{}"}}"#, "x".repeat(64))).await?;
    if !reply.contains("\"id\"") {
        return Err(format!("broadcast refused: {reply}"));
    }
    let broadcast_ms = last_delivery(&connected.clients, sent_ms)?;

    let n = opened as f64;
    let min = per_node.iter().copied().fold(f64::INFINITY, f64::min);
    let max = per_node.iter().copied().fold(0.0, f64::max);
    let mut rows = vec![
        Row::new("scale", "nodes", k as f64, "count"),
        Row::new("scale", "client_processes", connected.clients.len() as f64, "count"),
        Row::new("scale", "connections", n, "count"),
        Row::new("scale", "connections_per_node_min", min, "count"),
        Row::new("scale", "connections_per_node_max", max, "count"),
        Row::new("scale", "connect_all", connect_all, "s"),
        Row::new("scale", "server_cpu_per_handshake", connected.server_cpu.total().as_secs_f64() * 1e6 / n, "us"),
        Row::new("scale", "client_cpu_per_handshake", connected.client_cpu.as_secs_f64() * 1e6 / n, "us"),
        Row::new("scale", "redis_cpu_per_handshake", redis_connect_cpu.total().as_secs_f64() * 1e6 / n, "us"),
        Row::new("scale", "redis_round_trips_per_handshake", registry_trips / n, "round trips"),
        Row::new("scale", "server_rss_total", rss1 as f64, "bytes"),
        Row::new("scale", "server_rss_per_connection", rss1.saturating_sub(rss0) as f64 / n, "bytes"),
        Row::new("scale", "redis_memory_per_session", (redis1 - redis0) / n, "bytes"),
        Row::new("scale", "client_rss_per_connection", client_rss as f64 / n, "bytes"),
        Row::new("scale", "broadcast_last_delivery", broadcast_ms, "ms"),
    ];
    if floor {
        drop(connected);
        drop(nodes);
        let floor = Nodes::start_floor(k)?;
        // Networks of their own: the first run's ports may still be in TIME_WAIT.
        let connected = connect(common, &floor, connections, workers, workers)?;
        let floor_n = connected.opened as f64;
        let sent_ms = now_ms();
        let mut broadcasts = tokio::task::JoinSet::new();
        for server in &floor.servers {
            broadcasts.spawn(http(server.admin, "POST", "/v1/broadcast", ""));
        }
        while let Some(reply) = broadcasts.join_next().await {
            let reply = reply.map_err(|e| e.to_string())??;
            if !reply.contains("delivered") {
                return Err(format!("floor broadcast failed: {reply}"));
            }
        }
        let floor_broadcast_ms = last_delivery(&connected.clients, sent_ms)?;
        rows.extend([
            Row::new("scale", "floor_connections", floor_n, "count"),
            Row::new("scale", "floor_connect_all", connected.took.as_secs_f64(), "s"),
            Row::new("scale", "floor_server_cpu_per_handshake", connected.server_cpu.total().as_secs_f64() * 1e6 / floor_n, "us"),
            Row::new("scale", "floor_client_cpu_per_handshake", connected.client_cpu.as_secs_f64() * 1e6 / floor_n, "us"),
            Row::new("scale", "floor_broadcast_last_delivery", floor_broadcast_ms, "ms"),
            Row::new("scale", "connect_all_vs_floor", connect_all / connected.took.as_secs_f64(), "ratio"),
            Row::new("scale", "broadcast_last_delivery_vs_floor", broadcast_ms / floor_broadcast_ms, "ratio"),
        ]);
    }
    Ok(rows)
}
