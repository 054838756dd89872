//! jemalloc's side of the story: its statistics, its start-up options, and its sampling
//! heap profiler, which stays on in production.

use std::ffi::c_char;

use serde::{Deserialize, Serialize};
use tikv_jemalloc_ctl::{epoch, stats};

/// jemalloc's counters, in bytes, as of one epoch.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
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
    /// Freed blocks the threads' caches hold for reuse: still `allocated` to jemalloc.
    pub tcache: u64,
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
            // SAFETY: "stats.arenas.<i>.tcache_bytes" is a size_t; 4096 is MALLCTL_ARENAS_ALL.
            tcache: read(unsafe { tikv_jemalloc_ctl::raw::read::<usize>(b"stats.arenas.4096.tcache_bytes\0") }, "tcache_bytes")?,
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

#[repr(transparent)]
pub struct MallocConf(*const c_char);

// SAFETY: the pointer is to a static, immutable, NUL-terminated C string; sharing it
// between threads shares only reads.
unsafe impl Sync for MallocConf {}

/// jemalloc reads its options from this symbol at start (`_RJEM_MALLOC_CONF` in the
/// environment adds to them). Heap profiling is on from the first allocation, sampling
/// one allocation per 512 KiB allocated on average (`lg_prof_sample:19`): cheap enough
/// to leave on in production. A background thread returns freed pages to the kernel
/// after the decay time (10 s) even when the server is idle: without it, purging waits
/// for allocation activity, and what a burst or an attack took stays resident.
#[export_name = "_rjem_malloc_conf"]
pub static MALLOC_CONF: MallocConf = MallocConf(c"prof:true,prof_active:true,lg_prof_sample:19,background_thread:true".as_ptr());

/// Returns every arena's unused dirty pages to the kernel now, instead of after the
/// decay time: what RSS is without the allocator's caches.
pub fn purge() -> Result<(), String> {
    // MALLCTL_ARENAS_ALL (4096) names every arena.
    // SAFETY: "arena.<i>.purge" is a void control: it takes no old or new value, and
    // jemalloc refuses (EPERM) any pointer given.
    let status = unsafe {
        tikv_jemalloc_sys::mallctl(c"arena.4096.purge".as_ptr(), std::ptr::null_mut(), std::ptr::null_mut(), std::ptr::null_mut(), 0)
    };
    match status {
        0 => Ok(()),
        errno => Err(format!("jemalloc purge: {}", std::io::Error::from_raw_os_error(errno))),
    }
}

/// A heap profile of live memory, sampled, as gzipped profile.proto: raw addresses (file
/// offsets) and the mappings they are in, named later by [`crate::symbolize`], out of process.
pub async fn heap_profile_pprof() -> Result<Vec<u8>, String> {
    let ctl = jemalloc_pprof::PROF_CTL.as_ref().ok_or("jemalloc heap profiling is not enabled (prof:false)")?;
    let mut ctl = ctl.lock().await;
    ctl.dump_pprof().map_err(|e| format!("heap profile: {e}"))
}
