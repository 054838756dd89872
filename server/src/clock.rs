//! The process's monotonic clock in milliseconds, the unit idle deadlines and
//! connection ages are kept in (an `AtomicU64` per connection, not an `Instant`).

use std::sync::OnceLock;
use std::time::Instant;

/// Milliseconds since the process first asked.
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}
