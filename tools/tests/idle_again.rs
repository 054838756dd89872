//! Idle connections that wake up go back to what an idle connection costs: a ping each,
//! then a broadcast to all, and what the wake-ups took (replies, queued messages, the
//! tail of a read) is given back. A test binary of its own, so no other test's
//! connections come and go in the server's memory while it is read.

mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

/// memory-audit's user space per connection, and the connection sites' part of it,
/// once the allocator has given back the pages it keeps for reuse.
async fn footprint(server: &Server) -> (f64, f64) {
    server.purged_rss().await;
    let report: serde_json::Value = serde_json::from_str(&tools(&["memory-audit", &server.pid().to_string(), "--json"])).unwrap();
    let user = &report["user_space"];
    (user["total"].as_f64().unwrap(), user["connection_sites"].as_f64().unwrap())
}

async fn next_frame(ws: &mut Ws) -> Message {
    tokio::time::timeout(WAIT, ws.next()).await.expect("a frame in time").expect("open").expect("a frame")
}

/// Each client pings and reads its pong, then a broadcast reaches every one.
async fn wake(server: &Server, clients: &mut [Ws]) {
    for ws in clients.iter_mut() {
        ws.send(Message::Ping(b"wake".to_vec().into())).await.unwrap();
    }
    for ws in clients.iter_mut() {
        let frame = next_frame(ws).await;
        assert!(matches!(&frame, Message::Pong(p) if &p[..] == b"wake"), "{frame:?}");
    }
    let answer = http(server.client, "POST", "/v1/broadcast", r#"{"data":"all of you"}"#).await;
    assert!(answer.contains("\"delivered\""), "{answer}");
    for ws in clients.iter_mut() {
        let frame = next_frame(ws).await;
        assert!(matches!(&frame, Message::Text(t) if t.contains("all of you")), "{frame:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn woken_connections_return_to_the_idle_footprint() {
    // Enough connections that the process's own coming and going (a few hundred KB of
    // allocator state and stacks between two readings) stays well inside 5% of theirs.
    const N: usize = 5000;
    let server = Server::start(&[]);
    let mut clients = open(server.client, N, "w").await;
    server.wait_connections(N as u64).await;
    let (_, never_woken_sites) = footprint(&server).await;
    // The first wake-ups grow the allocator's own state (its metadata, the extents the
    // replies and the broadcast passed through) until it settles; the connections' sites,
    // read exactly, show whether a connection kept anything of them.
    wake(&server, &mut clients).await;
    wake(&server, &mut clients).await;
    let (idle, idle_sites) = footprint(&server).await;
    wake(&server, &mut clients).await;
    let (woken, woken_sites) = footprint(&server).await;
    eprintln!("user space per connection: idle {idle:.0} B, woken and idle again {woken:.0} B; connection sites never woken {never_woken_sites:.0} B, then {idle_sites:.0} B and {woken_sites:.0} B");
    assert!((woken - idle).abs() <= 0.05 * idle, "idle {idle:.0} B per connection, {woken:.0} B once woken and idle again");
    for sites in [idle_sites, woken_sites] {
        assert!(sites <= never_woken_sites + 1.0, "the connection sites kept {:.1} B per connection of the wake-ups", sites - never_woken_sites);
    }
    drop(clients);
}
