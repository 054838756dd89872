//! Where a message goes: the seam between the publish API and every node's connections.
//!
//! The publish API hands every message to the registry, never to the hub directly. The
//! `memory` backend is one node: a message takes its stream's next offset in this
//! process's history and is fanned out by the hub, under the stream's order lock. The
//! Redis backends (one Redis, or a Redis Cluster) find the nodes that hold the pushed uids
//! (`presence`), then run one script per stream that takes the offset, keeps the message
//! and publishes it to those nodes' channels (`history::redis`); every node, this one
//! included, delivers what arrives on its channels to its own connections (`relay`), so
//! every node sees a stream's messages in offset order.

pub mod listed;
pub mod members;
pub mod occupancy;
pub mod presence;
pub mod relay;
pub mod shards;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ::redis::{Cmd, PushInfo, Value};
use tokio::sync::mpsc::{unbounded_channel, Receiver, UnboundedReceiver};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use pushline_alloc::Site;

use crate::config::{Config, RegistryKind};
use crate::error::Error;
use crate::cores::Cores;
use crate::hub::{Change, Changes, Hub};
use crate::session::SessionId;
use crate::telemetry::{DropReason, Metrics, RedisCommand, Relayed};
use crate::history::idempotency::{self, Claim, Claimed, Idempotency};
use crate::history::memory::MemoryHistory;
use crate::history::redis::{Appended, RedisHistory, Route};
use crate::history::resume::History;
use crate::history::{Stream, GROUPS};
use crate::wire::Draft;
use crate::presence::{Page, Presence, Stats};
use crate::webhooks::{EventKind, Webhooks};
use members::Members;
use occupancy::Occupancy;
use listed::Listed;
use presence::{Keys, Registrar};
use crate::redis_link::Redis;
use relay::{Awaited, Relay, Target};

/// How long a node's liveness, once read, is trusted before it is read again.
const LIVENESS_CACHE: Duration = Duration::from_secs(1);

pub enum Registry {
    /// One node: every session is in this process's hub, history in its memory.
    Memory { history: Arc<MemoryHistory>, idempotency: Idempotency },
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
    /// Streams that kept the message in their history (for a push, one per uid).
    pub stored: usize,
    /// The first request's message id, when this retry of its idempotency key published
    /// what it had not (it was cut short, or is under way): the counts are this retry's.
    pub first: Option<u64>,
}

/// What a keyed publish's claim of its idempotency key on Redis said ([`Nodes::claims`]).
enum KeyClaim {
    /// Unkeyed, or claimed now by this request.
    Ours,
    /// Claimed by another request, or used by one on a stream of this request.
    Refused,
    /// Claimed by this request before, under the message id it holds.
    Retry(u64),
}

impl KeyClaim {
    /// The first request's message id, for a retry.
    fn first(&self) -> Option<u64> {
        match self {
            KeyClaim::Retry(first) => Some(*first),
            _ => None,
        }
    }

    /// The id `job` is published under: a retry's, the first request's.
    fn id_of(&self, job: &Job<'_>) -> u64 {
        self.first().unwrap_or(job.draft.id)
    }
}

/// The answer to a publish.
pub enum Published<'a> {
    /// Sent; `remember` keeps the reply for retries with the same idempotency key.
    Delivered(Delivered, Remember<'a>),
    /// A retry of an idempotency key already used: the first publish's reply (or, on
    /// Redis before that reply was stored, its message id).
    Repeated(String),
    /// The first request with this idempotency key is still publishing.
    InProgress,
    /// The idempotency key was used with another request (route or body).
    Mismatch,
    /// Published, but its write reached `acked` of the `wanted` replicas within the
    /// timeout (`--history-min-replicas`): it may not survive a failover. `first`: the id
    /// of the message a retry's key had published (the one to tell the publisher).
    NotReplicated { acked: usize, wanted: usize, first: Option<u64> },
}

/// Where the reply to a publish with an idempotency key is kept for its retries.
pub enum Remember<'a> {
    Nothing,
    Memory(Claimed<'a>),
    Redis { history: &'a RedisHistory, keys: Vec<String>, key: &'a idempotency::Key },
}

impl Remember<'_> {
    pub fn reply(self, reply: &str) {
        match self {
            Remember::Nothing => {}
            Remember::Memory(claimed) => claimed.done(reply),
            Remember::Redis { history, keys, key } => history.remember(keys, key.record(reply)),
        }
    }
}

/// Redis failed: the message may have reached some connections (a batch can fail after
/// part of it was applied), or none.
pub struct Unavailable {
    pub reason: String,
}

