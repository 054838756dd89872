//! Who is connected here: connections by session, by uid and by topic, and the paced
//! fan-out that delivers a message to them.
//!
//! Maps are sharded so that connects, disconnects and deliveries on different shards do
//! not contend. A fan-out enqueues to `fanout_batch` connections, then yields, so that a
//! broadcast to every connection does not starve accepts, pings and the writes it causes.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};

use hashbrown::HashTable;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use tokio::sync::Notify;

use crate::config::Config;
use crate::conn::queue::Limits;
use crate::conn::wire::{Message, Transport};
use crate::conn::Conn;
use crate::registry::presence::{Change, Changes};
use crate::session::{MessageIds, SessionIds};
use crate::telemetry::{CloseReason, Metrics, RefuseReason};

const SHARDS: usize = 64;

/// Longest topic name, in bytes.
pub const MAX_TOPIC_BYTES: usize = 256;

/// One connection, as the debug endpoints show it.
#[derive(serde::Serialize)]
pub struct ConnectionInfo {
    pub uid: String,
    pub session: String,
    pub node: u16,
    pub transport: &'static str,
    pub topics: Vec<String>,
    pub age_ms: u64,
    /// Since the client last sent anything.
    pub idle_ms: u64,
    pub queued_messages: usize,
    pub queued_bytes: usize,
}

impl ConnectionInfo {
    fn of(conn: &Conn, now_ms: u64) -> ConnectionInfo {
        let (queued_messages, queued_bytes) = conn.queued();
        ConnectionInfo {
            uid: conn.uid.to_string(),
            session: conn.session.to_string(),
            node: conn.session.node(),
            transport: conn.transport.as_str(),
            topics: conn.topics().iter().map(|t| t.to_string()).collect(),
            age_ms: now_ms.saturating_sub(conn.opened_ms),
            idle_ms: now_ms.saturating_sub(conn.last_inbound_ms()),
            queued_messages,
            queued_bytes,
        }
    }
}

/// Live objects by kind, counted from the maps.
#[derive(serde::Serialize)]
pub struct ObjectCounts {
    pub connections: usize,
    /// Distinct uids connected.
    pub uids: usize,
    pub topics: usize,
    /// (connection, topic) pairs.
    pub subscriptions: usize,
    pub queued_messages: usize,
}

/// A place among `max_connections`, held from the handshake until the connection's task
/// ends. Dropping it gives the place back.
pub struct Slot {
    hub: Arc<Hub>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.hub.held.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.hub.all_closed.notify_waiters();
        }
    }
}

/// The connections of one uid. Almost every uid has one, held without a Vec; the uid
/// itself is read from the connections, so the table stores no key of its own.
enum UidConns {
    One(Arc<Conn>),
    /// Never empty.
    Many(Vec<Arc<Conn>>),
}

impl UidConns {
    fn conns(&self) -> &[Arc<Conn>] {
        match self {
            UidConns::One(conn) => std::slice::from_ref(conn),
            UidConns::Many(conns) => conns,
        }
    }

    fn uid(&self) -> &str {
        &self.conns()[0].uid
    }

    fn add(&mut self, conn: Arc<Conn>) {
        match self {
            UidConns::One(first) => *self = UidConns::Many(vec![first.clone(), conn]),
            UidConns::Many(conns) => conns.push(conn),
        }
    }

    /// Removes `conn`; false when none are left.
    fn remove(&mut self, conn: &Arc<Conn>) -> bool {
        match self {
            UidConns::One(only) => !Arc::ptr_eq(only, conn),
            UidConns::Many(conns) => {
                conns.retain(|c| !Arc::ptr_eq(c, conn));
                if let [last] = conns.as_slice() {
                    *self = UidConns::One(last.clone());
                }
                true
            }
        }
    }
}

