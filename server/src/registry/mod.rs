//! Where a message goes beyond the local hub: the seam between this node and the others.
//!
//! The publish API hands every message to the registry, never to the hub directly. The
//! `memory` backend is one node, so the hub's answer is the whole answer. The Redis
//! backends (one Redis, or a Redis Cluster) deliver locally first, then find the other
//! nodes that hold the uids (`presence`) and forward over pub/sub (`relay`); every node
//! delivers what arrives on its channels to its own connections.

pub mod presence;
pub mod redis;
pub mod relay;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ::redis::{Cmd, PushInfo, Value};
use tokio::sync::mpsc::{unbounded_channel, Receiver, UnboundedReceiver};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use pushline_alloc::Site;

use crate::config::{Config, RegistryKind};
use crate::error::Error;
use crate::hub::{Change, Changes, Hub};
use crate::session::SessionId;
use crate::telemetry::{DropReason, Metrics, PublishKind, RedisCommand, Relayed};
use crate::wire::Message;
use presence::{Keys, Registrar};
use redis::Redis;
use relay::{Relay, Target};

/// How long a node's liveness, once read, is trusted before it is read again.
const LIVENESS_CACHE: Duration = Duration::from_secs(1);

pub enum Registry {
    /// One node: every session is in this process's hub.
    Memory,
    /// Many nodes on Redis or a Redis Cluster.
    Redis(Nodes),
}

/// What a publish reached.
#[derive(Default)]
pub struct Delivered {
    /// Connections of the pushed uids found, on every live node (pushes only).
    pub online: usize,
    /// Messages queued here plus connections on other nodes the message was sent to.
    pub delivered: usize,
    /// Other nodes the message was sent to.
    pub nodes: usize,
}

/// Redis failed: the message reached this node's connections (`local`); other nodes may
/// not have it.
pub struct Unavailable {
    pub local: Delivered,
    pub reason: String,
}

impl Registry {
    pub async fn push(&self, hub: &Hub, uids: &[String], msg: &Arc<Message>) -> Result<Delivered, Unavailable> {
        // A uid listed twice gets the message once.
        let mut seen = HashSet::with_capacity(uids.len());
        let uids: Vec<&str> = uids.iter().map(String::as_str).filter(|u| seen.insert(*u)).collect();
        let (online, delivered) = hub.push(&uids, msg).await;
        let local = Delivered { online, delivered, nodes: 0 };
        match self {
            Registry::Memory => Ok(local),
            Registry::Redis(nodes) => nodes.push(&uids, msg, local).await,
        }
    }

    pub async fn publish(&self, hub: &Hub, topic: &str, msg: &Arc<Message>) -> Result<Delivered, Unavailable> {
        let local = Delivered { delivered: hub.publish(topic, msg).await, ..Delivered::default() };
        match self {
            Registry::Memory => Ok(local),
            Registry::Redis(nodes) => nodes.fan_out(Target::Topic(topic), msg, local).await,
        }
    }

    pub async fn broadcast(&self, hub: &Hub, msg: &Arc<Message>) -> Result<Delivered, Unavailable> {
        let local = Delivered { delivered: hub.broadcast(msg).await, ..Delivered::default() };
        match self {
            Registry::Memory => Ok(local),
            Registry::Redis(nodes) => nodes.fan_out(Target::Everyone, msg, local).await,
        }
    }
}

/// A node connected to Redis with its node id claimed, before its hub exists (the hub
/// needs the id).
pub struct Connected {
    redis: Redis,
    pushes: Receiver<PushInfo>,
    keys: Keys,
    pub node: u16,
    epoch: u64,
    ttl: Duration,
    changes: (Changes, UnboundedReceiver<Change>),
    metrics: Arc<Metrics>,
}