/// Messages a publish request gives out before it lets other tasks run.
const UIDS_PER_YIELD: usize = 256;

/// One message of a publish request: what it says, where it goes, and its idempotency key.
pub struct Job<'a> {
    pub draft: Draft<'a>,
    /// Uids (each once), a topic, or everyone.
    pub target: Target<'a>,
    pub key: Option<&'a idempotency::Key>,
}

/// Each uid once, in the order given.
pub fn distinct<'u>(uids: impl IntoIterator<Item = &'u str>) -> Vec<&'u str> {
    let uids = uids.into_iter();
    let mut out: Vec<&str> = Vec::with_capacity(uids.size_hint().0);
    // A push names few uids: a scan beats hashing until it names many.
    const SCAN_UP_TO: usize = 16;
    let mut seen: HashSet<&str> = HashSet::new();
    for uid in uids {
        if out.len() < SCAN_UP_TO {
            if !out.contains(&uid) {
                out.push(uid);
            }
            continue;
        }
        if seen.is_empty() {
            seen.extend(out.iter().copied());
        }
        if seen.insert(uid) {
            out.push(uid);
        }
    }
    out
}

impl Registry {
    /// Where resuming clients read history.
    pub fn history(&self) -> History {
        match self {
            Registry::Memory { history, .. } => History::Memory(history.clone()),
            Registry::Redis(nodes) => History::Redis(nodes.history.clone()),
        }
    }

