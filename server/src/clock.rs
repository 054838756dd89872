//! The process's monotonic clock in milliseconds, the unit idle deadlines and
//! connection ages are kept in (an `AtomicU64` per connection, not an `Instant`), and
//! its reading as wall-clock time, which cursors are written in.

use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

struct Start {
    instant: Instant,
    /// Wall-clock ms at `instant`.
    wall_ms: u64,
}

fn start() -> &'static Start {
    static START: OnceLock<Start> = OnceLock::new();
    START.get_or_init(|| Start {
        instant: Instant::now(),
        wall_ms: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
    })
}

/// Milliseconds since the process first asked.
pub fn now_ms() -> u64 {
    start().instant.elapsed().as_millis() as u64
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
