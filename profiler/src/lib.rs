//! Always-on CPU profiling that costs almost nothing to keep.
//!
//! Every thread of the process is sampled at a low rate (`hz`, 19 by default) by a timer
//! on its own CPU clock ([`sampler`]); the signal handler records the interrupted stack
//! from frame pointers ([`signal`]); samples are kept as per-minute counts of interned
//! stacks for a window of the past ([`table`]), and written as pprof's profile.proto
//! ([`pprof`]). A burst (`?seconds=N` at a higher rate) raises the same timers for its
//! duration: there is one collector. Nothing is symbolized here: names come from the
//! binary on disk, outside the server.

pub mod pprof;
mod sampler;
pub mod signal;
pub mod table;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pushline_alloc::Site;
use table::{Count, Samples, Stack, Table};

/// What the profiler keeps and how often it samples.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Samples per second of each thread's CPU time; 0: off (bursts still work).
    pub hz: u32,
    /// Minutes of the past kept.
    pub window_minutes: u64,
    /// Frames the stack table holds; past it, samples count as `[stack table full]`.
    pub max_frames: usize,
}

/// Counters of the profiler itself.
#[derive(Default)]
pub struct Stats {
    /// Samples from a thread that ended before they were drained.
    pub unknown_thread: AtomicU64,
}

/// What a running burst has counted, by stack.
type Burst = HashMap<Option<Stack>, Count>;

pub struct Shared {
    base_hz: u32,
    burst_hz: AtomicU32,
    table: Mutex<Table>,
    burst: Mutex<Option<Burst>>,
    stopping: AtomicBool,
    pub stats: Stats,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn hz(&self) -> u32 {
        self.base_hz.max(self.burst_hz.load(Ordering::Relaxed))
    }

    fn lock_table(&self) -> MutexGuard<'_, Table> {
        lock(&self.table)
    }

    fn lock_burst(&self) -> MutexGuard<'_, Option<Burst>> {
        lock(&self.burst)
    }
}

/// How soon a sample is in the table (or a burst) after it was taken.
pub const DRAINED_WITHIN: Duration = Duration::from_millis(150);

pub fn unix_minute() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() / 60)
}

pub struct Profiler {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// A burst in progress; dropped without [`Profiler::finish`] (its client hung up), it ends.
pub struct BurstGuard<'a> {
    profiler: &'a Profiler,
    started: SystemTime,
}

impl Drop for BurstGuard<'_> {
    fn drop(&mut self) {
        self.profiler.shared.burst_hz.store(0, Ordering::Relaxed);
        *self.profiler.shared.lock_burst() = None;
    }
}

/// What [`Profiler::stats`] reports.
pub struct Report {
    pub taken: u64,
    pub dropped_ring_full: u64,
    pub dropped_thread_ended: u64,
    pub overflowed: u64,
    pub frames: usize,
    pub max_frames: usize,
}

impl Profiler {
    /// Installs the handler and starts sampling every thread of the process.
    pub fn start(settings: Settings) -> std::io::Result<Profiler> {
        signal::install()?;
        let shared = Arc::new(Shared {
            base_hz: settings.hz,
            burst_hz: AtomicU32::new(0),
            table: Mutex::new(Site::Profiler.scope(|| Table::new(settings.max_frames, settings.window_minutes))),
            burst: Mutex::new(None),
            stopping: AtomicBool::new(false),
            stats: Stats::default(),
        });
        let running = shared.clone();
        let thread = std::thread::Builder::new()
            .name("pushline-profiler".into())
            .spawn(move || Site::Profiler.scope(|| sampler::run(running)))?;
        Ok(Profiler { shared, thread: Some(thread) })
    }

    /// Starts a burst at `hz`; None while another runs.
    pub fn start_burst(&self, hz: u32) -> Option<BurstGuard<'_>> {
        let mut burst = self.shared.lock_burst();
        if burst.is_some() {
            return None;
        }
        *burst = Some(HashMap::new());
        self.shared.burst_hz.store(hz, Ordering::Relaxed);
        Some(BurstGuard { profiler: self, started: SystemTime::now() })
    }

    /// What the burst counted, and how long it ran. Samples recorded in the last
    /// [`DRAINED_WITHIN`] may not be drained yet: wait that long before calling.
    pub fn finish(&self, burst: BurstGuard<'_>) -> (Samples, Duration) {
        let counts = self.shared.lock_burst().take().unwrap_or_default();
        let took = burst.started.elapsed().unwrap_or_default();
        drop(burst);
        (self.shared.lock_table().named(counts.into_iter()), took)
    }

    /// What the minutes `from..=to` (Unix minutes) counted.
    pub fn window(&self, from: u64, to: u64) -> Samples {
        self.shared.lock_table().span(from, to)
    }

    /// Minutes of the past kept.
    pub fn window_minutes(&self) -> u64 {
        self.shared.lock_table().window_minutes()
    }

    /// The oldest minute kept, if any.
    pub fn oldest(&self) -> Option<u64> {
        self.shared.lock_table().oldest()
    }

    pub fn base_hz(&self) -> u32 {
        self.shared.base_hz
    }

    pub fn stats(&self) -> Report {
        let table = self.shared.lock_table();
        let (frames, max_frames) = table.fill();
        Report {
            taken: signal::RING.taken.load(Ordering::Relaxed),
            dropped_ring_full: signal::RING.dropped_full.load(Ordering::Relaxed),
            dropped_thread_ended: self.shared.stats.unknown_thread.load(Ordering::Relaxed),
            overflowed: table.overflowed,
            frames,
            max_frames,
        }
    }
}

impl Drop for Profiler {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
