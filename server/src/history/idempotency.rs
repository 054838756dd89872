//! Idempotency keys: the reply to the first publish with a key, remembered for
//! `--idempotency-window`, so that a retry gets the same reply and publishes nothing; a
//! key reused with a different request (another route or body) is refused, never
//! answered with the first request's reply.
//!
//! Keys belong to the API key that sent them (its holder): one holder's keys never
//! collide with, nor evict, another's. On one node (memory registry) each holder keeps at
//! most `--idempotency-max-keys`; past that its own oldest are forgotten first. On Redis
//! the same record is written by the script that appends the message, per stream, so it
//! holds on every node, and expires with the window.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pushline_alloc::Site;

/// Longest key a publisher may send.
pub const MAX_KEY_BYTES: usize = 255;
/// What a key must be, as a refusal says it.
pub const KEY_RULE: &str = "Idempotency-Key must be 1 to 255 printable ASCII characters";

/// An `Idempotency-Key` as one holder sent it with one request.
pub struct Key {
    /// The API key's name ("" in open mode).
    holder: String,
    /// The holder, and the header's value.
    pub scoped: String,
    /// What the request was: its route and body, hashed (16 hex digits).
    pub fingerprint: String,
}

impl Key {
    /// Checks `key` as sent in `Idempotency-Key` by the holder `holder` with a request to
    /// `route` carrying `body`.
    pub fn new(holder: &str, key: &str, route: &str, body: &[u8]) -> Result<Key, String> {
        if key.is_empty() || key.len() > MAX_KEY_BYTES || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(KEY_RULE.to_owned());
        }
        let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
        digest.update(route.as_bytes());
        digest.update(&[0]);
        digest.update(body);
        let fingerprint = crate::wire::hex(&digest.finish().as_ref()[..8]);
        Ok(Key { holder: holder.to_owned(), scoped: format!("{holder}/{key}"), fingerprint })
    }

    /// What a store keeps under the key: the fingerprint, then `value` (an id, a reply).
    pub fn record(&self, value: &str) -> String {
        format!("{}|{value}", self.fingerprint)
    }

    /// The `record` of message id `id`, written at the end of `out`.
    pub fn write_record(&self, id: u64, out: &mut Vec<u8>) {
        use std::io::Write;
        // Into a Vec in memory: it cannot fail.
        let _ = write!(out, "{}|{id}", self.fingerprint);
    }

    /// The value of a `record` of this key, or None when it was made by another request.
    /// A record without a fingerprint (written before they were kept) is taken as is.
    pub fn read<'r>(&self, record: &'r str) -> Option<&'r str> {
        match record.split_once('|') {
            Some((fingerprint, value)) if fingerprint.len() == 16 && fingerprint.bytes().all(|b| b.is_ascii_hexdigit()) => {
                (fingerprint == self.fingerprint).then_some(value)
            }
            _ => Some(record),
        }
    }
}

enum State {
    /// The first request is still publishing.
    Pending,
    /// Its reply.
    Done(String),
}

struct Entry {
    fingerprint: String,
    state: State,
}

/// One holder's keys.
#[derive(Default)]
struct Table {
    entries: HashMap<Arc<str>, Entry>,
    /// Keys in the order they were first seen, with when.
    order: VecDeque<(Instant, Arc<str>)>,
}

pub struct Idempotency {
    window: Duration,
    max_keys_per_holder: usize,
    holders: Mutex<HashMap<Box<str>, Table>>,
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
    /// The key was used with another request.
    Mismatch,
}

pub struct Claimed<'a> {
    table: &'a Idempotency,
    holder: Box<str>,
    key: Arc<str>,
    done: bool,
}

