//! History kept in this process, for the memory registry: per stream, its epoch, its
//! last offset and its last `--history-size` messages (the framed messages themselves,
//! shared with the queues that hold them), none older than `--history-ttl`.
//!
//! A publish holds its stream's order lock ([`MemoryHistory::order`]) while it is given
//! an offset and fanned out, so every connection sees a stream's messages in offset order.
//! Over `--history-max-bytes`, the least recently written streams are forgotten (their
//! next message starts a new epoch); so is a topic nobody has listened to for the TTL.
//! With `--history-max-bytes-per-key`, a stream is charged to the API key that last wrote
//! it, and a key over its share forgets its own least recently written streams, so one
//! publisher cannot push every other's mailboxes out of the shared budget.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use pushline_alloc::Site;

use super::read::{select, Found, From};
use super::{id_time_ms, new_epoch, Position, Settings, Stream};
use crate::clock;
use crate::telemetry::{Eviction, Metrics};
use crate::wire::{Message, Transport};

const SHARDS: usize = 64;

/// One stream's history.
struct Kept {
    epoch: u32,
    /// The last offset given out.
    last: u64,
    entries: VecDeque<Arc<Message>>,
    bytes: usize,
    /// Process-clock ms of the last append.
    written_ms: u64,
    /// The API key that last wrote it, charged with its bytes.
    owner: Arc<str>,
}

/// Bytes a kept message holds: both framings (the SSE one as it would be once an SSE
/// client has been sent it) and the message itself.
fn size_of(msg: &Message) -> usize {
    msg.len(Transport::WebSocket) + msg.len(Transport::Sse) + std::mem::size_of::<Message>() + 32
}

pub struct MemoryHistory {
    settings: Settings,
    shards: Box<[Mutex<HashMap<Stream, Kept>>]>,
    order: Box<[tokio::sync::Mutex<()>]>,
    hasher: RandomState,
    messages: AtomicUsize,
    bytes: AtomicUsize,
    streams: AtomicUsize,
    /// Wall-clock ms before which nothing is known: when this process's clock started
    /// (no cursor from this process is older), moved later whenever streams are
    /// forgotten for the budget.
    known_since_ms: std::sync::atomic::AtomicU64,
    /// Bytes charged to each API key, when keys have a share (`--history-max-bytes-per-key`).
    owners: Mutex<HashMap<Arc<str>, usize>>,
    /// The owner of a stream nobody is charged for: shared, so a stream costs no name of
    /// its own when keys have no share.
    unowned: Arc<str>,
    metrics: Arc<Metrics>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Takes `bytes` off what `owner` is charged; an owner charged nothing is dropped.
fn discharge(owners: &mut HashMap<Arc<str>, usize>, owner: &Arc<str>, bytes: usize) {
    if let Some(charged) = owners.get_mut(owner) {
        *charged = charged.saturating_sub(bytes);
        if *charged == 0 {
            owners.remove(owner);
        }
    }
}

impl MemoryHistory {
    pub fn new(settings: Settings, metrics: Arc<Metrics>) -> MemoryHistory {
        MemoryHistory {
            settings,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            order: (0..SHARDS * 4).map(|_| tokio::sync::Mutex::new(())).collect(),
            hasher: RandomState::new(),
            messages: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            streams: AtomicUsize::new(0),
            known_since_ms: clock::wall_ms_at(0).into(),
            owners: Mutex::new(HashMap::new()),
            unowned: "".into(),
            metrics,
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    fn shard(&self, stream: &Stream) -> MutexGuard<'_, HashMap<Stream, Kept>> {
        lock(&self.shards[(self.hasher.hash_one(stream) >> 58) as usize % SHARDS])
    }

    /// The lock a publish to `stream` holds from its offset to the end of its fan-out.
    pub async fn order(&self, stream: &Stream) -> tokio::sync::MutexGuard<'_, ()> {
        self.order[self.hasher.hash_one(stream) as usize % self.order.len()].lock().await
    }

