//! memory-audit's per-connection figure against the machine's own measure. A test binary
//! of its own: the machine-wide kernel figures must not see other tests' sockets.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_audit_agrees_with_the_machine_at_2000_connections() {
    const N: usize = 2000;
    require_root();
    let server = Server::start(&[]);
    // One round of N first, so tables and per-thread buffers are at their working size;
    // RSS is read after the allocator returned its cached pages, so what grows is what
    // the connections hold.
    drop(open(server.client, N, "warm").await);
    server.wait_connections(0).await;
    let (rss0, slab0) = (server.purged_rss().await, slab_bytes());

    let clients = open(server.client, N, "a").await;
    server.wait_connections(N as u64).await;
    let (rss1, slab1) = (server.purged_rss().await, slab_bytes());
    let report: serde_json::Value = serde_json::from_str(&tools(&["memory-audit", &server.pid().to_string(), "--json"])).unwrap();

    // What the machine says: the server's RSS growth, plus half the growth of kernel
    // objects (client and server sockets are alike, and both ends are on this machine).
    let machine = (rss1.saturating_sub(rss0) as f64 + slab1.saturating_sub(slab0) as f64 / 2.0) / N as f64;
    let audited = report["per_connection"]["total"].as_f64().unwrap();
    assert!(report["connections"].as_u64().unwrap() >= N as u64, "{report}");
    let off = (audited - machine).abs() / machine;
    eprintln!("memory-audit {audited:.0} B per connection, machine {machine:.0} B ({:.1}% apart)", off * 100.0);
    assert!(off < 0.15, "memory-audit says {audited:.0} B per connection, the machine {machine:.0} B ({:.0}% off)\n{report}", off * 100.0);
    assert!(report["per_connection"]["user_space"].as_f64().unwrap() > 300.0);
    assert!(report["kernel"]["socket_struct_bytes"].as_u64().unwrap() > 1000);

    let table = tools(&["memory-audit", &server.pid().to_string()]);
    assert!(table.contains("connection_task") && table.contains("per connection:"), "{table}");
    drop(clients);
}