impl Idempotency {
    pub fn new(window: Duration, max_keys_per_holder: usize) -> Idempotency {
        Idempotency { window, max_keys_per_holder: max_keys_per_holder.max(1), holders: Mutex::new(HashMap::new()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Box<str>, Table>> {
        self.holders.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn claim(&self, key: &Key) -> Claim<'_> {
        let _site = Site::History.enter();
        let mut holders = self.lock();
        let holder = key.holder.as_str();
        let table = match holders.get_mut(holder) {
            Some(table) => table,
            None => holders.entry(holder.into()).or_default(),
        };
        let now = Instant::now();
        while let Some((at, _)) = table.order.front() {
            if now.duration_since(*at) < self.window && table.order.len() < self.max_keys_per_holder {
                break;
            }
            if let Some((_, old)) = table.order.pop_front() {
                table.entries.remove(&old);
            }
        }
        match table.entries.get(key.scoped.as_str()) {
            Some(entry) if entry.fingerprint != key.fingerprint => Claim::Mismatch,
            Some(Entry { state: State::Pending, .. }) => Claim::InProgress,
            Some(Entry { state: State::Done(reply), .. }) => Claim::Done(reply.clone()),
            None => {
                let scoped: Arc<str> = key.scoped.as_str().into();
                table.entries.insert(scoped.clone(), Entry { fingerprint: key.fingerprint.clone(), state: State::Pending });
                table.order.push_back((now, scoped.clone()));
                Claim::First(Claimed { table: self, holder: holder.into(), key: scoped, done: false })
            }
        }
    }

    fn with_entry(&self, holder: &str, key: &str, f: impl FnOnce(&mut Table, &str)) {
        let mut holders = self.lock();
        if let Some(table) = holders.get_mut(holder) {
            f(table, key);
            if table.entries.is_empty() {
                holders.remove(holder);
            }
        }
    }
}

impl Claimed<'_> {
    pub fn done(mut self, reply: &str) {
        let _site = Site::History.enter();
        self.table.with_entry(&self.holder, &self.key, |table, key| {
            if let Some(entry) = table.entries.get_mut(key) {
                entry.state = State::Done(reply.to_owned());
            }
        });
        self.done = true;
    }
}

impl Drop for Claimed<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.table.with_entry(&self.holder, &self.key, |table, key| {
                table.entries.remove(key);
                table.order.retain(|(_, k)| **k != *key);
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(holder: &str, key: &str, body: &str) -> Key {
        Key::new(holder, key, "/v1/publish", body.as_bytes()).unwrap()
    }

    #[test]
    fn a_key_answers_its_first_reply_and_a_failure_releases_it() {
        let table = Idempotency::new(Duration::from_secs(60), 10);
        let k = key("billing", "k", "{}");
        let Claim::First(first) = table.claim(&k) else { panic!("first") };
        assert!(matches!(table.claim(&k), Claim::InProgress));
        drop(first);
        let Claim::First(second) = table.claim(&k) else { panic!("released after a failure") };
        second.done("{\"id\":\"1\"}");
        assert!(matches!(table.claim(&k), Claim::Done(reply) if reply == "{\"id\":\"1\"}"));
        assert!(Key::new("", "a b", "/v1/push", b"").is_err());
        assert!(Key::new("", &"x".repeat(256), "/v1/push", b"").is_err());
    }

    #[test]
    fn another_request_with_the_same_key_is_a_mismatch() {
        let table = Idempotency::new(Duration::from_secs(60), 10);
        let Claim::First(first) = table.claim(&key("h", "k", r#"{"a":1}"#)) else { panic!() };
        first.done("{}");
        assert!(matches!(table.claim(&key("h", "k", r#"{"a":2}"#)), Claim::Mismatch));
        let other_route = Key::new("h", "k", "/v1/broadcast", br#"{"a":1}"#).unwrap();
        assert!(matches!(table.claim(&other_route), Claim::Mismatch));
        let k = key("h", "k", r#"{"a":1}"#);
        assert_eq!(k.read(&k.record("7")), Some("7"));
        assert_eq!(k.read(&key("h", "k", "x").record("7")), None);
        assert_eq!(k.read("7"), Some("7"), "a record from before fingerprints");
    }

    #[test]
    fn a_holder_evicts_only_its_own_keys() {
        let table = Idempotency::new(Duration::from_secs(60), 3);
        let Claim::First(mine) = table.claim(&key("a", "mine", "{}")) else { panic!() };
        mine.done("{\"first\":1}");
        for i in 0..10 {
            let Claim::First(theirs) = table.claim(&key("b", &i.to_string(), "{}")) else { panic!() };
            theirs.done("{}");
        }
        assert!(matches!(table.claim(&key("a", "mine", "{}")), Claim::Done(_)), "b's keys did not evict a's");
        let Claim::First(again) = table.claim(&key("b", "0", "{}")) else { panic!("b's own oldest went first") };
        again.done("{}");
    }
}