    /// Gives the next message of `stream` its position and keeps it; `frame` makes the
    /// message once its position is known (None: the stream keeps no history, or it is a
    /// topic nobody has listened to for the TTL, `listened` false).
    /// `publisher` is the API key's name ("" in open mode).
    pub fn append(&self, stream: &Stream, listened: bool, publisher: &str, frame: impl FnOnce(Option<Position>) -> Arc<Message>) -> Arc<Message> {
        if !self.settings.keeps(stream) {
            return frame(None);
        }
        let now = clock::now_ms();
        let _site = Site::History.enter();
        let mut shard = self.shard(stream);
        if !listened {
            if let Some(kept) = shard.remove(stream) {
                self.forget(&kept);
                self.metrics.evicted(Eviction::NoListener, 1);
                self.update_gauges();
            }
            return frame(None);
        }
        // Looked up before inserting: a stream is nearly always there already, and the
        // entry API would take a clone of its name for every append.
        if !shard.contains_key(stream) {
            self.streams.fetch_add(1, Ordering::Relaxed);
            let kept = Kept { epoch: new_epoch(), last: 0, entries: VecDeque::new(), bytes: 0, written_ms: now, owner: self.unowned.clone() };
            shard.insert(stream.clone(), kept);
        }
        let Some(kept) = shard.get_mut(stream) else { unreachable!("inserted above, under the shard's lock") };
        let charged_before = kept.bytes;
        kept.last += 1;
        kept.written_ms = now;
        let msg = frame(Some(Position { key: stream.key(), epoch: kept.epoch, offset: kept.last }));
        let size = size_of(&msg);
        kept.entries.push_back(msg.clone());
        kept.bytes += size;
        let (mut gone, mut gone_bytes) = (0, 0);
        // The new message's id carries the wall clock it was made at: now, read once.
        let oldest_kept_ms = id_time_ms(msg.id).saturating_sub(self.settings.ttl.as_millis() as u64);
        while kept.entries.len() > self.settings.size || kept.entries.front().is_some_and(|m| id_time_ms(m.id) < oldest_kept_ms) {
            let Some(old) = kept.entries.pop_front() else { break };
            gone += 1;
            gone_bytes += size_of(&old);
        }
        kept.bytes -= gone_bytes;
        let charged = (self.settings.max_bytes_per_publisher > 0).then(|| {
            // The last writer is charged with the whole stream.
            let mut owners = lock(&self.owners);
            discharge(&mut owners, &kept.owner, charged_before);
            if *kept.owner != *publisher {
                kept.owner = owners.get_key_value(publisher).map_or_else(|| publisher.into(), |(owner, _)| owner.clone());
            }
            let charged = owners.entry(kept.owner.clone()).or_default();
            *charged += kept.bytes;
            *charged
        });
        drop(shard);
        self.messages.fetch_add(1, Ordering::Relaxed);
        self.messages.fetch_sub(gone, Ordering::Relaxed);
        self.bytes.fetch_add(size, Ordering::Relaxed);
        let total = self.bytes.fetch_sub(gone_bytes, Ordering::Relaxed) - gone_bytes;
        if charged.is_some_and(|charged| charged > self.settings.max_bytes_per_publisher) {
            self.evict_publisher(publisher);
        }
        if total > self.settings.max_bytes {
            self.evict_for_budget();
        }
        // At once, not at the next expiry pass: megabytes held should not read as 0.
        self.update_gauges();
        msg
    }

    fn forget(&self, kept: &Kept) {
        self.messages.fetch_sub(kept.entries.len(), Ordering::Relaxed);
        self.bytes.fetch_sub(kept.bytes, Ordering::Relaxed);
        self.streams.fetch_sub(1, Ordering::Relaxed);
        if self.settings.max_bytes_per_publisher > 0 {
            discharge(&mut lock(&self.owners), &kept.owner, kept.bytes);
        }
    }

    /// Forgets `publisher`'s least recently written streams until it is at 90% of its share.
    fn evict_publisher(&self, publisher: &str) {
        let target = self.settings.max_bytes_per_publisher / 10 * 9;
        let charged = || lock(&self.owners).get(publisher).copied().unwrap_or(0);
        let evicted = self.evict_oldest(|kept| *kept.owner == *publisher, || charged() <= target);
        if evicted > 0 {
            self.metrics.evicted(Eviction::PublisherShare, evicted);
        }
    }

    /// Forgets the least recently written streams until the history is at 90% of its budget.
    fn evict_for_budget(&self) {
        let target = self.settings.max_bytes / 10 * 9;
        let evicted = self.evict_oldest(|_| true, || self.bytes.load(Ordering::Relaxed) <= target);
        if evicted > 0 {
            self.metrics.evicted(Eviction::Budget, evicted);
            tracing::warn!(evicted, max_bytes = self.settings.max_bytes, "history over --history-max-bytes: forgot the least recently written streams");
        }
    }

    /// Forgets the least recently written of the streams `chosen` picks, a twentieth of
    /// them at a time, oldest first, until `enough`; returns how many went.
    fn evict_oldest(&self, chosen: impl Fn(&Kept) -> bool, enough: impl Fn() -> bool) -> usize {
        let mut ages: Vec<u64> = Vec::new();
        for shard in self.shards.iter() {
            ages.extend(lock(shard).values().filter(|k| chosen(k)).map(|k| k.written_ms));
        }
        ages.sort_unstable();
        let mut evicted = 0;
        for cut in ages.iter().step_by((ages.len() / 20).max(1)) {
            if enough() {
                break;
            }
            for shard in self.shards.iter() {
                lock(shard).retain(|_, kept| {
                    let keep = !chosen(kept) || kept.written_ms > *cut;
                    if !keep {
                        self.forget(kept);
                        evicted += 1;
                    }
                    keep
                });
            }
        }
        if evicted > 0 {
            self.known_since_ms.fetch_max(clock::wall_ms_at(clock::now_ms()), Ordering::Relaxed);
        }
        evicted
    }

    /// Forgets streams not written for the TTL: every message in them has aged out.
    pub fn expire(&self) {
        let idle_before = clock::now_ms().saturating_sub(self.settings.ttl.as_millis() as u64);
        for shard in self.shards.iter() {
            lock(shard).retain(|_, kept| {
                let keep = kept.written_ms >= idle_before;
                if !keep {
                    self.forget(kept);
                }
                keep
            });
        }
        self.update_gauges();
    }

    pub fn update_gauges(&self) {
        let values = [&self.messages, &self.bytes, &self.streams].map(|n| n.load(Ordering::Relaxed) as f64);
        for (gauge, value) in self.metrics.history.iter().zip(values) {
            gauge.set(value);
        }
    }

    /// What `stream` holds past `from` ([`select`]).
    pub fn read(&self, stream: &Stream, from: From) -> Found {
        let shard = self.shard(stream);
        let Some(kept) = shard.get(stream) else {
            return Found::unknown(from, self.known_since_ms.load(Ordering::Relaxed), self.settings.ttl);
        };
        let tail = Position { key: stream.key(), epoch: kept.epoch, offset: kept.last };
        let entries: Vec<Arc<Message>> = kept.entries.iter().cloned().collect();
        drop(shard);
        select(from, tail, &entries, self.settings.ttl)
    }
}