    /// A claim on `key` (memory registry; on Redis the append script checks it).
    fn claim<'a>(&'a self, key: Option<&idempotency::Key>) -> Result<Remember<'a>, Published<'a>> {
        match (self, key) {
            (Registry::Memory { idempotency, .. }, Some(key)) => match idempotency.claim(key) {
                Claim::First(claimed) => Ok(Remember::Memory(claimed)),
                Claim::InProgress => Err(Published::InProgress),
                Claim::Done(reply) => Err(Published::Repeated(reply)),
                Claim::Mismatch => Err(Published::Mismatch),
            },
            _ => Ok(Remember::Nothing),
        }
    }

    /// Publishes each job in order, each with an answer of its own. On Redis, a request's
    /// jobs together cost one lookup of the pushed uids' sessions and one pipeline of
    /// append scripts (and one `WAIT` with `--history-min-replicas`).
    pub async fn publish<'a>(&'a self, hub: &Arc<Hub>, jobs: &[Job<'a>]) -> Vec<Result<Published<'a>, Unavailable>> {
        match self {
            Registry::Memory { history, .. } => {
                let mut answers = Vec::with_capacity(jobs.len());
                // Messages given out since other tasks last ran (a push's own uids yield too).
                let mut since_yield = 0;
                for job in jobs {
                    since_yield += match &job.target {
                        Target::Uids(uids) => uids.len() % UIDS_PER_YIELD,
                        _ => 1,
                    };
                    if since_yield >= UIDS_PER_YIELD {
                        since_yield = 0;
                        tokio::task::yield_now().await;
                    }
                    let remember = match self.claim(job.key) {
                        Ok(remember) => remember,
                        Err(answered) => {
                            answers.push(Ok(answered));
                            continue;
                        }
                    };
                    let delivered = Registry::publish_here(history, hub, job).await;
                    answers.push(Ok(Published::Delivered(delivered, remember)));
                }
                answers
            }
            Registry::Redis(nodes) => nodes.durable(nodes.publish(hub, jobs).await).await,
        }
    }

    /// One node: the message takes its stream's next offset here and the hub delivers it,
    /// under the stream's order lock.
    async fn publish_here(history: &MemoryHistory, hub: &Arc<Hub>, job: &Job<'_>) -> Delivered {
        let draft = &job.draft;
        match &job.target {
            Target::Uids(uids) => {
                let mut result = Delivered::default();
                for (i, uid) in uids.iter().enumerate() {
                    let stream = Stream::Uid((*uid).into());
                    let _order = history.order(&stream).await;
                    let msg = history.append(&stream, true, draft.publisher, |position| draft.frame(position));
                    let (online, delivered) = hub.push(&[uid], &msg).await;
                    result.online += online;
                    result.delivered += delivered;
                    result.stored += msg.position.is_some() as usize;
                    if (i + 1) % UIDS_PER_YIELD == 0 {
                        tokio::task::yield_now().await;
                    }
                }
                result
            }
            Target::Topic(topic) => {
                let stream = Stream::Topic((*topic).into());
                let _order = history.order(&stream).await;
                let listened = hub.listened_within(topic, history.settings().ttl.as_millis() as u64) || crate::pusher::is_cache_topic(topic);
                let msg = match draft.is_client_event() {
                    true => draft.frame(None),
                    false => history.append(&stream, listened, draft.publisher, |position| draft.frame(position)),
                };
                let delivered = hub.publish(topic, &msg).await;
                Delivered { delivered, stored: msg.position.is_some() as usize, ..Delivered::default() }
            }
            Target::Everyone => {
                let _order = history.order(&Stream::Broadcast).await;
                let msg = history.append(&Stream::Broadcast, true, draft.publisher, |position| draft.frame(position));
                let delivered = hub.broadcast(&msg).await;
                Delivered { delivered, stored: msg.position.is_some() as usize, ..Delivered::default() }
            }
            // Only nodes send member changes, never the publish API.
            Target::Members(_) => Delivered::default(),
        }
    }

    /// A page of `topic`'s members: this node's on the memory registry, every node's on Redis.
    pub async fn presence_page(&self, presence: &Presence, topic: &str, cursor: Option<&str>, limit: usize) -> Result<Page, Unavailable> {
        match self {
            Registry::Memory { .. } => Ok(presence.local_page(topic, cursor, limit)),
            Registry::Redis(nodes) => nodes.members.page(topic, cursor, limit).await.map_err(|e| Unavailable { reason: format!("Redis: {e}") }),
        }
    }

    /// The occupied channels of Pusher app `app_id` (not its users') named from `prefix`, at most `limit`,
    /// by name, each with its subscriptions where they are known: every node's channels on
    /// Redis (subscriptions not summed there), this node's on the memory registry.
    pub async fn pusher_channels(&self, hub: &Hub, app: &crate::pusher::App, prefix: &str, limit: usize) -> Result<Vec<(String, Option<usize>)>, Unavailable> {
        match self {
            Registry::Memory { .. } => {
                let mut channels: Vec<(String, Option<usize>)> = hub
                    .topic_subscribers()
                    .into_iter()
                    .filter_map(|(topic, subscribers)| {
                        let channel = crate::pusher::channel_of(app, &topic).filter(|c| c.starts_with(prefix) && !c.starts_with(crate::pusher::SERVER_TO_USER))?;
                        Some((channel.to_owned(), Some(subscribers)))
                    })
                    .collect();
                channels.sort_unstable();
                channels.truncate(limit);
                Ok(channels)
            }
            Registry::Redis(nodes) => occupancy::channels(&nodes.redis, nodes.keys.prefix(), &app.id, prefix, limit)
                .await
                .map(|names| names.into_iter().map(|name| (name, None)).collect())
                .map_err(|e| Unavailable { reason: format!("Redis: {e}") }),
        }
    }

    /// Whether the Pusher channel `topic` has subscribers, and how many where that is
    /// known (as [`Registry::pusher_channels`]).
    pub async fn pusher_channel(&self, hub: &Hub, topic: &str) -> Result<(bool, Option<usize>), Unavailable> {
        match self {
            Registry::Memory { .. } => {
                let subscribers = hub.subscriber_count(topic);
                Ok((subscribers > 0, Some(subscribers)))
            }
            Registry::Redis(nodes) => occupancy::occupied(&nodes.redis, nodes.keys.prefix(), topic)
                .await
                .map(|occupied| (occupied, None))
                .map_err(|e| Unavailable { reason: format!("Redis: {e}") }),
        }
    }

    /// `topic`'s counts, in O(1).
    pub async fn presence_stats(&self, presence: &Presence, topic: &str) -> Result<Stats, Unavailable> {
        match self {
            Registry::Memory { .. } => Ok(presence.local_stats(topic)),
            Registry::Redis(nodes) => nodes.members.stats(topic).await.map_err(|e| Unavailable { reason: format!("Redis: {e}") }),
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
    history: Arc<RedisHistory>,
}

/// Connects to Redis (once from the main runtime, once from each of `cores`) and claims a
/// node id; `None` for the memory registry.
pub async fn connect(config: &Config, metrics: Arc<Metrics>, cores: &Arc<Cores>) -> Result<Option<Connected>, Error> {
    if config.registry == RegistryKind::Memory {
        return Ok(None);
    }
    let (redis, pushes) = Site::Redis.instrument(Redis::connect(config, metrics.clone(), cores)).await?;
    warn_if_redis_evicts_any_key(&redis).await;
    let keys = Keys::new(&config.redis_prefix);
    let epoch = crate::clock::wall_ms();
    let node = presence::claim_node_id(&redis, &keys, config.node_id, epoch, config.node_ttl).await?;
    tracing::info!(node, registry = ?config.registry, "claimed node id {node} in Redis");
    let history = Arc::new(RedisHistory::new(redis.clone(), &config.redis_prefix, crate::history::Settings::from_config(config), metrics.clone()));
    history.mark_born().await?;
    Ok(Some(Connected { redis, pushes, keys, node, epoch, ttl: config.node_ttl, changes: unbounded_channel(), metrics, history }))
}

/// Session keys have no TTL (they live as long as their node): a Redis that may evict
/// any key (`allkeys-*`) can drop one, and its connections stay unreachable until the
/// node's liveness key goes too. Said at start; a Redis that hides CONFIG is not asked.
async fn warn_if_redis_evicts_any_key(redis: &Redis) {
    // A map in RESP3, a flat list in RESP2: read as a map either way.
    let asked = redis.query::<HashMap<String, String>>(RedisCommand::Get, ::redis::cmd("CONFIG").arg("GET").arg("maxmemory-policy")).await;
    if let Some(policy) = asked.ok().and_then(|mut config| config.remove("maxmemory-policy")) {
        if policy.starts_with("allkeys") {
            tracing::warn!(
                policy = policy.as_str(),
                "Redis may evict any key when full (maxmemory-policy {policy}): an evicted session key leaves its connections unreachable; use noeviction or a volatile-* policy (only history keys, which expire, are then evicted)"
            );
        }
    }
}

impl Connected {
    /// Where the hub reports opens and closes.
    pub fn changes(&self) -> Changes {
        self.changes.0.clone()
    }

    /// Subscribes and starts writing sessions (and presence members) and reading other
    /// nodes' messages.
    /// With `pusher` (apps configured), Pusher channels' occupancy is written.
    pub async fn attach(self, hub: Arc<Hub>, presence: Option<Arc<Presence>>, webhooks: Option<Arc<Webhooks>>, pusher: bool) -> Result<(Registry, Attached), Error> {
        let awaited = Arc::new(Awaited::default());
        let members = Arc::new(Members::new(self.redis.clone(), self.keys.prefix(), self.node, self.epoch, webhooks.clone()));
        let occupancy_webhooks = webhooks.filter(|w| w.wants(EventKind::TopicOccupied) || w.wants(EventKind::TopicVacated));
        let occupancy = (occupancy_webhooks.is_some() || pusher).then(|| Occupancy::new(self.redis.clone(), self.keys.prefix(), self.node, self.epoch, occupancy_webhooks));
        let nodes = Nodes {
            redis: self.redis.clone(),
            keys: self.keys.clone(),
            node: self.node,
            epoch: self.epoch,
            metrics: self.metrics.clone(),
            liveness: Mutex::new(HashMap::new()),
            history: self.history.clone(),
            awaited: awaited.clone(),
            members: members.clone(),
        };
        nodes.subscribe().await?;
        let stop = CancellationToken::new();
        let listed = Arc::new(Listed::default());
        let inbox = relay::Inbox {
            hub: hub.clone(),
            metrics: self.metrics.clone(),
            redis: self.redis.clone(),
            node: self.node,
            channels: nodes.channels(),
            own_channels: nodes.own_channels(),
            awaited,
            history: self.history.clone(),
            presence: presence.clone(),
            listed: listed.clone(),
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
            history: self.history.clone(),
            presence: presence.map(|presence| (presence, members)),
            occupancy,
            listed,
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
    history: Arc<RedisHistory>,
    /// Publishes of this node waiting for their messages to come back on its channels.
    awaited: Arc<Awaited>,
    /// Presence topics' members on every node (written by the registrar, read here).
    members: Arc<Members>,
}

/// A session found in Redis.
struct Entry<'a> {
    uid: &'a str,
    session: SessionId,
    epoch: u64,
}

/// How long a publish waits for its own message to come back through Redis, to count
/// the connections it reached here.
const OWN_DELIVERY_WAIT: Duration = Duration::from_secs(1);

impl Nodes {
    /// This node's channels, one per stream group, which only it listens to.
    fn own_channels(&self) -> Vec<String> {
        (0..GROUPS).map(|g| RedisHistory::node_channel(self.keys.prefix(), self.node, g)).collect()
    }

    /// This node's channels and the fan-out channels, one of each per stream group:
    /// what it listens to.
    fn channels(&self) -> Vec<String> {
        let fanout = (0..GROUPS).map(|g| RedisHistory::fanout_channel(self.keys.prefix(), g));
        self.own_channels().into_iter().chain(fanout).collect()
    }

    /// Subscribes to this node's channels and the fan-out channels.
    pub async fn subscribe(&self) -> Result<(), Error> {
        for channel in self.channels() {
            self.redis.subscribe(&channel).await.map_err(|e| Error::unavailable(format!("subscribing to {channel}: {e}")))?;
        }
        Ok(())
    }

    /// Finds the nodes that hold the pushed uids' sessions (for every job at once), then
    /// appends each message to its streams and publishes it, all jobs' scripts in one
    /// pipeline: a push runs one script per uid stream, published to the nodes that hold
    /// that uid (this one included); a topic publish or broadcast runs one, published on
    /// its group's fan-out channel, which every node reads. Each job then waits for its
    /// message to come back here, to count the connections it reached on this node.
    async fn publish<'a>(&'a self, hub: &Hub, jobs: &[Job<'a>]) -> Vec<Result<Published<'a>, Unavailable>> {
        let pushed = distinct(jobs.iter().flat_map(|job| match &job.target {
            Target::Uids(uids) => uids.as_slice(),
            _ => &[],
        }).copied());
        // On one Redis the append script finds each uid's nodes itself; on a Cluster a
        // uid's sessions and its stream live in different slots, so they are read first.
        let locating = !self.redis.sharded();
        let remote = if pushed.is_empty() || locating {
            HashMap::new()
        } else {
            match self.locate(&pushed).await {
                Ok(remote) => remote,
                Err(e) => return jobs.iter().map(|_| Err(self.unavailable(&e))).collect(),
            }
        };
        let claims = match self.claims(jobs).await {
            Ok(claims) => claims,
            Err(e) => return jobs.iter().map(|_| Err(self.unavailable(&e))).collect(),
        };
        let prefix = self.keys.prefix();
        let mut calls = Vec::new();
        // Per job: its streams with the channels each was published to, and its wait.
        let mut planned = Vec::with_capacity(jobs.len());
        for (job, claim) in jobs.iter().zip(&claims) {
            if matches!(claim, KeyClaim::Refused) {
                planned.push((Vec::new(), None));
                continue;
            }
            let draft = &Draft { id: claim.id_of(job), ..job.draft };
            let published_ms = published_ms(draft);
            let envelope = draft.open_envelope();
            let relay = |group, target| Relay { origin: self.node, id: draft.id, published_ms, group: group as u8, sequence: 0, except: draft.except, target, envelope: "" }.encode();
            let mut streams = Vec::new();
            let own = match &job.target {
                Target::Uids(uids) => {
                    let mut local = 0;
                    for uid in uids {
                        let stream = Stream::Uid((*uid).into());
                        let here = hub.has_uid(uid);
                        local += here as usize;
                        let relay = relay(stream.group(), Target::Uids(vec![uid]));
                        if locating {
                            let uid_key = self.keys.uid_arg(uid);
                            let route = Route::Locate { uid_key: &uid_key.0, node: self.node, epoch: self.epoch, here };
                            calls.push(self.history.append_call(&stream, draft, &envelope, &relay, job.key, route));
                            streams.push((stream, Some(*uid)));
                            continue;
                        }
                        let nodes = remote.get(uid).map(Vec::as_slice).unwrap_or_default();
                        let channels: Vec<String> = nodes
                            .iter()
                            .map(|(node, _)| *node)
                            .chain(here.then_some(self.node))
                            .map(|node| RedisHistory::node_channel(prefix, node, stream.group()))
                            .collect();
                        calls.push(self.history.append_call(&stream, draft, &envelope, &relay, job.key, Route::Channels(&channels)));
                        streams.push((stream, Some(*uid)));
                    }
                    self.awaited.expect(draft.id, local)
                }
                Target::Members(_) => {
                    // Only nodes send member changes, never the publish API.
                    planned.push((Vec::new(), None));
                    continue;
                }
                Target::Topic(_) | Target::Everyone => {
                    let stream = match job.target {
                        Target::Topic(topic) => Stream::Topic(topic.into()),
                        _ => Stream::Broadcast,
                    };
                    let channel = RedisHistory::fanout_channel(prefix, stream.group());
                    let relay = relay(stream.group(), job.target.clone());
                    calls.push(self.history.append_call(&stream, draft, &envelope, &relay, job.key, Route::Channels(&[channel])));
                    streams.push((stream, None));
                    self.awaited.expect(draft.id, 1)
                }
            };
            planned.push((streams, own));
        }
        let appended = match calls.is_empty() {
            // Every job was refused: nothing to append.
            true => Ok(Vec::new()),
            false => self.redis.scripts(RedisCommand::Append, self.history.script(), &calls).await,
        };
        let mut appended = match appended {
            Ok(appended) => appended.into_iter(),
            Err(e) => {
                jobs.iter().zip(&claims).for_each(|(job, claim)| self.awaited.forget(claim.id_of(job)));
                return jobs.iter().map(|_| Err(self.unavailable(&e))).collect();
            }
        };
        let mut answers = Vec::with_capacity(jobs.len());
        for ((job, (streams, own)), claim) in jobs.iter().zip(planned).zip(claims) {
            if matches!(claim, KeyClaim::Refused) {
                answers.push(Ok(Published::Mismatch));
                continue;
            }
            let (id, first) = (claim.id_of(job), claim.first());
            let (key, kind) = (job.key, job.target.kind());
            let mut result = Delivered { first, ..Delivered::default() };
            let (mut repeated, mut remembered, mut mismatched, mut published) = (Vec::new(), Vec::new(), false, false);
            // Other nodes a push reached, each once however many of its uids they hold.
            let mut reached: Vec<u16> = Vec::new();
            for (stream, uid) in &streams {
                match appended.next().and_then(Appended::parse) {
                    Some(Appended::Repeated(record)) => match read_record(key, &record) {
                        Some(first) => repeated.push(first.to_owned()),
                        None => mismatched = true,
                    },
                    Some(Appended::Published { offset, heard, sequence, reset, located, .. }) => {
                        published = true;
                        self.history.appended(stream.group(), sequence, reset);
                        result.stored += (offset > 0) as usize;
                        if let Some(key) = key {
                            remembered.push(self.history.idempotency_key(stream, &key.scoped));
                        }
                        match uid {
                            // Other nodes' channels come first, in the order of `nodes`; a
                            // node that did not hear it (dead, its key not yet expired)
                            // leaves the others delivered.
                            Some(uid) => {
                                let nodes = located.as_deref().or(remote.get(uid).map(Vec::as_slice)).unwrap_or_default();
                                for (i, (node, sessions)) in nodes.iter().enumerate() {
                                    result.online += sessions;
                                    if heard.get(i).is_some_and(|n| *n > 0) {
                                        result.delivered += sessions;
                                        if !reached.contains(node) {
                                            reached.push(*node);
                                        }
                                    } else {
                                        self.metrics.dropped(DropReason::NodeUnreachable, *sessions);
                                    }
                                }
                                if heard.iter().any(|n| *n > 0) {
                                    self.metrics.relayed(Relayed::Out, kind);
                                }
                            }
                            // This node reads the fan-out channel too.
                            None => {
                                result.nodes += heard.iter().sum::<usize>().saturating_sub(1);
                                self.metrics.relayed(Relayed::Out, kind);
                            }
                        }
                    }
                    None => self.metrics.dropped(DropReason::BadRelay, 1),
                }
            }
            // Nothing of it was published: a retry (or a reuse) of its key, or Redis
            // answered nothing readable.
            if !published {
                self.awaited.forget(id);
                answers.push(if mismatched {
                    Ok(Published::Mismatch)
                } else if !repeated.is_empty() {
                    Ok(Published::Repeated(first_reply(id, &repeated)))
                } else {
                    Err(Unavailable { reason: "the append script answered something unreadable".into() })
                });
                continue;
            }
            result.nodes += reached.len();
            let (online_here, delivered_here) = self.awaited.wait(id, own, OWN_DELIVERY_WAIT).await;
            result.online += online_here;
            result.delivered += delivered_here;
            let remember = match key {
                Some(key) => Remember::Redis { history: &self.history, keys: remembered, key },
                None => Remember::Nothing,
            };
            answers.push(Ok(Published::Delivered(result, remember)));
        }
        answers
    }

    /// Per job, what its idempotency key's claim says. The append script checks the key of
    /// each stream as it appends, which alone would let a request reusing a key publish to
    /// the streams the first did not take (and have its retry refused), or on streams of
    /// its own. So first, in one round trip, a keyed job claims its key for its request
    /// (`SET NX` of the request's fingerprint and message id, for the key's window) and
    /// reads each stream's record: a key claimed by another request, or recorded on one of
    /// its streams by another, refuses the job whole, before anything is published. Of two
    /// different requests sent at once with one key, one claims it. A key this request
    /// claimed before under another id is a retry: it publishes what is missing (the first
    /// was cut short, or is under way) under the first id, which each stream takes once.
    async fn claims(&self, jobs: &[Job<'_>]) -> ::redis::RedisResult<Vec<KeyClaim>> {
        /// What each command of the round trip asks.
        enum Check {
            Claim,
            Claimed,
            Stream,
        }
        let streams = |job: &Job<'_>| -> Vec<Stream> {
            match &job.target {
                Target::Uids(uids) => uids.iter().map(|uid| Stream::Uid((*uid).into())).collect(),
                Target::Topic(topic) => vec![Stream::Topic((*topic).into())],
                Target::Everyone => vec![Stream::Broadcast],
                Target::Members(_) => Vec::new(),
            }
        };
        let window = self.history.settings().idempotency_window.as_millis().max(1) as u64;
        let mut asked = Vec::new();
        for (i, job) in jobs.iter().enumerate() {
            if let Some(key) = job.key {
                let claim = self.history.request_key(&key.scoped);
                let value = format!("{}|{}", key.fingerprint, job.draft.id);
                asked.push((i, Check::Claim, ::redis::cmd("SET").arg(&claim).arg(value).arg("NX").arg("PX").arg(window).clone()));
                asked.push((i, Check::Claimed, ::redis::cmd("GET").arg(&claim).clone()));
                for stream in streams(job) {
                    asked.push((i, Check::Stream, ::redis::cmd("GET").arg(self.history.idempotency_key(&stream, &key.scoped)).clone()));
                }
            }
        }
        let mut claims: Vec<KeyClaim> = jobs.iter().map(|_| KeyClaim::Ours).collect();
        if asked.is_empty() {
            return Ok(claims);
        }
        let (checks, cmds): (Vec<(usize, Check)>, Vec<Cmd>) = asked.into_iter().map(|(i, check, cmd)| ((i, check), cmd)).unzip();
        let records = self.redis.batch(RedisCommand::Get, cmds).await?;
        for ((i, check), record) in checks.into_iter().zip(records) {
            let (Some(key), Ok(Some(record))) = (jobs[i].key, ::redis::from_redis_value::<Option<String>>(record)) else { continue };
            let claim = match check {
                Check::Claim => continue,
                // On a Cluster the claim and its read may run in either order: nothing
                // read is no other request's claim either.
                Check::Claimed => match record.split_once('|') {
                    Some((fingerprint, _)) if fingerprint != key.fingerprint => KeyClaim::Refused,
                    Some((_, first)) => match first.parse::<u64>() {
                        Ok(first) if first != jobs[i].draft.id => KeyClaim::Retry(first),
                        _ => continue,
                    },
                    None => KeyClaim::Refused,
                },
                Check::Stream if key.read(&record).is_none() => KeyClaim::Refused,
                Check::Stream => continue,
            };
            if !matches!(claims[i], KeyClaim::Refused) {
                claims[i] = claim;
            }
        }
        Ok(claims)
    }

    /// Where each uid's sessions on other live nodes are: uid -> each node and its sessions.
    async fn locate<'u>(&self, uids: &[&'u str]) -> ::redis::RedisResult<HashMap<&'u str, Vec<(u16, usize)>>> {
        let lookups: Vec<Cmd> = uids
            .iter()
            .map(|uid| {
                let mut lookup = Cmd::with_capacity(2, self.keys.prefix().len() + uid.len() + 16);
                lookup.arg("HGETALL").arg(self.keys.uid_arg(uid));
                lookup
            })
            .collect();
        let found = self.redis.batch(RedisCommand::Hgetall, lookups).await?;
        let mut remote: Vec<Entry> = Vec::new();
        let mut stale: Vec<Entry> = Vec::new();
        for (uid, hash) in uids.iter().zip(found) {
            for (session, epoch) in hash_entries(hash) {
                let entry = Entry { uid, session: SessionId(session), epoch };
                if entry.session.node() == self.node {
                    // Local sessions are the hub's; an older epoch is a previous run of this node.
                    if epoch < self.epoch {
                        stale.push(entry);
                    }
                } else {
                    remote.push(entry);
                }
            }
        }
        let wanted: Vec<u16> = remote.iter().map(|e| e.session.node()).collect::<HashSet<_>>().into_iter().collect();
        let mut live = self.live_epochs(&wanted, false).await?;
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
            live.extend(self.live_epochs(&doubtful, true).await?);
        }
        let mut located: HashMap<&'u str, Vec<(u16, usize)>> = HashMap::new();
        for entry in remote {
            match live.get(&entry.session.node()).copied().flatten() {
                Some(epoch) if epoch == entry.epoch => {
                    let nodes = located.entry(entry.uid).or_default();
                    let node = entry.session.node();
                    match nodes.iter_mut().find(|(n, _)| *n == node) {
                        Some((_, sessions)) => *sessions += 1,
                        None => nodes.push((node, 1)),
                    }
                }
                // Written by a run newer than the key just read: neither deliver nor delete.
                Some(epoch) if epoch < entry.epoch => {}
                // The node is gone, or a newer run holds its id.
                _ => stale.push(entry),
            }
        }
        self.forget(stale);
        Ok(located)
    }

    /// The answers, unless their writes must reach `--history-min-replicas` replicas and
    /// did not within `--history-replica-timeout` (one `WAIT` for the whole request). A
    /// retry with the same Idempotency-Key (answered from the first write) waits for the
    /// replicas again.
    async fn durable<'a>(&self, answers: Vec<Result<Published<'a>, Unavailable>>) -> Vec<Result<Published<'a>, Unavailable>> {
        let wanted = self.history.settings().min_replicas;
        let written = |answer: &Result<Published<'a>, Unavailable>| matches!(answer, Ok(Published::Delivered(..) | Published::Repeated(_)));
        if wanted == 0 || !answers.iter().any(written) {
            return answers;
        }
        let timeout = self.history.settings().replica_timeout.as_millis() as u64;
        let wait = ::redis::cmd("WAIT").arg(wanted).arg(timeout.max(1)).clone();
        let acked = self.redis.query::<usize>(RedisCommand::Wait, &wait).await;
        answers
            .into_iter()
            .map(|answer| match &acked {
                _ if !written(&answer) => answer,
                Ok(acked) if *acked >= wanted => answer,
                Ok(acked) => {
                    self.metrics.not_replicated.increment(1);
                    let first = match &answer {
                        Ok(Published::Repeated(reply)) => first_id(reply),
                        Ok(Published::Delivered(delivered, _)) => delivered.first,
                        _ => None,
                    };
                    Ok(Published::NotReplicated { acked: *acked, wanted, first })
                }
                Err(e) => Err(self.unavailable(e)),
            })
            .collect()
    }

    /// Counts the publish as not made and says why.
    fn unavailable(&self, e: &::redis::RedisError) -> Unavailable {
        self.metrics.dropped(DropReason::RegistryUnavailable, 1);
        Unavailable { reason: format!("Redis: {e}") }
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
        let epochs = self.redis.batch(RedisCommand::Get, reads).await?;
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
            .map(|e| ::redis::cmd("EVAL").arg(presence::DELETE_IF_EPOCH).arg(1).arg(self.keys.uid_arg(e.uid)).arg(e.session.0).arg(e.epoch).clone())
            .collect();
        let redis = self.redis.clone();
        tokio::spawn(async move {
            if let Err(e) = redis.batch(RedisCommand::Hdel, cmds).await {
                tracing::debug!(error = %e, "could not delete sessions of dead nodes");
            }
        });
    }
}


