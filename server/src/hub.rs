//! Who is connected here: connections by uid and by topic, and the paced fan-out that
//! delivers a message to them. Nothing else: admission, ids and settings belong to the
//! layers that use them, and the few numbers the hub needs are handed in.
//!
//! Both maps are sharded so that connects, disconnects and deliveries on different
//! shards do not contend. A fan-out enqueues to `fanout_batch` connections, then yields,
//! so that a broadcast to every connection does not starve accepts, pings and the writes
//! it causes.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use compact_str::CompactString;
use hashbrown::HashTable;
use pushline_alloc::Site;
use strum::EnumCount;
use thin_vec::ThinVec;
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::oneshot;

use crate::clock;
use crate::cores::Cores;
use crate::conn::queue::Limits;
use crate::conn::{Conn, ConnInfo};
use crate::error::{Error, Kind};
use crate::session::SessionId;
use crate::telemetry::{CloseReason, Metrics};
use crate::wire::{Message, Transport};

const SHARDS: usize = 64;

/// Longest topic name, in bytes.
pub const MAX_TOPIC_BYTES: usize = 256;

/// A connection registered or unregistered here, as reported to whoever listens (the
/// Redis registry writes them to Redis).
pub enum Change {
    Opened(SessionId, Arc<str>),
    Closed(SessionId, Arc<str>),
    /// A topic got its first subscriber here, or lost its last: its messages are to be
    /// kept (for the history TTL from now).
    Listening(Arc<str>),
    /// The connections a uid has here in a presence topic changed (sent by presence).
    Member(Arc<str>, CompactString),
    /// Asks to be told once this session's open is written, so that a push through any
    /// node finds it (a resume reads history only then).
    Written(SessionId, oneshot::Sender<()>),
}

pub type Changes = UnboundedSender<Change>;

/// What the hub needs to know of the configuration.
pub struct Settings {
    /// Limits of every connection's outbound queue.
    pub limits: Limits,
    pub max_topics_per_connection: usize,
    pub max_connections_per_uid: usize,
    /// Connections a fan-out enqueues to before yielding.
    pub fanout_batch: usize,
}

/// Live objects by kind, counted from the maps.
#[derive(serde::Serialize)]
pub struct Counts {
    pub connections: usize,
    /// Distinct uids connected.
    pub uids: usize,
    pub topics: usize,
    /// (connection, topic) pairs.
    pub subscriptions: usize,
}

/// The connections of one uid. Almost every uid has one, held without a Vec; the uid
/// itself is read from the connections, so the table stores no key of its own. 16 bytes
/// (a `ThinVec` is one pointer): the table's slot per uid.
#[derive(Clone)]
enum UidConns {
    One(Arc<Conn>),
    /// Never empty.
    Many(ThinVec<Arc<Conn>>),
}

const _: () = assert!(std::mem::size_of::<UidConns>() == 16);

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
            UidConns::One(first) => *self = UidConns::Many(thin_vec::thin_vec![first.clone(), conn]),
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

type Subscribers = HashMap<u64, Arc<Conn>>;

pub struct Hub {
    settings: Settings,
    metrics: Arc<Metrics>,
    /// Every connection, by uid (sharded by the uid's hash). Broadcasts walk it too, so
    /// there is no second map by session: each connection costs one 16-byte slot.
    uids: Box<[Mutex<HashTable<UidConns>>]>,
    /// Subscribers of each topic, by session (sharded by the topic's hash).
    topics: Box<[RwLock<HashMap<Arc<str>, Subscribers>>]>,
    /// Topics whose last subscriber here left, with when (process-clock ms), sharded like
    /// `topics`: history is kept for a topic someone listened to within its TTL.
    abandoned: Box<[Mutex<HashMap<Arc<str>, u64>>]>,
    hasher: RandomState,
    /// Registered connections by transport.
    open: [AtomicUsize; Transport::COUNT],
    /// The connections' runtimes, over which a large fan-out is split.
    cores: Arc<Cores>,
    observers: Observers,
}

/// Who hears what happens in the hub.
#[derive(Default)]
pub struct Observers {
    /// Every connection that registers or unregisters, and each topic's first subscriber
    /// and last departure here: sessions registered elsewhere too (Redis).
    pub changes: Option<Changes>,
    /// Every subscription to and departure from a topic: presence.
    pub watcher: Option<Arc<dyn Watcher>>,
    /// Each topic's first subscriber and last departure, where this node is all there
    /// is (the memory registry): the webhooks.
    pub occupancy: Option<Arc<dyn Occupancy>>,
}