/// Connects to Redis and claims a node id; `None` for the memory registry.
pub async fn connect(config: &Config, metrics: Arc<Metrics>) -> Result<Option<Connected>, Error> {
    if config.registry == RegistryKind::Memory {
        return Ok(None);
    }
    let (redis, pushes) = Site::Redis.instrument(Redis::connect(config.registry, &config.redis_url, metrics.clone())).await?;
    let keys = Keys::new(&config.redis_prefix);
    let epoch = relay::now_ms();
    let node = presence::claim_node_id(&redis, &keys, config.node_id, epoch, config.node_ttl).await?;
    tracing::info!(node, registry = ?config.registry, "claimed node id {node} in Redis");
    Ok(Some(Connected { redis, pushes, keys, node, epoch, ttl: config.node_ttl, changes: unbounded_channel(), metrics }))
}

impl Connected {
    /// Where the hub reports opens and closes.
    pub fn changes(&self) -> Changes {
        self.changes.0.clone()
    }

    /// Subscribes and starts writing sessions and reading other nodes' messages.
    pub async fn attach(self, hub: Arc<Hub>) -> Result<(Registry, Attached), Error> {
        let nodes = Nodes::new(self.redis.clone(), self.keys.clone(), self.node, self.epoch, self.metrics.clone());
        nodes.subscribe().await?;
        let stop = CancellationToken::new();
        let inbox = relay::Inbox {
            hub: hub.clone(),
            metrics: self.metrics.clone(),
            redis: self.redis.clone(),
            node: self.node,
            channels: nodes.channels(),
        };
        let evicted = CancellationToken::new();
        let registrar = Registrar {
            redis: self.redis,
            keys: self.keys,
            hub: hub.clone(),
            node: self.node,
            epoch: self.epoch,
            ttl: self.ttl,
            metrics: self.metrics.clone(),
            evicted: evicted.clone(),
        };
        registrar.announce().await.map_err(|e| Error::unavailable(format!("registering this node: {e}")))?;
        let writing = tokio::spawn(Site::Redis.instrument(registrar.run(self.changes.1, stop.clone())));
        let reading = tokio::spawn(Site::Redis.instrument(inbox.run(self.pushes)));
        Ok((Registry::Redis(nodes), Attached { writing, reading, stop, evicted }))
    }
}

/// The background work of a node on Redis.
pub struct Attached {
    writing: JoinHandle<()>,
    reading: JoinHandle<()>,
    stop: CancellationToken,
    evicted: CancellationToken,
}

impl Attached {
    /// Cancelled when another process turns out to hold this node's id: this node must
    /// stop serving.
    pub fn evicted(&self) -> CancellationToken {
        self.evicted.clone()
    }

    /// After every connection has closed: writes the last session changes, removes this
    /// node from Redis, and stops reading (bounded by `grace`).
    pub async fn leave(self, grace: Duration) {
        self.stop.cancel();
        if tokio::time::timeout(grace, self.writing).await.is_err() {
            tracing::warn!("could not finish with Redis within {grace:?}; this node's sessions expire with its liveness key");
        }
        self.reading.abort();
    }
}

/// This node's view of the others, through Redis.
pub struct Nodes {
    redis: Redis,
    keys: Keys,
    node: u16,
    epoch: u64,
    metrics: Arc<Metrics>,
    /// node -> (its epoch, or None when its liveness key is gone; when it was read).
    liveness: Mutex<HashMap<u16, (Option<u64>, Instant)>>,
}

/// A session found in Redis.
struct Entry<'a> {
    uid: &'a str,
    session: SessionId,
    epoch: u64,
}

impl Nodes {
    pub fn new(redis: Redis, keys: Keys, node: u16, epoch: u64, metrics: Arc<Metrics>) -> Nodes {
        Nodes { redis, keys, node, epoch, metrics, liveness: Mutex::new(HashMap::new()) }
    }

    /// This node's channel and the fan-out channels: what it listens to.
    fn channels(&self) -> Vec<String> {
        std::iter::once(self.keys.node_channel(self.node))
            .chain((0..presence::FANOUT_CHANNELS).map(|n| self.keys.fanout_channel(n)))
            .collect()
    }

    /// Subscribes to this node's channel and the fan-out channels.
    pub async fn subscribe(&self) -> Result<(), Error> {
        for channel in self.channels() {
            self.redis.subscribe(&channel).await.map_err(|e| Error::unavailable(format!("subscribing to {channel}: {e}")))?;
        }
        Ok(())
    }

