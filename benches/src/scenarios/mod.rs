//! One module per scenario; each returns rows for the report.

pub mod fanout;
pub mod heartbeat;
pub mod idle;
pub mod slow;
pub mod storm;
pub mod unicast;

use std::net::SocketAddr;

use tokio::net::TcpStream;

use crate::client;

/// Opens `n` WebSocket connections (uids `{prefix}{i}`), `parallel` handshakes at a time.
pub async fn open_connections(server: SocketAddr, n: usize, parallel: usize, spread: u8, prefix: &str) -> Result<Vec<TcpStream>, String> {
    let mut streams = Vec::with_capacity(n);
    let mut next = 0;
    while next < n {
        let batch = parallel.min(n - next);
        let mut set = tokio::task::JoinSet::new();
        for i in next..next + batch {
            let uid = format!("{prefix}{i}");
            set.spawn(async move { client::connect(server, client::source_ip(i, spread), &uid).await });
        }
        while let Some(joined) = set.join_next().await {
            let stream = joined.map_err(|e| e.to_string())?.map_err(|e| format!("connection {}: {e}", streams.len()))?;
            streams.push(stream);
        }
        next += batch;
    }
    Ok(streams)
}
