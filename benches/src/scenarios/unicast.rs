//! `unicast`: pushes to random uids at a target rate, the way applications publish: over a
//! pool of keep-alive connections (`--publishers N`), one push per request or `--batch K`
//! pushes per `POST /v1/batch`. Throughput, publish-to-delivery latency percentiles
//! (measured by the clients, on the same clock as the publisher: both are this process),
//! server CPU per push, and with `--nodes 2` Redis commands per push: the clients are on
//! one node and the pushes go to the other, so every push crosses nodes through Redis.
//! Then the same run against the floor server (`floor/`: parse, look up, write; with
//! `--nodes K`, K floor servers on a Redis, the first relaying each request's pushes with
//! one `PUBLISH` to each other), and Pushline's CPU per push as a ratio to it. `--new-connection-per-push` opens a
//! connection for every request instead, for comparison.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::client;
use crate::driver::{http, CpuTime, Nodes, ServerProcess};
use crate::report::Row;
use crate::Common;

/// What the publishers do.
#[derive(Clone, Copy)]
pub struct Settings {
    pub connections: usize,
    pub rate: u64,
    pub seconds: u64,
    pub nodes: usize,
    /// Keep-alive connections publishing (ignored with `new_connection_per_push`).
    pub publishers: usize,
    /// Pushes per request: 1 posts `/v1/push`, more post `/v1/batch`.
    pub batch: usize,
    pub new_connection_per_push: bool,
    pub floor: bool,
}

/// One server's figures.
struct Figures {
    sent: u64,
    delivered: usize,
    throughput: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    cpu_us: f64,
    user_us: f64,
    kernel_us: f64,
}

