//! The allocator's own view of memory: jemalloc statistics.
//!
//! This module and `lib.rs` (which installs jemalloc) are the only places that know
//! which allocator runs.

use serde::Serialize;
use tikv_jemalloc_ctl::{epoch, stats};

/// jemalloc's counters, in bytes, as of one epoch.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct JemallocStats {
    /// Bytes the program asked for and has not freed.
    pub allocated: u64,
    /// Bytes in pages holding live allocations (allocated + the unused space in them).
    pub active: u64,
    /// Bytes jemalloc has resident: active pages, dirty pages kept for reuse, metadata.
    pub resident: u64,
    pub mapped: u64,
    /// Virtual memory kept mapped but returned to the OS.
    pub retained: u64,
    pub metadata: u64,
}

impl JemallocStats {
    /// Reads fresh statistics (advancing jemalloc's epoch refreshes its cached totals).
    pub fn read() -> Result<JemallocStats, String> {
        epoch::advance().map_err(|e| format!("jemalloc epoch: {e}"))?;
        let read = |r: tikv_jemalloc_ctl::Result<usize>, name: &str| r.map(|v| v as u64).map_err(|e| format!("jemalloc {name}: {e}"));
        Ok(JemallocStats {
            allocated: read(stats::allocated::read(), "allocated")?,
            active: read(stats::active::read(), "active")?,
            resident: read(stats::resident::read(), "resident")?,
            mapped: read(stats::mapped::read(), "mapped")?,
            retained: read(stats::retained::read(), "retained")?,
            metadata: read(stats::metadata::read(), "metadata")?,
        })
    }

    /// active / allocated: 1.0 means no space lost inside pages.
    pub fn fragmentation(&self) -> f64 {
        if self.allocated == 0 {
            1.0
        } else {
            self.active as f64 / self.allocated as f64
        }
    }
}
