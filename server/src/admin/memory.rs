//! `/debug/memory` and `/debug/objects`: where the bytes are, and what is alive (the
//! talk's `lgcstat`, for this server).

use serde::Serialize;
use serde_json::json;

use super::Admin;
use crate::alloc::sites::{self, Site};
use crate::alloc::JemallocStats;

/// Sites whose memory grows with the number of connections.
pub const CONNECTION_SITES: [Site; 4] = [Site::ConnectionTask, Site::Sessions, Site::OutboundQueue, Site::Topics];

/// Kernel-side buffer accounting of this process's sockets (SO_MEMINFO), summed.
#[derive(Default, Serialize)]
pub struct SocketMemory {
    pub sockets: u64,
    pub rmem_alloc: u64,
    pub rcvbuf: u64,
    pub wmem_alloc: u64,
    pub sndbuf: u64,
    pub fwd_alloc: u64,
    pub wmem_queued: u64,
    pub optmem: u64,
    pub backlog: u64,
    pub drops: u64,
}

impl SocketMemory {
    /// Bytes the kernel holds for these sockets' data: receive and send queues and
    /// forward-allocated space.
    pub fn buffered(&self) -> u64 {
        self.rmem_alloc + self.wmem_queued + self.fwd_alloc + self.optmem
    }
}

/// Reads SO_MEMINFO for every socket this process has open.
pub fn socket_memory() -> SocketMemory {
    let mut total = SocketMemory::default();
    let Ok(fds) = std::fs::read_dir("/proc/self/fd") else { return total };
    for entry in fds.flatten() {
        let is_socket = std::fs::read_link(entry.path()).is_ok_and(|t| t.to_string_lossy().starts_with("socket:"));
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        if !is_socket {
            continue;
        }
        let mut info = [0u32; 9];
        let mut len = std::mem::size_of_val(&info) as libc::socklen_t;
        // SAFETY: `info` is writable for `len` bytes; a closed or reused fd only makes
        // getsockopt fail or describe another socket, both harmless here.
        let ok = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_MEMINFO, info.as_mut_ptr().cast(), &mut len) } == 0;
        if !ok {
            continue;
        }
        total.sockets += 1;
        let [rmem_alloc, rcvbuf, wmem_alloc, sndbuf, fwd_alloc, wmem_queued, optmem, backlog, drops] = info.map(u64::from);
        total.rmem_alloc += rmem_alloc;
        total.rcvbuf += rcvbuf;
        total.wmem_alloc += wmem_alloc;
        total.sndbuf += sndbuf;
        total.fwd_alloc += fwd_alloc;
        total.wmem_queued += wmem_queued;
        total.optmem += optmem;
        total.backlog += backlog;
        total.drops += drops;
    }
    total
}

/// This process's resident set, from /proc/self/statm.
pub fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(0) as u64
}

/// The `TCP:` line of /proc/net/sockstat (machine-wide; `mem` is in pages).
fn sockstat() -> serde_json::Value {
    let text = std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    let Some(line) = text.lines().find(|l| l.starts_with("TCP:")) else { return json!(null) };
    let words: Vec<&str> = line.split_whitespace().skip(1).collect();
    let mut map = serde_json::Map::new();
    for pair in words.chunks(2) {
        if let [k, v] = pair {
            map.insert((*k).to_owned(), json!(v.parse::<u64>().unwrap_or(0)));
        }
    }
    serde_json::Value::Object(map)
}

pub fn memory(admin: &Admin) -> serde_json::Value {
    let connections = admin.hub.total_connections() as u64;
    let per = |bytes: f64| if connections == 0 { json!(null) } else { json!((bytes / connections as f64).round()) };
    let jemalloc = JemallocStats::read().ok();
    let sites = sites::snapshot();
    let connection_site_bytes: i64 = CONNECTION_SITES.iter().map(|s| sites[*s as usize].live_bytes).sum();
    let sockets = socket_memory();
    let rss = rss_bytes();
    json!({
        "connections": {
            "ws": admin.hub.connections(crate::conn::wire::Transport::WebSocket),
            "sse": admin.hub.connections(crate::conn::wire::Transport::Sse),
            "total": connections,
        },
        "process": { "rss_bytes": rss },
        "jemalloc": jemalloc.map(|j| json!({
            "allocated": j.allocated, "active": j.active, "resident": j.resident,
            "mapped": j.mapped, "retained": j.retained, "metadata": j.metadata,
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
            "tcp_sockstat": sockstat(),
        },
        "per_connection": {
            "sites": CONNECTION_SITES.iter().map(|s| (s.name().to_owned(), per(sites[*s as usize].live_bytes as f64))).collect::<serde_json::Map<_, _>>(),
            "connection_sites_total": per(connection_site_bytes as f64),
            "jemalloc_allocated": jemalloc.map_or(json!(null), |j| per(j.allocated as f64)),
            "rss": per(rss as f64),
            "kernel_socket_buffers": per(sockets.buffered() as f64),
        },
    })
}

pub fn objects(admin: &Admin) -> serde_json::Value {
    let objects = admin.hub.objects();
    let runtime = admin.runtime.metrics();
    json!({
        "connections": objects.connections,
        "sessions": objects.uids,
        "topics": objects.topics,
        "subscriptions": objects.subscriptions,
        "queued_messages": objects.queued_messages,
        "tasks": runtime.num_alive_tasks(),
        "workers": runtime.num_workers(),
    })
}