pub async fn run(common: &Common, settings: Settings) -> Result<Vec<Row>, String> {
    if !settings.new_connection_per_push && common.tls {
        return Err("keep-alive publishers use plain HTTP connections; add --new-connection-per-push to publish over TLS".into());
    }
    if settings.batch == 0 || settings.publishers == 0 {
        return Err("--batch and --publishers are at least 1".into());
    }
    let k = settings.nodes;
    let nodes = Nodes::start(common, k, false)?;
    let (publish_to, clients_on) = (&nodes.servers[0], nodes.servers.last().ok_or("no node")?);
    let streams = super::open_connections(clients_on.client, settings.connections, common.parallel, common.spread, "u").await?;
    if k > 1 {
        clients_on.wait_metric("pushline_registry_sessions", settings.connections as f64, Duration::from_secs(60)).await?;
    } else {
        clients_on.wait_metric(r#"pushline_connections{transport="ws"}"#, settings.connections as f64, Duration::from_secs(60)).await?;
    }
    // Round trips: the nodes' own count of Redis commands and pipelines they sent.
    const ROUND_TRIPS: &str = "pushline_redis_command_seconds_count";
    let redis_before = match &nodes.redis {
        Some(redis) => Some((redis.info().await?, nodes.metric_total(ROUND_TRIPS).await)),
        None => None,
    };
    let pushline = measure(streams, publish_to.client, || nodes.cpu_time(), settings).await?;
    let mut rows = vec![
        Row::new("unicast", "nodes", k as f64, "count"),
        Row::new("unicast", "connections", settings.connections as f64, "count"),
        Row::new("unicast", "keep_alive_publishers", if settings.new_connection_per_push { 0.0 } else { settings.publishers as f64 }, "count"),
        Row::new("unicast", "pushes_per_request", settings.batch as f64, "count"),
        Row::new("unicast", "pushes_sent", pushline.sent as f64, "count"),
        Row::new("unicast", "pushes_delivered", pushline.delivered as f64, "count"),
        Row::new("unicast", "throughput", pushline.throughput, "1/s"),
        Row::new("unicast", "latency_p50", pushline.p50_ms, "ms"),
        Row::new("unicast", "latency_p99", pushline.p99_ms, "ms"),
        Row::new("unicast", "latency_p999", pushline.p999_ms, "ms"),
        Row::new("unicast", "server_cpu_per_push", pushline.cpu_us, "us"),
        Row::new("unicast", "server_user_cpu_per_push", pushline.user_us, "us"),
        Row::new("unicast", "server_kernel_cpu_per_push", pushline.kernel_us, "us"),
    ];
    if let (Some(redis), Some((before, trips_before))) = (&nodes.redis, redis_before) {
        let after = redis.info().await?;
        let pushes = pushline.sent as f64;
        // Commands the append script runs inside Redis count too.
        let commands = super::registry::commands(&after) - super::registry::commands(&before);
        let scripts = after.get("calls_evalsha").copied().unwrap_or(0.0) - before.get("calls_evalsha").copied().unwrap_or(0.0);
        let trips = nodes.metric_total(ROUND_TRIPS).await - trips_before;
        rows.extend([
            Row::new("unicast", "redis_commands_per_push", commands / pushes, "commands"),
            Row::new("unicast", "redis_scripts_per_push", scripts / pushes, "calls"),
            Row::new("unicast", "redis_round_trips_per_push", trips / pushes, "round trips"),
        ]);
    }
    drop(nodes);
    if settings.floor && !common.tls {
        let floor = match k {
            1 => Nodes { servers: vec![ServerProcess::start_floor(false)?], redis: None },
            _ => Nodes::start_floor_on_redis(k)?,
        };
        let (publish_to, clients_on) = (&floor.servers[0], floor.servers.last().ok_or("no node")?);
        let streams = super::open_connections(clients_on.client, settings.connections, common.parallel, common.spread, "u").await?;
        let figures = measure(streams, publish_to.client, || floor.cpu_time(), settings).await?;
        rows.extend([
            Row::new("unicast", "floor_pushes_delivered", figures.delivered as f64, "count"),
            Row::new("unicast", "floor_latency_p99", figures.p99_ms, "ms"),
            Row::new("unicast", "floor_cpu_per_push", figures.cpu_us, "us"),
            Row::new("unicast", "floor_user_cpu_per_push", figures.user_us, "us"),
            Row::new("unicast", "floor_kernel_cpu_per_push", figures.kernel_us, "us"),
        ]);
        // A run too short for the floor to use a clock tick of CPU has no ratio.
        if figures.cpu_us > 0.0 {
            rows.push(Row::new("unicast", "cpu_per_push_vs_floor", pushline.cpu_us / figures.cpu_us, "ratio"));
        }
    }
    Ok(rows)
}

/// Publishes to `publish_to` at the settings' rate while `streams` read; their figures.
async fn measure(streams: Vec<client::Stream>, publish_to: SocketAddr, cpu_time: impl Fn() -> CpuTime, settings: Settings) -> Result<Figures, String> {
    let base = Arc::new(Instant::now());
    let (tx, mut rx) = mpsc::unbounded_channel::<Duration>();
    for mut stream in streams {
        let (tx, base) = (tx.clone(), base.clone());
        tokio::spawn(async move {
            let mut buf = Vec::with_capacity(512);
            loop {
                if stream.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                    return;
                }
                while let Some((opcode, len)) = client::frame(&buf) {
                    // The payload holds `"data":<sent nanos>` (then the stream position).
                    let text = String::from_utf8_lossy(&buf[..len]);
                    let sent = text.split_once("\"data\":").map(|(_, r)| r.split(|c: char| !c.is_ascii_digit()).next().unwrap_or_default());
                    if let Some(sent) = sent.and_then(|digits| digits.parse::<u64>().ok()) {
                        let now = base.elapsed();
                        if opcode == 1 && tx.send(now.saturating_sub(Duration::from_nanos(sent))).is_err() {
                            return;
                        }
                    }
                    buf.drain(..len);
                }
            }
        });
    }
    drop(tx);
    let (batch, connections) = (settings.batch as u64, settings.connections as u64);
    let requests = (settings.rate * settings.seconds).div_ceil(batch);
    let total = requests * batch;
    let interval = Duration::from_secs_f64(batch as f64 / settings.rate as f64);
    let path = if batch > 1 { "/v1/batch" } else { "/v1/push" };
    let cpu0 = cpu_time();
    let start = Instant::now();
    let mut sending = tokio::task::JoinSet::new();
    // Keep-alive: each publisher takes the next due request when it has the last one's answer.
    let (due, queue) = mpsc::channel::<String>(1024);
    let queue = Arc::new(tokio::sync::Mutex::new(queue));
    if !settings.new_connection_per_push {
        for _ in 0..settings.publishers {
            let queue = queue.clone();
            sending.spawn(async move {
                let mut accepted = 0;
                let Ok(mut connection) = tokio::net::TcpStream::connect(publish_to).await else { return 0 };
                let _ = connection.set_nodelay(true);
                loop {
                    let Some(body) = queue.lock().await.recv().await else { break };
                    accepted += keep_alive_post(&mut connection, path, &body, batch).await.unwrap_or(0);
                }
                accepted
            });
        }
    }
    for r in 0..requests {
        tokio::time::sleep_until((start + interval.mul_f64(r as f64)).into()).await;
        let item = |i: u64| {
            let uid = (i.wrapping_mul(2_654_435_761) % connections) as usize;
            format!(r#"{{"uids":["u{uid}"],"data":{}}}"#, base.elapsed().as_nanos())
        };
        let body = if batch > 1 {
            let items: Vec<String> = (r * batch..(r + 1) * batch).map(|i| format!(r#"{{"push":{}}}"#, item(i))).collect();
            format!("[{}]", items.join(","))
        } else {
            item(r)
        };
        if settings.new_connection_per_push {
            sending.spawn(async move { http(publish_to, "POST", path, &body).await.map_or(0, |answer| accepted_in(&answer, batch)) });
        } else if due.send(body).await.is_err() {
            break;
        }
    }
    drop(due);
    let mut accepted = 0;
    while let Some(n) = sending.join_next().await {
        accepted += n.unwrap_or(0);
    }
    let elapsed = start.elapsed();
    let mut latencies = Vec::with_capacity(total as usize);
    while latencies.len() < accepted as usize {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(l)) => latencies.push(l),
            _ => break,
        }
    }
    let cpu = cpu_time().since(cpu0);
    if latencies.is_empty() {
        return Err("no push was delivered".into());
    }
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)].as_secs_f64() * 1e3;
    let per_push = |d: Duration| d.as_secs_f64() * 1e6 / total as f64;
    Ok(Figures {
        sent: total,
        delivered: latencies.len(),
        throughput: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        p999_ms: pct(0.999),
        cpu_us: per_push(cpu.total()),
        user_us: per_push(cpu.user),
        kernel_us: per_push(cpu.system),
    })
}

/// Pushes an answer accepted: none for an error, else `batch` less the items that failed.
fn accepted_in(answer: &str, batch: u64) -> u64 {
    if answer.starts_with(r#"{"error""#) {
        return 0;
    }
    batch.saturating_sub(answer.matches(r#""error""#).count() as u64)
}

/// One POST of `batch` pushes over a kept connection; those its answer accepted (0 unless 200). The
/// answer's body is read to its `Content-Length`, so the connection is ready for the next.
async fn keep_alive_post(connection: &mut tokio::net::TcpStream, path: &str, body: &str, batch: u64) -> std::io::Result<u64> {
    let request = format!("POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    connection.write_all(request.as_bytes()).await?;
    let mut answer = Vec::with_capacity(512);
    let head_end = loop {
        if let Some(at) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        if connection.read_buf(&mut answer).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    };
    let head = String::from_utf8_lossy(&answer[..head_end]).to_ascii_lowercase();
    let length: usize = head.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
    while answer.len() < head_end + length {
        if connection.read_buf(&mut answer).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    if !head.starts_with("http/1.1 200") {
        return Ok(0);
    }
    Ok(accepted_in(&String::from_utf8_lossy(&answer[head_end..]), batch))
}
