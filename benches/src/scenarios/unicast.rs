//! `unicast`: pushes to random uids through `/v1/push` at a target rate; throughput and
//! publish-to-delivery latency percentiles, measured by the clients (the same clock as
//! the publisher: both are this process). With `--nodes 2` the clients are on one node
//! and the pushes go to the other, so every push crosses nodes through Redis. Each push
//! opens a connection of its own, or with `--publishers N` goes over a pool of N
//! keep-alive connections, the way an application's HTTP client publishes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

use crate::client;
use crate::driver::{http, Nodes};
use crate::report::Row;
use crate::Common;

pub async fn run(common: &Common, connections: usize, rate: u64, seconds: u64, k: usize, publishers: usize) -> Result<Vec<Row>, String> {
    if publishers > 0 && common.tls {
        return Err("--publishers keeps plain HTTP connections; drop --tls".into());
    }
    let nodes = Nodes::start(common, k, false)?;
    let (publish_to, clients_on) = (&nodes.servers[0], nodes.servers.last().ok_or("no node")?);
    let streams = super::open_connections(clients_on.client, connections, common.parallel, common.spread, "u").await?;
    if k > 1 {
        clients_on.wait_metric("pushline_registry_sessions", connections as f64, Duration::from_secs(60)).await?;
    }
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
    let total = rate * seconds;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let cpu0 = nodes.cpu_time();
    let start = Instant::now();
    let addr = publish_to.client;
    let mut sending = tokio::task::JoinSet::new();
    // Keep-alive: each publisher takes the next due push when it has the last one's answer.
    let (due, queue) = mpsc::channel::<String>(1024);
    let queue = Arc::new(tokio::sync::Mutex::new(queue));
    for _ in 0..publishers {
        let queue = queue.clone();
        sending.spawn(async move {
            let mut accepted = 0;
            let Ok(mut connection) = tokio::net::TcpStream::connect(addr).await else { return 0 };
            loop {
                let Some(body) = queue.lock().await.recv().await else { break };
                accepted += keep_alive_push(&mut connection, &body).await.unwrap_or(false) as u64;
            }
            accepted
        });
    }
    for i in 0..total {
        tokio::time::sleep_until((start + interval.mul_f64(i as f64)).into()).await;
        let uid = (i.wrapping_mul(2_654_435_761) % connections as u64) as usize;
        let body = format!(r#"{{"uids":["u{uid}"],"data":{}}}"#, base.elapsed().as_nanos());
        if publishers > 0 {
            if due.send(body).await.is_err() {
                break;
            }
        } else {
            sending.spawn(async move { http(addr, "POST", "/v1/push", &body).await.is_ok() as u64 });
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
    let cpu = nodes.cpu_time().since(cpu0);
    if latencies.is_empty() {
        return Err("no push was delivered".into());
    }
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)].as_secs_f64() * 1e3;
    Ok(vec![
        Row::new("unicast", "nodes", k as f64, "count"),
        Row::new("unicast", "connections", connections as f64, "count"),
        Row::new("unicast", "keep_alive_publishers", publishers as f64, "count"),
        Row::new("unicast", "pushes_sent", total as f64, "count"),
        Row::new("unicast", "pushes_delivered", latencies.len() as f64, "count"),
        Row::new("unicast", "throughput", latencies.len() as f64 / elapsed.as_secs_f64(), "1/s"),
        Row::new("unicast", "latency_p50", pct(0.50), "ms"),
        Row::new("unicast", "latency_p99", pct(0.99), "ms"),
        Row::new("unicast", "latency_p999", pct(0.999), "ms"),
        Row::new("unicast", "server_cpu_per_push", cpu.total().as_secs_f64() * 1e6 / total as f64, "us"),
    ])
}

/// One `POST /v1/push` over a kept connection; whether it was answered 200. The answer's
/// body is read to its `Content-Length`, so the connection is ready for the next request.
async fn keep_alive_push(connection: &mut tokio::net::TcpStream, body: &str) -> std::io::Result<bool> {
    use tokio::io::AsyncWriteExt;
    let request = format!("POST /v1/push HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
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
    Ok(head.starts_with("http/1.1 200"))
}
