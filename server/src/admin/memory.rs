//! `/debug/memory` and `/debug/objects`: where the bytes are, and what is alive (the
//! talk's `lgcstat`, for this server).

use pushline_alloc::jemalloc::JemallocStats;
use pushline_alloc::process::Resident;
use pushline_alloc::socket::{SocketMemory, SocketSlabs, TcpSockstat};
use pushline_alloc::{table, Site};
use serde_json::json;
use strum::VariantArray;

use super::Admin;
use crate::wire::Transport;

/// Every socket's SO_MEMINFO is read: a cost that grows with connections (about 8 ms per
/// 1,000 sockets), fine when asked for, not for polling (see `/debug/stats`).
pub fn memory(admin: &Admin) -> serde_json::Value {
    memory_with(admin, SocketMemory::of_this_process())
}

/// As [`memory`], with the sockets' memory already read (in full or as a sample).
pub fn memory_with(admin: &Admin, sockets: SocketMemory) -> serde_json::Value {
    let connections = admin.hub.total_connections() as u64;
    let per = |bytes: f64| if connections == 0 { json!(null) } else { json!((bytes / connections as f64).round()) };
    let jemalloc = JemallocStats::read().ok();
    let sites = table::snapshot();
    let connection_site_bytes: i64 = Site::PER_CONNECTION.iter().map(|s| sites[*s as usize].live_bytes).sum();
    let rss = Resident::myself();
    let slabs = SocketSlabs::read();
    let mut by_transport: serde_json::Map<String, serde_json::Value> =
        Transport::VARIANTS.iter().map(|t| (t.as_str().to_owned(), json!(admin.hub.connections(*t)))).collect();
    by_transport.insert("total".into(), json!(connections));
    json!({
        "connections": by_transport,
        "process": { "rss_bytes": rss.rss, "anon_bytes": rss.anon, "file_bytes": rss.file },
        "at_start": pushline_alloc::baseline::get(),
        "site_tracking": pushline_alloc::allocator::tracking_enabled(),
        "jemalloc": jemalloc.map(|j| json!({
            "allocated": j.allocated, "active": j.active, "resident": j.resident,
            "mapped": j.mapped, "retained": j.retained, "metadata": j.metadata, "tcache": j.tcache,
            "fragmentation": j.fragmentation(),
        })),
        "sites": sites.iter().map(|s| json!({
            "site": s.site,
            "live_bytes": s.live_bytes,
            "live_allocs": s.live_allocs,
            "total_allocs": s.total_allocs,
            "total_bytes": s.total_bytes,
        })).collect::<Vec<_>>(),
        "kernel": {
            "process_sockets": sockets,
            "tcp_sockstat": TcpSockstat::read(),
            "socket_slabs": slabs,
        },
        "per_connection": {
            "sites": Site::PER_CONNECTION.iter().map(|s| (s.name().to_owned(), per(sites[*s as usize].live_bytes as f64))).collect::<serde_json::Map<_, _>>(),
            "connection_sites_total": per(connection_site_bytes as f64),
            "jemalloc_allocated": jemalloc.map_or(json!(null), |j| per(j.allocated as f64)),
            "rss": per(rss.rss as f64),
            // Per socket read, which is per connection but for the few listening sockets.
            "kernel_socket_buffers": sockets.buffered_per_socket().map(f64::round),
            // One object of each socket slab cache per connection, at its object size: the
            // model (null without read access to /proc/slabinfo).
            "kernel_socket_structs": slabs.as_ref().map(SocketSlabs::bytes_per_socket),
        },
    })
}

pub fn objects(admin: &Admin) -> serde_json::Value {
    let counts = admin.hub.counts();
    let runtime = admin.cores.counts(&admin.runtime);
    json!({
        "connections": counts.connections,
        "sessions": counts.uids,
        "topics": counts.topics,
        "subscriptions": counts.subscriptions,
        "queued_messages": admin.metrics.queued_messages_now.load(std::sync::atomic::Ordering::Relaxed),
        "tasks": runtime.alive_tasks,
        "workers": runtime.workers,
    })
}
