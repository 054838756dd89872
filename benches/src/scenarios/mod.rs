//! One module per scenario; each returns rows for the report.

pub mod fanout;
pub mod heartbeat;
pub mod hook;
pub mod idle;
pub mod presence;
pub mod pusher;
pub mod registry;
pub mod resume;
pub mod scale;
pub mod slow;
pub mod soak;
pub mod storm;
pub mod unicast;

use std::net::SocketAddr;

use std::time::Instant;

use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

use crate::client;

/// Opens `n` WebSocket connections (uids `{prefix}{i}`), `parallel` handshakes at a time.
pub async fn open_connections(server: SocketAddr, n: usize, parallel: usize, spread: u8, prefix: &str) -> Result<Vec<client::Stream>, String> {
    open_connections_from(server, 0..n, parallel, spread, 0, prefix).await
}

/// As `open_connections`, for uids `{prefix}{i}` with i in `uids`, from 127.`net`.0.x.
pub async fn open_connections_from(
    server: SocketAddr,
    uids: std::ops::Range<usize>,
    parallel: usize,
    spread: u8,
    net: u8,
    prefix: &str,
) -> Result<Vec<client::Stream>, String> {
    open_in_batches(uids, parallel, "connection", |i| {
        let uid = format!("{prefix}{i}");
        async move { client::connect(server, client::source_ip_in(net, i, spread), &uid).await }
    })
    .await
}

/// As `open_connections`, each subscribed to `topic` at connect (`/ws?uid=..&topics=..`).
pub async fn open_subscribed(server: SocketAddr, n: usize, parallel: usize, spread: u8, prefix: &str, topic: &str) -> Result<Vec<client::Stream>, String> {
    open_in_batches(0..n, parallel, "connection", |i| {
        let query = format!("uid={prefix}{i}&topics={topic}");
        async move { Ok(client::open(server, client::source_ip(i, spread), &query, None).await?.stream) }
    })
    .await
}

/// As `open_connections`, Pusher clients of the idle scenario's app (`/app/bench-key`).
pub async fn open_pusher(server: SocketAddr, n: usize, parallel: usize, spread: u8, prefix: &str) -> Result<Vec<client::Stream>, String> {
    open_in_batches(0..n, parallel, "Pusher connection", |i| {
        let path = format!("/app/bench-key?protocol=7&client={prefix}{i}");
        async move { Ok(client::open(server, client::source_ip(i, spread), &path, None).await?.stream) }
    })
    .await
}

/// As `open_connections`, over SSE (`/sse?uid={prefix}{i}`, plain TCP).
pub async fn open_sse_connections(server: SocketAddr, n: usize, parallel: usize, spread: u8, prefix: &str) -> Result<Vec<client::Stream>, String> {
    open_in_batches(0..n, parallel, "SSE connection", |i| {
        let uid = format!("{prefix}{i}");
        async move { client::open_sse(server, client::source_ip(i, spread), &uid).await }
    })
    .await
}

/// Runs `open(i)` for each i in `uids`, `parallel` at a time; the first failure ends it.
async fn open_in_batches<F, Fut>(uids: std::ops::Range<usize>, parallel: usize, what: &str, open: F) -> Result<Vec<client::Stream>, String>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = std::io::Result<client::Stream>> + Send + 'static,
{
    let mut streams = Vec::with_capacity(uids.len());
    let (mut next, n) = (uids.start, uids.end);
    while next < n {
        let batch = parallel.max(1).min(n - next);
        let mut set = tokio::task::JoinSet::new();
        for i in next..next + batch {
            set.spawn(open(i));
        }
        while let Some(joined) = set.join_next().await {
            let stream = joined.map_err(|e| e.to_string())?.map_err(|e| format!("{what} {}: {e}", streams.len()))?;
            streams.push(stream);
        }
        next += batch;
    }
    Ok(streams)
}

/// Reads every stream on a task of its own and reports the moment each text frame arrives.
pub fn arrivals(streams: Vec<client::Stream>) -> mpsc::UnboundedReceiver<Instant> {
    let (tx, rx) = mpsc::unbounded_channel();
    for mut stream in streams {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut buf = Vec::with_capacity(4096);
            loop {
                if stream.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                    return;
                }
                let now = Instant::now();
                while let Some((opcode, len)) = client::frame(&buf) {
                    if opcode == 1 && tx.send(now).is_err() {
                        return;
                    }
                    buf.drain(..len);
                }
            }
        });
    }
    rx
}
