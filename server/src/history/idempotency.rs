//! Idempotency keys on one node (memory registry): the reply to the first publish with a
//! key, remembered for `--idempotency-window`, so that a retry gets the same reply and
//! publishes nothing. On Redis the same record is written by the script that appends
//! the message, per stream, so it holds on every node.
//!
//! At most [`MAX_KEYS`] keys are remembered; past that the oldest are forgotten first.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pushline_alloc::Site;

/// Most keys remembered at once (about 200 bytes each).
pub const MAX_KEYS: usize = 100_000;
/// Longest key a publisher may send.
pub const MAX_KEY_BYTES: usize = 255;

enum State {
    /// The first request is still publishing.
    Pending,
    /// Its reply.
    Done(String),
}

struct Table {
    entries: HashMap<Arc<str>, State>,
    /// Keys in the order they were first seen, with when.
    order: VecDeque<(Instant, Arc<str>)>,
}

pub struct Idempotency {
    window: Duration,
    table: Mutex<Table>,
}

/// What a request with a key finds.
pub enum Claim<'a> {
    /// The first with this key: publish, then [`Claimed::done`] with the reply (dropped
    /// without it, the key is released so a retry publishes).
    First(Claimed<'a>),
    /// A request with this key is publishing right now.
    InProgress,
    /// Answered before: this is the reply.
    Done(String),
}

pub struct Claimed<'a> {
    table: &'a Idempotency,
    key: Arc<str>,
    done: bool,
}

/// Checks a key as sent in `Idempotency-Key`.
pub fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > MAX_KEY_BYTES || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!("Idempotency-Key must be 1 to {MAX_KEY_BYTES} printable ASCII characters"));
    }
    Ok(())
}

impl Idempotency {
    pub fn new(window: Duration) -> Idempotency {
        Idempotency { window, table: Mutex::new(Table { entries: HashMap::new(), order: VecDeque::new() }) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `key` is scoped by the caller (the API key's name and the header's value).
    pub fn claim(&self, key: &str) -> Claim<'_> {
        let _site = Site::History.enter();
        let mut table = self.lock();
        let now = Instant::now();
        while let Some((at, _)) = table.order.front() {
            if now.duration_since(*at) < self.window && table.order.len() < MAX_KEYS {
                break;
            }
            if let Some((_, old)) = table.order.pop_front() {
                table.entries.remove(&old);
            }
        }
        match table.entries.get(key) {
            Some(State::Pending) => Claim::InProgress,
            Some(State::Done(reply)) => Claim::Done(reply.clone()),
            None => {
                let key: Arc<str> = key.into();
                table.entries.insert(key.clone(), State::Pending);
                table.order.push_back((now, key.clone()));
                Claim::First(Claimed { table: self, key, done: false })
            }
        }
    }
}

impl Claimed<'_> {
    pub fn done(mut self, reply: &str) {
        let _site = Site::History.enter();
        if let Some(state) = self.table.lock().entries.get_mut(&self.key) {
            *state = State::Done(reply.to_owned());
        }
        self.done = true;
    }
}

impl Drop for Claimed<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.table.lock().entries.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_answers_its_first_reply_and_a_failure_releases_it() {
        let table = Idempotency::new(Duration::from_secs(60));
        let Claim::First(first) = table.claim("k") else { panic!("first") };
        assert!(matches!(table.claim("k"), Claim::InProgress));
        drop(first);
        let Claim::First(second) = table.claim("k") else { panic!("released after a failure") };
        second.done("{\"id\":\"1\"}");
        assert!(matches!(table.claim("k"), Claim::Done(reply) if reply == "{\"id\":\"1\"}"));
        assert!(check_key("a b").is_err());
        assert!(check_key(&"x".repeat(256)).is_err());
    }
}