/// What hears a topic become occupied, or vacant.
pub trait Occupancy: Send + Sync {
    fn changed(&self, topic: &str, occupied: bool);
}

/// What presence hears from the hub: every topic a connection joins or leaves, and each
/// close.
pub trait Watcher: Send + Sync {
    fn subscribed(&self, topic: &Arc<str>, conn: &Conn);
    fn unsubscribed(&self, topic: &Arc<str>, conn: &Conn);
    fn closed(&self, session: u64);
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Maps stay consistent across a panic in another holder; keep serving.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Checks a topic name a native client or publisher gave: topics in the Pusher
/// protocol's namespace are its channels, reached only through it.
pub fn check_topic_name(topic: &str) -> Result<(), String> {
    check_length(topic)?;
    if topic.starts_with(crate::pusher::PREFIX) {
        return Err(format!("topics starting with `{}` are Pusher channels, reached only through the Pusher protocol", crate::pusher::PREFIX));
    }
    Ok(())
}

fn check_length(topic: &str) -> Result<(), String> {
    if topic.is_empty() || topic.len() > MAX_TOPIC_BYTES {
        return Err(format!("topic names are 1 to {MAX_TOPIC_BYTES} bytes; got {} bytes", topic.len()));
    }
    Ok(())
}

/// Checks a topic a connection of `transport` subscribes to: a Pusher connection holds
/// only Pusher channels, the others none.
fn check_topic_for(transport: Transport, topic: &str) -> Result<(), String> {
    match transport {
        Transport::Pusher if topic.starts_with(crate::pusher::PREFIX) => check_length(topic),
        Transport::Pusher => Err("a Pusher connection holds only Pusher channels".into()),
        _ => check_topic_name(topic),
    }
}

impl Hub {
    pub fn new(settings: Settings, metrics: Arc<Metrics>, cores: Arc<Cores>, observers: Observers) -> Hub {
        Hub {
            settings,
            metrics,
            uids: (0..SHARDS).map(|_| Mutex::new(HashTable::new())).collect(),
            topics: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            abandoned: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            open: std::array::from_fn(|_| AtomicUsize::new(0)),
            cores,
            observers,
        }
    }

    /// Limits of every connection's outbound queue.
    pub fn limits(&self) -> &Limits {
        &self.settings.limits
    }

    fn topic_shard_index(&self, topic: &str) -> usize {
        (self.hasher.hash_one(topic) >> 58) as usize % SHARDS
    }

    fn topic_shard(&self, topic: &str) -> &RwLock<HashMap<Arc<str>, Subscribers>> {
        &self.topics[self.topic_shard_index(topic)]
    }

    fn abandoned(&self, topic: &str) -> MutexGuard<'_, HashMap<Arc<str>, u64>> {
        lock(&self.abandoned[self.topic_shard_index(topic)])
    }

    /// Whether `topic` has a subscriber here, or had one within `within_ms`.
    pub fn listened_within(&self, topic: &str, within_ms: u64) -> bool {
        if self.read_topics(topic).contains_key(topic) {
            return true;
        }
        self.abandoned(topic).get(topic).is_some_and(|left| clock::now_ms().saturating_sub(*left) <= within_ms)
    }

    /// Whether `topic` has a subscriber here.
    pub fn has_subscribers(&self, topic: &str) -> bool {
        self.read_topics(topic).contains_key(topic)
    }

    /// How many subscribers `topic` has here.
    pub fn subscriber_count(&self, topic: &str) -> usize {
        self.read_topics(topic).get(topic).map_or(0, HashMap::len)
    }

    /// Every topic with a subscriber here, with how many.
    pub fn topic_subscribers(&self) -> Vec<(Arc<str>, usize)> {
        self.topics
            .iter()
            .flat_map(|shard| shard.read().unwrap_or_else(|e| e.into_inner()).iter().map(|(t, s)| (t.clone(), s.len())).collect::<Vec<_>>())
            .collect()
    }

    /// Forgets topics abandoned more than `ms` ago.
    pub fn forget_abandoned(&self, ms: u64) {
        let before = clock::now_ms().saturating_sub(ms);
        for shard in self.abandoned.iter() {
            lock(shard).retain(|_, left| *left >= before);
        }
    }

