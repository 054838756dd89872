//! The process's memory just before its first connection: what growth is measured from.
//! Recorded once (the first accept calls [`record_once`]); `memory-audit` divides the
//! growth since by the connections held now. Before the first connection the runtime's
//! threads, caches and tables are up, so what grows after is the connections' doing.

use std::sync::OnceLock;

use serde::Serialize;

use crate::jemalloc::JemallocStats;
use crate::process::Resident;
use crate::socket::{SocketSlabs, TcpSockstat};
use crate::table::{self, SiteStats};

#[derive(Clone, Debug, Serialize)]
pub struct Baseline {
    /// Wall clock, milliseconds since the Unix epoch.
    pub time_ms: u64,
    pub process: Resident,
    pub jemalloc: Option<JemallocStats>,
    pub sites: Vec<SiteStats>,
    /// The machine's socket slab caches (readable by root only) and TCP sockets.
    pub socket_slabs: Option<SocketSlabs>,
    pub tcp_sockstat: Option<TcpSockstat>,
}

static BASELINE: OnceLock<Baseline> = OnceLock::new();

/// Records the baseline the first time it is called; after that, one atomic load. The
/// allocator first returns the dirty pages it keeps, so the baseline is what is live
/// (as a reader who purges before measuring sees it), not what the start-up left behind.
pub fn record_once() {
    BASELINE.get_or_init(|| {
        let _ = crate::jemalloc::purge();
        Baseline {
        time_ms: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
        process: Resident::myself(),
        jemalloc: JemallocStats::read().ok(),
        sites: table::snapshot(),
        socket_slabs: SocketSlabs::read(),
        tcp_sockstat: TcpSockstat::read(),
        }
    });
}

/// The baseline, once the first connection came.
pub fn get() -> Option<&'static Baseline> {
    BASELINE.get()
}
