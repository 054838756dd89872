//! The hidden `worker` command: one client process of the `scale` scenario. It opens its
//! share of connections, says `opened N`, says `received <unix ms>` once every one of them
//! has received something (the broadcast), and closes them when its stdin closes.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::io::AsyncReadExt;

use crate::Common;

pub async fn run(common: &Common, server: SocketAddr, first: usize, connections: usize, net: u8) -> Result<(), String> {
    // 127.0.0.x is the single-process scenarios' range; workers take 127.1.0.x and up.
    let net = net.checked_add(1).ok_or("--net is at most 254")?;
    let streams = crate::scenarios::open_connections_from(server, first..first + connections, common.parallel, common.spread, net, "c").await?;
    println!("opened {}", streams.len());
    let received = Arc::new(AtomicUsize::new(0));
    let last_ms = Arc::new(AtomicU64::new(0));
    for mut stream in streams {
        let (received, last_ms) = (received.clone(), last_ms.clone());
        tokio::spawn(async move {
            let mut buf = [0u8; 256];
            if stream.read(&mut buf).await.unwrap_or(0) > 0 {
                let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
                last_ms.fetch_max(now, Ordering::Relaxed);
                if received.fetch_add(1, Ordering::AcqRel) + 1 == connections {
                    println!("received {}", last_ms.load(Ordering::Relaxed));
                }
            }
            // The task owns the stream: it stays open until the process exits.
            std::future::pending::<()>().await;
        });
    }
    let mut stdin = tokio::io::stdin();
    let mut sink = [0u8; 64];
    while stdin.read(&mut sink).await.map_err(|e| e.to_string())? > 0 {}
    Ok(())
}