    fn read_topics(&self, topic: &str) -> RwLockReadGuard<'_, HashMap<Arc<str>, Subscribers>> {
        self.topic_shard(topic).read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_topics(&self, topic: &str) -> RwLockWriteGuard<'_, HashMap<Arc<str>, Subscribers>> {
        self.topic_shard(topic).write().unwrap_or_else(|e| e.into_inner())
    }

    /// The uid's hash and its shard, locked. The shard is picked by the high bits, which
    /// the table (using the low ones) does not.
    fn uid_shard(&self, uid: &str) -> (u64, MutexGuard<'_, HashTable<UidConns>>) {
        let hash = self.hasher.hash_one(uid);
        (hash, lock(&self.uids[(hash >> 58) as usize % SHARDS]))
    }

    /// Whether `uid` has a connection here.
    pub fn has_uid(&self, uid: &str) -> bool {
        let (hash, shard) = self.uid_shard(uid);
        shard.find(hash, |e| e.uid() == uid).is_some()
    }

    /// A copy, so that no shard lock is held while writing to them; one connection is
    /// copied without an allocation.
    fn conns_of(&self, uid: &str) -> Option<UidConns> {
        let (hash, shard) = self.uid_shard(uid);
        shard.find(hash, |e| e.uid() == uid).cloned()
    }

    /// Makes a connection reachable by uid and by `topics` (already checked with
    /// `check_topics`), unless its uid already has `max_connections_per_uid` here.
    pub fn register(&self, conn: &Arc<Conn>, topics: &[String]) -> Result<(), Error> {
        {
            let (hash, mut shard) = self.uid_shard(&conn.uid);
            match shard.find_mut(hash, |e| e.uid() == &*conn.uid) {
                Some(entry) if entry.conns().len() >= self.settings.max_connections_per_uid => {
                    let max = self.settings.max_connections_per_uid;
                    return Err(Error::new(Kind::TooManyConnections, format!("uid has {max} connections here, the most allowed")));
                }
                Some(entry) => entry.add(conn.clone()),
                None => {
                    shard.insert_unique(hash, UidConns::One(conn.clone()), |e| self.hasher.hash_one(e.uid()));
                }
            }
        }
        if let Err(e) = self.subscribe(conn, topics) {
            tracing::warn!(session = %conn.session, error = %e, "topics given at connect were not checked");
        }
        self.open[conn.transport as usize].fetch_add(1, Ordering::Relaxed);
        self.metrics.connection_opened(conn.transport, conn.app);
        if let Some(changes) = &self.observers.changes {
            let _ = changes.send(Change::Opened(conn.session, Arc::from(conn.uid.as_str())));
        }
        Ok(())
    }

    /// Resolves once the registry has written `session`'s open, where a registry writes
    /// them (on Redis); None on one node, where registering is all there is. An error
    /// means it was not written (the session closed, or the registry stopped).
    pub fn written(&self, session: SessionId) -> Option<oneshot::Receiver<()>> {
        let changes = self.observers.changes.as_ref()?;
        let (tx, rx) = oneshot::channel();
        // Unsent, the sender is dropped with it, and the receiver says so.
        let _ = changes.send(Change::Written(session, tx));
        Some(rx)
    }

    /// Removes a connection from every map; its task calls this once, as it ends.
    pub fn unregister(&self, conn: &Arc<Conn>, reason: CloseReason) {
        let topics = std::mem::take(&mut conn.state().topics);
        self.remove_from_topics(conn, &topics);
        {
            let (hash, mut shard) = self.uid_shard(&conn.uid);
            if let Ok(mut entry) = shard.find_entry(hash, |e| e.uid() == &*conn.uid) {
                if !entry.get_mut().remove(conn) {
                    entry.remove();
                }
            }
        }
        if let Some(watcher) = &self.observers.watcher {
            watcher.closed(conn.session.0);
        }
        self.open[conn.transport as usize].fetch_sub(1, Ordering::Relaxed);
        self.metrics.connection_closed(conn.transport, conn.app, reason);
        if let Some(changes) = &self.observers.changes {
            let _ = changes.send(Change::Closed(conn.session, Arc::from(conn.uid.as_str())));
        }
    }

    /// Checks topic names, and that a connection holding `held` topics may add `topics`.
    pub fn check_topics(&self, topics: &[String], held: usize) -> Result<(), String> {
        self.check_topics_for(Transport::WebSocket, topics, held)
    }

    fn check_topics_for(&self, transport: Transport, topics: &[String], held: usize) -> Result<(), String> {
        for topic in topics {
            check_topic_for(transport, topic)?;
        }
        let max = self.settings.max_topics_per_connection;
        if held + topics.len() > max {
            return Err(format!("at most {max} topics per connection; this would make {}", held + topics.len()));
        }
        Ok(())
    }

    /// Adds topics to a connection, within `max_topics_per_connection`.
    pub fn subscribe(&self, conn: &Arc<Conn>, topics: &[String]) -> Result<(), String> {
        let mut state = conn.state();
        let mine = &mut state.topics;
        let mut new: Vec<String> = Vec::new();
        for t in topics {
            if !mine.iter().any(|m| **m == **t) && !new.contains(t) {
                new.push(t.clone());
            }
        }
        self.check_topics_for(conn.transport, &new, mine.len())?;
        if new.is_empty() {
            return Ok(());
        }
        let _site = Site::Topics.enter();
        for t in &new {
            let mut index = self.write_topics(t);
            let name: Arc<str> = match index.get_key_value(t.as_str()) {
                Some((name, _)) => name.clone(),
                None => Arc::from(t.as_str()),
            };
            if !index.contains_key(&name) {
                self.abandoned(&name).remove(&name);
                if let Some(changes) = &self.observers.changes {
                    let _ = changes.send(Change::Listening(name.clone()));
                }
                if let Some(occupancy) = &self.observers.occupancy {
                    occupancy.changed(&name, true);
                }
            }
            index.entry(name.clone()).or_default().insert(conn.session.0, conn.clone());
            drop(index);
            if let Some(watcher) = &self.observers.watcher {
                watcher.subscribed(&name, conn);
            }
            mine.push(name);
        }
        Ok(())
    }

    pub fn unsubscribe(&self, conn: &Arc<Conn>, topics: &[String]) {
        let removed: Vec<Arc<str>> = {
            let mut state = conn.state();
            let leaving = |m: &Arc<str>| topics.iter().any(|t| **t == **m);
            let gone = state.topics.iter().filter(|m| leaving(m)).cloned().collect();
            state.topics.retain(|m| !leaving(m));
            gone
        };
        self.remove_from_topics(conn, &removed);
    }

    fn remove_from_topics(&self, conn: &Arc<Conn>, topics: &[Arc<str>]) {
        if topics.is_empty() {
            return;
        }
        for t in topics {
            if let Some(watcher) = &self.observers.watcher {
                watcher.unsubscribed(t, conn);
            }
            let mut index = self.write_topics(t);
            if let Some(subscribers) = index.get_mut(t) {
                subscribers.remove(&conn.session.0);
                if subscribers.is_empty() {
                    index.remove(t);
                    let _site = Site::Topics.enter();
                    self.abandoned(t).insert(t.clone(), clock::now_ms());
                    if let Some(changes) = &self.observers.changes {
                        let _ = changes.send(Change::Listening(t.clone()));
                    }
                    if let Some(occupancy) = &self.observers.occupancy {
                        occupancy.changed(t, false);
                    }
                }
            }
        }
    }

    /// Delivers to every connection of each uid. Returns (connections found, messages queued).
    pub async fn push(&self, uids: &[impl AsRef<str>], msg: &Arc<Message>) -> (usize, usize) {
        let (mut online, mut delivered) = (0, 0);
        let mut since_yield = 0;
        for uid in uids {
            for conn in self.conns_of(uid.as_ref()).iter().flat_map(UidConns::conns) {
                online += 1;
                delivered += conn.deliver(msg, &self.settings.limits, &self.metrics) as usize;
            }
            since_yield += 1;
            if since_yield >= self.settings.fanout_batch {
                since_yield = 0;
                tokio::task::yield_now().await;
            }
        }
        (online, delivered)
    }

    /// Delivers to every subscriber of `topic` (but the client that published it, unless
    /// it asked for its message back). Returns the messages queued.
    pub async fn publish(self: &Arc<Self>, topic: &str, msg: &Arc<Message>) -> usize {
        self.publish_to(topic, msg, |_| true).await
    }

    /// As [`Hub::publish`], to the subscribers `keep` holds to.
    pub async fn publish_to(self: &Arc<Self>, topic: &str, msg: &Arc<Message>, keep: impl Fn(&Conn) -> bool) -> usize {
        let subscribers: Vec<Arc<Conn>> = self
            .read_topics(topic)
            .get(topic)
            .map(|s| s.iter().filter(|(session, conn)| msg.except != Some(**session) && keep(conn)).map(|(_, conn)| conn.clone()).collect())
            .unwrap_or_default();
        self.deliver_spread(subscribers, msg).await
    }

    /// Delivers to every native connection (a Pusher client reads only its protocol's
    /// frames). Returns the messages queued.
    pub async fn broadcast(self: &Arc<Self>, msg: &Arc<Message>) -> usize {
        let native = |c: &&Arc<Conn>| c.transport != Transport::Pusher;
        let conns: Vec<Arc<Conn>> =
            self.uids.iter().flat_map(|shard| lock(shard).iter().flat_map(|e| e.conns().iter().filter(native).cloned()).collect::<Vec<_>>()).collect();
        self.deliver_spread(conns, msg).await
    }

    /// A large fan-out runs as one task per core: a delivery to a connection that owes
    /// nothing is its `send` (the TCP stack's work, in the publisher's time), and spread
    /// over the core runtimes these take every core, as the connections' own tasks did. The
    /// caller waits for all of them, so one publisher's messages keep their order.
    async fn deliver_spread(self: &Arc<Self>, mut conns: Vec<Arc<Conn>>, msg: &Arc<Message>) -> usize {
        // Collected (an allocation) only for a fan-out large enough to split.
        let others: Vec<_> = if conns.len() < 2 * self.settings.fanout_batch { Vec::new() } else { self.cores.others().collect() };
        if others.is_empty() {
            return self.deliver_paced(conns, msg).await;
        }
        let size = conns.len().div_ceil(others.len() + 1);
        let mut tasks = tokio::task::JoinSet::new();
        for core in others {
            let part = conns.split_off(conns.len().saturating_sub(size));
            let (hub, msg) = (self.clone(), msg.clone());
            tasks.spawn_on(async move { hub.deliver_paced(part, &msg).await }, core);
        }
        let mut delivered = self.deliver_paced(conns, msg).await;
        while let Some(part) = tasks.join_next().await {
            delivered += part.unwrap_or(0);
        }
        delivered
    }

    async fn deliver_paced(&self, conns: Vec<Arc<Conn>>, msg: &Arc<Message>) -> usize {
        let mut delivered = 0;
        for batch in conns.chunks(self.settings.fanout_batch) {
            for conn in batch {
                delivered += conn.deliver(msg, &self.settings.limits, &self.metrics) as usize;
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
    pub fn describe(&self, limit: usize) -> Vec<ConnInfo> {
        let now = clock::now_ms();
        let mut out = Vec::new();
        self.for_each(|conn| {
            if out.len() < limit {
                out.push(conn.info(now));
            }
        });
        out
    }

    /// Every connection of `uid` on this node.
    pub fn describe_uid(&self, uid: &str) -> Vec<ConnInfo> {
        let now = clock::now_ms();
        self.conns_of(uid).iter().flat_map(UidConns::conns).map(|c| c.info(now)).collect()
    }

    pub fn counts(&self) -> Counts {
        let uids = self.uids.iter().map(|s| lock(s).len()).sum();
        let (mut topics, mut subscriptions) = (0, 0);
        for shard in self.topics.iter() {
            let index = shard.read().unwrap_or_else(|e| e.into_inner());
            topics += index.len();
            subscriptions += index.values().map(HashMap::len).sum::<usize>();
        }
        Counts { connections: self.total_connections(), uids, topics, subscriptions }
    }

    pub fn connections(&self, transport: Transport) -> usize {
        self.open[transport as usize].load(Ordering::Relaxed)
    }

    pub fn total_connections(&self) -> usize {
        self.open.iter().map(|n| n.load(Ordering::Relaxed)).sum()
    }

    /// Asks every connection to close; their tasks unregister them as they end.
    pub fn close_all(&self, reason: CloseReason) {
        self.for_each(|conn| conn.request_close(reason));
    }
}