pub struct Hub {
    config: Config,
    limits: Limits,
    metrics: Arc<Metrics>,
    pub session_ids: SessionIds,
    pub message_ids: MessageIds,
    /// Every connection, by uid (sharded by the uid's hash). Broadcasts walk it too, so
    /// there is no second map by session: each connection costs one 16-byte slot.
    uids: Box<[Mutex<HashTable<UidConns>>]>,
    topics: RwLock<HashMap<Arc<str>, HashMap<u64, Arc<Conn>>>>,
    hasher: RandomState,
    /// Slots held: registered connections plus handshakes under way.
    held: AtomicUsize,
    /// Registered connections by transport.
    open: [AtomicUsize; 2],
    accepting: AtomicBool,
    all_closed: Notify,
    /// Where opens and closes are reported when sessions are also registered in Redis.
    changes: Option<Changes>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Maps stay consistent across a panic in another holder; keep serving.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Hub {
    /// `node` is this node's id; `changes`, when set, hears of every connection that
    /// registers or unregisters.
    pub fn new(config: Config, node: u16, metrics: Arc<Metrics>, changes: Option<Changes>) -> Hub {
        let limits = Limits {
            max_messages: config.queue_max_messages,
            max_bytes: config.queue_max_bytes,
            policy: config.slow_consumer,
        };
        Hub {
            session_ids: SessionIds::new(node),
            message_ids: MessageIds::new(node),
            limits,
            metrics,
            uids: (0..SHARDS).map(|_| Mutex::new(HashTable::new())).collect(),
            topics: RwLock::new(HashMap::new()),
            hasher: RandomState::new(),
            held: AtomicUsize::new(0),
            open: [AtomicUsize::new(0), AtomicUsize::new(0)],
            accepting: AtomicBool::new(true),
            all_closed: Notify::new(),
            changes,
            config,
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The uid's hash and its shard, locked. The shard is picked by the high bits, which
    /// the table (using the low ones) does not.
    fn uid_shard(&self, uid: &str) -> (u64, MutexGuard<'_, HashTable<UidConns>>) {
        let hash = self.hasher.hash_one(uid);
        (hash, lock(&self.uids[(hash >> 58) as usize % SHARDS]))
    }

    fn conns_of(&self, uid: &str) -> Vec<Arc<Conn>> {
        let (hash, shard) = self.uid_shard(uid);
        shard.find(hash, |e| e.uid() == uid).map(|e| e.conns().to_vec()).unwrap_or_default()
    }

    /// Takes a place for a new connection, or says why there is none.
    pub fn reserve(self: &Arc<Self>) -> Result<Slot, RefuseReason> {
        if !self.accepting.load(Ordering::Acquire) {
            return Err(RefuseReason::ShuttingDown);
        }
        let max = self.config.max_connections;
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .map_err(|_| RefuseReason::MaxConnections)?;
        Ok(Slot { hub: self.clone() })
    }

    /// Makes a connection reachable by session, uid and `topics` (already checked with
    /// `check_topics`).
    pub fn register(&self, conn: &Arc<Conn>, topics: &[String]) {
        if let Err(e) = self.subscribe(conn, topics) {
            tracing::warn!(session = %conn.session, error = %e, "topics given at connect were not checked");
        }
        {
            let (hash, mut shard) = self.uid_shard(&conn.uid);
            match shard.find_mut(hash, |e| e.uid() == &*conn.uid) {
                Some(entry) => entry.add(conn.clone()),
                None => {
                    shard.insert_unique(hash, UidConns::One(conn.clone()), |e| self.hasher.hash_one(e.uid()));
                }
            }
        }
        self.open[conn.transport.index()].fetch_add(1, Ordering::Relaxed);
        self.metrics.connection_opened(conn.transport);
        if let Some(changes) = &self.changes {
            let _ = changes.send(Change::Opened(conn.session, conn.uid.clone()));
        }
        if !self.is_accepting() {
            // Shutdown began during this handshake, after close_all looked at the maps.
            conn.request_close(CloseReason::Shutdown);
        }
    }

    /// Removes a connection from every map; its task calls this once, as it ends.
    pub fn unregister(&self, conn: &Arc<Conn>, reason: CloseReason) {
        let topics = std::mem::take(&mut *conn.topics());
        self.remove_from_topics(conn, &topics);
        {
            let (hash, mut shard) = self.uid_shard(&conn.uid);
            if let Ok(mut entry) = shard.find_entry(hash, |e| e.uid() == &*conn.uid) {
                if !entry.get_mut().remove(conn) {
                    entry.remove();
                }
            }
        }
        self.open[conn.transport.index()].fetch_sub(1, Ordering::Relaxed);
        self.metrics.connection_closed(conn.transport, reason);
        if let Some(changes) = &self.changes {
            let _ = changes.send(Change::Closed(conn.session, conn.uid.clone()));
        }
    }

    /// Checks topic names, and that a connection holding `held` topics may add `topics`.
    pub fn check_topics(&self, topics: &[String], held: usize) -> Result<(), String> {
        if let Some(bad) = topics.iter().find(|t| t.is_empty() || t.len() > MAX_TOPIC_BYTES) {
            return Err(format!("topic names are 1 to {MAX_TOPIC_BYTES} bytes; got {} bytes", bad.len()));
        }
        let max = self.config.max_topics_per_connection;
        if held + topics.len() > max {
            return Err(format!("at most {max} topics per connection; this would make {}", held + topics.len()));
        }
        Ok(())
    }

    /// Adds topics to a connection, within `max_topics_per_connection`.
    pub fn subscribe(&self, conn: &Arc<Conn>, topics: &[String]) -> Result<(), String> {
        let mut mine = conn.topics();
        let mut new: Vec<String> = Vec::new();
        for t in topics {
            if !mine.iter().any(|m| **m == **t) && !new.contains(t) {
                new.push(t.clone());
            }
        }
        self.check_topics(&new, mine.len())?;
        if new.is_empty() {
            return Ok(());
        }
        let _site = crate::alloc::sites::Site::Topics.enter();
        let mut index = self.topics.write().unwrap_or_else(|e| e.into_inner());
        for t in &new {
            let name: Arc<str> = match index.get_key_value(t.as_str()) {
                Some((name, _)) => name.clone(),
                None => Arc::from(t.as_str()),
            };
            index.entry(name.clone()).or_default().insert(conn.session.0, conn.clone());
            mine.push(name);
        }
        Ok(())
    }

    pub fn unsubscribe(&self, conn: &Arc<Conn>, topics: &[String]) {
        let removed: Vec<Arc<str>> = {
            let mut mine = conn.topics();
            let (gone, kept): (Vec<_>, Vec<_>) = mine.drain(..).partition(|m| topics.iter().any(|t| **t == **m));
            *mine = kept;
            gone
        };
        self.remove_from_topics(conn, &removed);
    }

    fn remove_from_topics(&self, conn: &Arc<Conn>, topics: &[Arc<str>]) {
        if topics.is_empty() {
            return;
        }
        let mut index = self.topics.write().unwrap_or_else(|e| e.into_inner());
        for t in topics {
            if let Some(subscribers) = index.get_mut(t) {
                subscribers.remove(&conn.session.0);
                if subscribers.is_empty() {
                    index.remove(t);
                }
            }
        }
    }

    /// Delivers to every connection of each uid. Returns (connections found, messages queued).
    pub async fn push(&self, uids: &[impl AsRef<str>], msg: &Arc<Message>) -> (usize, usize) {
        let (mut online, mut delivered) = (0, 0);
        let mut since_yield = 0;
        for uid in uids {
            for conn in self.conns_of(uid.as_ref()) {
                online += 1;
                delivered += conn.deliver(msg, self) as usize;
            }
            since_yield += 1;
            if since_yield >= self.config.fanout_batch {
                since_yield = 0;
                tokio::task::yield_now().await;
            }
        }
        (online, delivered)
    }

    /// Delivers to every subscriber of `topic`. Returns the messages queued.
    pub async fn publish(&self, topic: &str, msg: &Arc<Message>) -> usize {
        let subscribers: Vec<Arc<Conn>> = {
            let index = self.topics.read().unwrap_or_else(|e| e.into_inner());
            index.get(topic).map(|s| s.values().cloned().collect()).unwrap_or_default()
        };
        self.deliver_paced(subscribers, msg).await
    }

    /// Delivers to every connection. Returns the messages queued.
    pub async fn broadcast(&self, msg: &Arc<Message>) -> usize {
        let mut delivered = 0;
        for shard in self.uids.iter() {
            let conns: Vec<Arc<Conn>> = lock(shard).iter().flat_map(|e| e.conns().iter().cloned()).collect();
            delivered += self.deliver_paced(conns, msg).await;
        }
        delivered
    }

    async fn deliver_paced(&self, conns: Vec<Arc<Conn>>, msg: &Arc<Message>) -> usize {
        let mut delivered = 0;
        for batch in conns.chunks(self.config.fanout_batch) {
            for conn in batch {
                delivered += conn.deliver(msg, self) as usize;
            }
            tokio::task::yield_now().await;
        }
        delivered
    }

    /// Calls `f` on every registered connection, one shard at a time.
    pub fn for_each(&self, mut f: impl FnMut(&Arc<Conn>)) {
        for shard in self.uids.iter() {
            for conn in lock(shard).iter().flat_map(|e| e.conns()) {
                f(conn);
            }
        }
    }

    /// Up to `limit` connections, shard by shard.
    pub fn describe(&self, limit: usize) -> Vec<ConnectionInfo> {
        let now = crate::conn::clock_ms();
        let mut out = Vec::new();
        for shard in self.uids.iter() {
            for conn in lock(shard).iter().flat_map(|e| e.conns()) {
                if out.len() >= limit {
                    return out;
                }
                out.push(ConnectionInfo::of(conn, now));
            }
        }
        out
    }

    /// Every connection of `uid` on this node.
    pub fn describe_uid(&self, uid: &str) -> Vec<ConnectionInfo> {
        let now = crate::conn::clock_ms();
        self.conns_of(uid).iter().map(|c| ConnectionInfo::of(c, now)).collect()
    }

    pub fn objects(&self) -> ObjectCounts {
        let uids = self.uids.iter().map(|s| lock(s).len()).sum();
        let (topics, subscriptions) = {
            let index = self.topics.read().unwrap_or_else(|e| e.into_inner());
            (index.len(), index.values().map(HashMap::len).sum())
        };
        ObjectCounts {
            connections: self.total_connections(),
            uids,
            topics,
            subscriptions,
            queued_messages: self.metrics.queued_messages_now.load(Ordering::Relaxed),
        }
    }

    pub fn connections(&self, transport: Transport) -> usize {
        self.open[transport.index()].load(Ordering::Relaxed)
    }

    pub fn total_connections(&self) -> usize {
        Transport::ALL.iter().map(|t| self.connections(*t)).sum()
    }

    pub fn is_accepting(&self) -> bool {
        self.accepting.load(Ordering::Acquire)
    }

    /// Refuses new connections from now on.
    pub fn stop_accepting(&self) {
        self.accepting.store(false, Ordering::Release);
    }

    /// Asks every connection to close and waits until all have (or `grace` passes).
    /// Returns the number still open when it gave up.
    pub async fn close_all(&self, reason: CloseReason, grace: std::time::Duration) -> usize {
        let all_closed = self.all_closed.notified();
        tokio::pin!(all_closed);
        all_closed.as_mut().enable();
        self.for_each(|conn| conn.request_close(reason));
        if self.held.load(Ordering::Acquire) == 0 {
            return 0;
        }
        let _ = tokio::time::timeout(grace, all_closed).await;
        self.held.load(Ordering::Acquire)
    }
}
