//! A circuit breaker in front of the application: after `failures` questions in a row
//! fail, it opens and nothing is asked for `cooldown`; then one question at a time is
//! let through (half open), and the first that succeeds closes it again. While it is
//! open, what would have been asked is refused with a Retry-After of the time left, never
//! admitted unasked.

use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct Breaker {
    failures: u32,
    cooldown: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Failures in a row since the last success.
    failed: u32,
    /// Open until then; None: closed.
    open_until: Option<Instant>,
    /// A question is out while half open.
    probing: bool,
}

/// Whether a question may go to the application.
#[derive(Debug, PartialEq, Eq)]
pub enum Pass {
    Closed,
    /// The one question let through once the cooldown passed.
    Probe,
    /// Refused: ask again in this many seconds.
    Open(u32),
}

impl Breaker {
    pub fn new(failures: u32, cooldown: Duration) -> Breaker {
        Breaker { failures: failures.max(1), cooldown, state: Mutex::new(State::default()) }
    }

    pub fn pass(&self, now: Instant) -> Pass {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match state.open_until {
            None => Pass::Closed,
            Some(until) if now < until => Pass::Open(seconds(until - now)),
            Some(_) if state.probing => Pass::Open(1),
            Some(_) => {
                state.probing = true;
                Pass::Probe
            }
        }
    }

    /// The application answered (200, 401 or 403: it is up).
    pub fn succeeded(&self) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = State::default();
    }

    /// It did not (a timeout, an error, another status). Returns true when this opened
    /// the breaker.
    pub fn failed(&self, now: Instant) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.failed = state.failed.saturating_add(1);
        let opens = state.probing || (state.open_until.is_none() && state.failed >= self.failures);
        if opens {
            state.open_until = Some(now + self.cooldown);
            state.probing = false;
        }
        opens
    }

    pub fn is_open(&self) -> bool {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).open_until.is_some()
    }
}

/// Whole seconds to wait, at least 1.
fn seconds(left: Duration) -> u32 {
    left.as_secs_f64().ceil().max(1.0) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_failures_in_a_row_and_closes_after_a_probe_succeeds() {
        let breaker = Breaker::new(3, Duration::from_secs(5));
        let t0 = Instant::now();
        assert!(!breaker.failed(t0));
        breaker.succeeded();
        assert!(!breaker.failed(t0) && !breaker.failed(t0), "a success starts the count again");
        assert_eq!(breaker.pass(t0), Pass::Closed);
        assert!(breaker.failed(t0), "the third in a row opens it");
        assert_eq!(breaker.pass(t0 + Duration::from_millis(100)), Pass::Open(5));
        let later = t0 + Duration::from_secs(6);
        assert_eq!(breaker.pass(later), Pass::Probe);
        assert_eq!(breaker.pass(later), Pass::Open(1), "one probe at a time");
        assert!(breaker.failed(later), "a failed probe opens it again");
        assert_eq!(breaker.pass(later + Duration::from_secs(1)), Pass::Open(4));
        let again = later + Duration::from_secs(6);
        assert_eq!(breaker.pass(again), Pass::Probe);
        breaker.succeeded();
        assert_eq!(breaker.pass(again), Pass::Closed);
        assert!(!breaker.is_open());
    }
}