    async fn push(&self, uids: &[&str], msg: &Arc<Message>, local: Delivered) -> Result<Delivered, Unavailable> {
        let lookups: Vec<Cmd> = uids.iter().map(|uid| ::redis::cmd("HGETALL").arg(self.keys.uid(uid)).clone()).collect();
        let found = match self.redis.batch(RedisCommand::Hgetall, &lookups).await {
            Ok(found) => found,
            Err(e) => return Err(self.unavailable(local, e)),
        };
        let mut remote: Vec<Entry> = Vec::new();
        let mut stale: Vec<Entry> = Vec::new();
        for (uid, hash) in uids.iter().zip(found) {
            for (session, epoch) in hash_entries(hash) {
                let entry = Entry { uid, session: SessionId(session), epoch };
                if entry.session.node() == self.node {
                    // Local sessions were delivered above; an older epoch is a previous run of this node.
                    if epoch < self.epoch {
                        stale.push(entry);
                    }
                } else {
                    remote.push(entry);
                }
            }
        }
        let wanted: Vec<u16> = remote.iter().map(|e| e.session.node()).collect::<HashSet<_>>().into_iter().collect();
        let mut live = match self.live_epochs(&wanted, false).await {
            Ok(live) => live,
            Err(e) => return Err(self.unavailable(local, e)),
        };
        // A cached answer that would make an entry dead is read again before anything is
        // skipped or deleted: the node may have restarted within the cache's second.
        let doubtful: Vec<u16> = remote
            .iter()
            .filter(|e| live.get(&e.session.node()) != Some(&Some(e.epoch)))
            .map(|e| e.session.node())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        if !doubtful.is_empty() {
            match self.live_epochs(&doubtful, true).await {
                Ok(fresh) => live.extend(fresh),
                Err(e) => return Err(self.unavailable(local, e)),
            }
        }
        // node -> (its uids, sessions of them there)
        let mut by_node: BTreeMap<u16, (Vec<&str>, usize)> = BTreeMap::new();
        for entry in remote {
            match live.get(&entry.session.node()).copied().flatten() {
                Some(epoch) if epoch == entry.epoch => {
                    let (node_uids, sessions) = by_node.entry(entry.session.node()).or_default();
                    if !node_uids.contains(&entry.uid) {
                        node_uids.push(entry.uid);
                    }
                    *sessions += 1;
                }
                // Written by a run newer than the key just read: neither deliver nor delete.
                Some(epoch) if epoch < entry.epoch => {}
                // The node is gone, or a newer run holds its id.
                _ => stale.push(entry),
            }
        }
        self.forget(stale);
        let mut result = local;
        if by_node.is_empty() {
            return Ok(result);
        }
        let envelope = envelope(msg);
        let published_ms = published_ms(msg);
        let publishes: Vec<Cmd> = by_node
            .iter()
            .map(|(node, (node_uids, _))| {
                let relay = Relay {
                    origin: self.node,
                    id: msg.id,
                    published_ms,
                    target: Target::Uids(node_uids.clone()),
                    envelope: &envelope,
                };
                self.redis.publish_cmd(&self.keys.node_channel(*node), &relay.encode())
            })
            .collect();
        let receivers = match self.redis.batch(RedisCommand::Publish, &publishes).await {
            Ok(receivers) => receivers,
            Err(e) => return Err(self.unavailable(result, e)),
        };
        for ((_, (_, sessions)), receivers) in by_node.iter().zip(receivers) {
            result.online += sessions;
            if matches!(receivers, Value::Int(n) if n > 0) {
                self.metrics.relayed(Relayed::Out, PublishKind::Push);
                result.delivered += sessions;
                result.nodes += 1;
            } else {
                self.metrics.dropped(DropReason::NodeUnreachable, *sessions);
            }
        }
        Ok(result)
    }

