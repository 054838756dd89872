//! The process's monotonic clock in milliseconds, the unit idle deadlines and
//! connection ages are kept in (an `AtomicU64` per connection, not an `Instant`), and
//! its reading as wall-clock time, which cursors are written in.

use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

struct Start {
    instant: Instant,
    /// The coarse clock's reading at `instant`, in ms.
    coarse_ms: u64,
    /// Wall-clock ms at `instant`.
    wall_ms: u64,
}

fn start() -> &'static Start {
    static START: OnceLock<Start> = OnceLock::new();
    START.get_or_init(|| Start {
        instant: Instant::now(),
        coarse_ms: coarse_clock_ms(),
        wall_ms: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
    })
}

/// Milliseconds since the process first asked.
pub fn now_ms() -> u64 {
    start().instant.elapsed().as_millis() as u64
}

/// `now_ms` to within a clock tick (1-4 ms), read without the TSC: for what every client
/// frame stamps (when a connection was last heard from, its command windows), where
/// two precise reads per ping were a measurable part of a heartbeat's user time.
pub fn coarse_ms() -> u64 {
    coarse_clock_ms().saturating_sub(start().coarse_ms)
}

fn coarse_clock_ms() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `now` is a valid timespec to write to; CLOCK_MONOTONIC_COARSE exists on
    // every Linux since 2.6.32 (and is served by the vDSO).
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut now) };
    now.tv_sec as u64 * 1000 + now.tv_nsec as u64 / 1_000_000
}

/// Wall-clock milliseconds since the Unix epoch: what tokens expire in, what message ids
/// and cursors are written in.
pub fn wall_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The wall-clock millisecond of the process clock's `ms`.
pub fn wall_ms_at(ms: u64) -> u64 {
    start().wall_ms + ms
}
