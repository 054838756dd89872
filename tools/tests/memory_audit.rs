//! memory-audit's per-connection figures against the machine's own measures, each part on
//! its own. A test binary of its own: the machine-wide kernel figures must not see other
//! tests' sockets.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_audit_agrees_with_the_machine_at_5000_connections() {
    // Enough connections that a few tens of KB of the process's own coming and going
    // (the admin requests, thread stacks) stay well inside 5% of what they hold.
    const N: usize = 5000;
    require_root();
    let server = Server::start(&[]);
    // The machine's own readings, before and after, each after jemalloc returned the
    // pages it keeps for reuse: what grows is what the connections hold.
    server.purged_rss().await;
    let (anon0, slab0) = (anon(server.pid()), slab_bytes());
    let clients = open(server.client, N, "a").await;
    server.wait_connections(N as u64).await;
    server.purged_rss().await;
    let (anon1, slab1) = (anon(server.pid()), slab_bytes());
    let report: serde_json::Value = serde_json::from_str(&tools(&["memory-audit", &server.pid().to_string(), "--json"])).unwrap();
    assert!(report["connections"].as_u64().unwrap() >= N as u64, "{report}");

    // User space: the server's anonymous memory growth per connection.
    let machine = anon1.saturating_sub(anon0) as f64 / N as f64;
    let user = &report["user_space"];
    let audited = user["total"].as_f64().unwrap();
    let off = (audited - machine).abs() / machine;
    eprintln!("user space: memory-audit {audited:.0} B per connection, the machine {machine:.0} B ({:.1}% apart)\n{user:#}", off * 100.0);
    assert!(off < 0.05, "memory-audit says {audited:.0} B of user space per connection, the machine {machine:.0} B ({:.1}% off)\n{report}", off * 100.0);
    // Its lines add up to it, and the connection sites hold at least each connection's
    // record (`Conn`, a 192-byte block).
    let lines = ["connection_sites", "other_sites", "thread_caches", "not_charged", "slack_in_pages", "dirty_and_metadata", "outside_heap"];
    let sum: f64 = lines.iter().map(|l| user[l].as_f64().unwrap()).sum();
    assert!((sum - audited).abs() < 1.0, "lines sum to {sum}, total {audited}\n{user:#}");
    assert!((192.0..audited).contains(&user["connection_sites"].as_f64().unwrap()), "{user:#}");

    // Kernel: socket structures measured from slab growth (both ends of every connection
    // are on this machine and alike, so the test's own growth is over 2N sockets).
    let machine_structs = slab1.saturating_sub(slab0) as f64 / (2 * N) as f64;
    let kernel = &report["kernel"];
    let measured = kernel["socket_struct_bytes_measured"].as_f64().unwrap_or_else(|| panic!("not measured: {kernel:#}"));
    let off = (measured - machine_structs).abs() / machine_structs;
    eprintln!("kernel: memory-audit {measured:.0} B of socket structures, the machine {machine_structs:.0} B ({} B over {} sockets), the model {} B", slab1 as i64 - slab0 as i64, 2 * N, kernel["socket_struct_bytes_model"]);
    eprintln!("{kernel:#}");
    // Slab caches are machine-wide and SLUB counts the objects of per-CPU slabs as in use,
    // so two windows over the same sockets differ by a few percent.
    assert!(off < 0.10, "memory-audit measures {measured:.0} B of socket structures per socket, the machine {machine_structs:.0} B\n{kernel:#}");
    assert_eq!(report["per_connection"]["kernel_basis"], "measured");

    let table = tools(&["memory-audit", &server.pid().to_string()]);
    for line in ["connection sites (usable size)", "slack in pages", "= user space", "measured (slab growth", "per connection: user space"] {
        assert!(table.contains(line), "no `{line}` in\n{table}");
    }
    drop(clients);
}