/// Wall-clock time of the publish, so every node measures latency from it.
fn published_ms(draft: &Draft<'_>) -> u64 {
    crate::clock::wall_ms().saturating_sub(draft.accepted_at.elapsed().as_millis() as u64)
}

/// What an idempotency key's record in Redis holds for `key`'s request; None when it was
/// written by another request.
fn read_record<'r>(key: Option<&idempotency::Key>, record: &'r str) -> Option<&'r str> {
    match key {
        Some(key) => key.read(record),
        None => Some(record),
    }
}

/// The reply to a repeated idempotency key: the first publish's reply when stored,
/// else its message id.
fn first_reply(id: u64, repeated: &[String]) -> String {
    match repeated.iter().find(|r| r.starts_with('{')) {
        Some(reply) => reply.clone(),
        None => serde_json::json!({ "id": repeated.first().cloned().unwrap_or_else(|| id.to_string()), "repeated": true }).to_string(),
    }
}

/// The message id of a repeated key's reply ([`first_reply`]).
fn first_id(reply: &str) -> Option<u64> {
    serde_json::from_str::<serde_json::Value>(reply).ok()?.get("id")?.as_str()?.parse().ok()
}

/// Session id -> epoch pairs of an HGETALL answer; entries that do not parse are skipped.
fn hash_entries(value: Value) -> Vec<(u64, u64)> {
    ::redis::from_redis_value::<HashMap<u64, u64>>(value).map(|m| m.into_iter().collect()).unwrap_or_default()
}