    /// Topic publishes and broadcasts: one message on a fan-out channel every node reads.
    /// A topic always uses the same channel, and broadcasts share one, so each stays in order.
    async fn fan_out(&self, target: Target<'_>, msg: &Arc<Message>, local: Delivered) -> Result<Delivered, Unavailable> {
        let channel = match target {
            Target::Topic(topic) => self.keys.fanout_channel(fnv1a(topic.as_bytes())),
            _ => self.keys.fanout_channel(0),
        };
        let kind = target.kind();
        let envelope = envelope(msg);
        let relay = Relay { origin: self.node, id: msg.id, published_ms: published_ms(msg), target, envelope: &envelope };
        let cmd = self.redis.publish_cmd(&channel, &relay.encode());
        match self.redis.query::<i64>(RedisCommand::Publish, &cmd).await {
            Ok(receivers) => {
                self.metrics.relayed(Relayed::Out, kind);
                // This node reads the channel too (and skips its own messages).
                Ok(Delivered { nodes: (receivers.max(1) - 1) as usize, ..local })
            }
            Err(e) => Err(self.unavailable(local, e)),
        }
    }

    /// Counts the publish as not reaching the other nodes and says why.
    fn unavailable(&self, local: Delivered, e: ::redis::RedisError) -> Unavailable {
        self.metrics.dropped(DropReason::RegistryUnavailable, 1);
        Unavailable { local, reason: format!("Redis: {e}") }
    }

    /// The epoch each node's liveness key holds (None: gone), from a cache of at most
    /// `LIVENESS_CACHE` age unless `fresh`.
    async fn live_epochs(&self, nodes: &[u16], fresh: bool) -> ::redis::RedisResult<HashMap<u16, Option<u64>>> {
        let now = Instant::now();
        let mut live = HashMap::new();
        let mut unknown = Vec::new();
        if fresh {
            unknown.extend_from_slice(nodes);
        } else {
            let cache = self.liveness.lock().unwrap_or_else(|e| e.into_inner());
            for node in nodes {
                match cache.get(node) {
                    Some((epoch, read)) if now.duration_since(*read) < LIVENESS_CACHE => {
                        live.insert(*node, *epoch);
                    }
                    _ => unknown.push(*node),
                }
            }
        }
        if unknown.is_empty() {
            return Ok(live);
        }
        let reads: Vec<Cmd> = unknown.iter().map(|n| ::redis::cmd("GET").arg(self.keys.node(*n)).clone()).collect();
        let epochs = self.redis.batch(RedisCommand::Get, &reads).await?;
        let mut cache = self.liveness.lock().unwrap_or_else(|e| e.into_inner());
        for (node, value) in unknown.into_iter().zip(epochs) {
            let epoch = ::redis::from_redis_value::<Option<u64>>(value).ok().flatten();
            cache.insert(node, (epoch, now));
            live.insert(node, epoch);
        }
        Ok(live)
    }

    /// Deletes sessions of dead nodes, in the background; a failure leaves them for the
    /// next lookup. An entry is deleted only if it still holds the epoch found, so a new
    /// run's session with the same id is kept.
    fn forget(&self, stale: Vec<Entry>) {
        if stale.is_empty() {
            return;
        }
        let cmds: Vec<Cmd> = stale
            .iter()
            .map(|e| ::redis::cmd("EVAL").arg(presence::DELETE_IF_EPOCH).arg(1).arg(self.keys.uid(e.uid)).arg(e.session.0).arg(e.epoch).clone())
            .collect();
        let redis = self.redis.clone();
        tokio::spawn(async move {
            if let Err(e) = redis.batch(RedisCommand::Hdel, &cmds).await {
                tracing::debug!(error = %e, "could not delete sessions of dead nodes");
            }
        });
    }
}


/// The envelope this node sent its own clients; other nodes frame the same bytes.
fn envelope(msg: &Message) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(msg.envelope())
}

/// Wall-clock time of the publish, so other nodes measure latency from it.
fn published_ms(msg: &Message) -> u64 {
    relay::now_ms().saturating_sub(msg.accepted_at.elapsed().as_millis() as u64)
}

/// Session id -> epoch pairs of an HGETALL answer; entries that do not parse are skipped.
fn hash_entries(value: Value) -> Vec<(u64, u64)> {
    ::redis::from_redis_value::<HashMap<u64, u64>>(value).map(|m| m.into_iter().collect()).unwrap_or_default()
}

/// A stable hash (every node must pick the same channel for a topic).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ *b as u64).wrapping_mul(0x100_0000_01b3))
}
