//! This node's presence in Redis: its node id and liveness key, and its sessions, written
//! in batches.
//!
//! Keys (`P` is `--redis-prefix`):
//! - `P:node:<id>`: the node's epoch (start time, ms), with a TTL of `--node-ttl`,
//!   refreshed every third of it. Heartbeats from clients cost Redis nothing.
//! - `P:uid:<uid>`: a hash, session id -> epoch of the node that holds it. One HSET when a
//!   connection opens, one HDEL when it closes. An entry whose node key is gone, or holds
//!   another epoch, is a dead node's session: lookups skip it and delete it.
//! - `P:sessions:<id>:<epoch>`: a set of `<session>:<uid>`, the node's live sessions (SADD
//!   at open, SREM at close, in the same batch), so that a dead node's entries can be
//!   found without scanning every uid.
//! - `P:nodes`: a set of `<id>:<epoch>`, every node run that has registered sessions and
//!   not yet been cleaned up after.
//! - `P:shard:{TAG}:<id>`: on a Redis Cluster, the node's epoch in each range of slots,
//!   with the liveness key's TTL: how a shard that lost keys with its link up is noticed
//!   (`shards`).
//!
//! Every node reaps: once per `--node-ttl` it reads `P:nodes`, and for a run whose
//! liveness key is gone (or holds a newer epoch), at two passes in a row, it takes a short lock, deletes that
//! run's uid entries (each only if it still holds that epoch), a batch at a time, then its
//! sessions set and its `P:nodes` member. Redis memory comes back after nodes die.
//!
//! A node that finds its liveness key holding another epoch has had its id taken by
//! another process (after a partition, say): it stops serving as that id, closing its
//! clients so they reconnect elsewhere, rather than serve sessions Redis attributes to
//! someone else.
//!
//! The hub reports each open and close on a channel; one task coalesces them and writes
//! them as one pipeline per batch, so a storm of connects costs a few round trips. Presence
//! reports on the same channel each (topic, uid) whose connections here changed; the same
//! task writes them (`members`), and its reaper takes a dead run's members out too. While
//! Redis is down, changes wait (an open and a close of the same session cancel out); when
//! the liveness key turns out to be missing (Redis restarted empty, or the node was gone
//! longer than its TTL), every local session is written again.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use compact_str::CompactString;
use std::io::Write;

use redis::{Cmd, RedisWrite, Value};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::redis_link::{Joined, Redis};
use crate::history::redis::RedisHistory;
use crate::error::Error;
use crate::hub::{Change, Hub};
use crate::presence::Presence;
use super::listed::Listed;
use super::members::Members;
use super::occupancy::Occupancy;
use super::shards::ShardMarks;
use crate::session::SessionId;
use crate::telemetry::{Metrics, RedisCommand};

/// Most session changes written in one pipeline.
const BATCH: usize = 1024;
/// First wait after a failed write; doubles up to `node_ttl / 3`.
const RETRY_FIRST: Duration = Duration::from_millis(100);

/// Key and channel names under one prefix.
#[derive(Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys { prefix: prefix.to_string() }
    }

    pub fn node(&self, node: u16) -> String {
        format!("{}:node:{node}", self.prefix)
    }

    /// `P:uid:<uid>` as a command argument, written into the command with no String of
    /// its own.
    pub fn uid_arg<'a>(&'a self, uid: &'a str) -> Joined<'a, 3> {
        Joined([self.prefix.as_bytes(), b":uid:", uid.as_bytes()])
    }

    /// The live sessions of one run of a node.
    pub fn sessions(&self, node: u16, epoch: u64) -> String {
        format!("{}:sessions:{node}:{epoch}", self.prefix)
    }

    /// A node's mark in the shard that holds hash tag `tag` (see `shards`).
    pub fn shard_mark(&self, tag: &str, node: u16) -> String {
        format!("{}:shard:{{{tag}}}:{node}", self.prefix)
    }

    /// The node runs that have registered sessions.
    pub fn runs(&self) -> String {
        format!("{}:nodes", self.prefix)
    }

    /// The lock of whoever is cleaning up after a dead run.
    fn reaping(&self, run: &str) -> String {
        format!("{}:reaping:{run}", self.prefix)
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}

/// Takes a node id: `wanted`, waiting up to `ttl` for a previous holder's key to expire,
/// or else the first free one from a pseudo-random start. Returns the id.
pub async fn claim_node_id(redis: &Redis, keys: &Keys, wanted: Option<u16>, epoch: u64, ttl: Duration) -> Result<u16, Error> {
    let claim = |node: u16| {
        let mut cmd = redis::cmd("SET");
        cmd.arg(keys.node(node)).arg(epoch).arg("NX").arg("PX").arg(ttl.as_millis() as u64);
        cmd
    };
    let claimed = |v: Value| matches!(v, Value::Okay);
    match wanted {
        Some(node) => {
            let deadline = tokio::time::Instant::now() + ttl + Duration::from_secs(1);
            loop {
                let v: Value = redis.query(RedisCommand::Set, &claim(node)).await.map_err(|e| Error::unavailable(format!("claiming node id {node}: {e}")))?;
                if claimed(v) {
                    return Ok(node);
                }
                if tokio::time::Instant::now() > deadline {
                    return Err(Error::config(format!(
                        "node id {node} is held by a live node (key {} exists); choose another --node-id, or leave it unset to claim a free one",
                        keys.node(node)
                    )));
                }
                tracing::info!(node, "node id {node} is still held; waiting for its previous holder's key to expire");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
        None => {
            let start = (epoch % 1023) as u16 + 1;
            for i in 0..1023u16 {
                let node = (start + i - 1) % 1023 + 1;
                let v: Value = redis.query(RedisCommand::Set, &claim(node)).await.map_err(|e| Error::unavailable(format!("claiming a node id: {e}")))?;
                if claimed(v) {
                    return Ok(node);
                }
            }
            Err(Error::new(crate::error::Kind::Overloaded, "every node id 1-1023 is held by a live node"))
        }
    }
}

/// Deletes a uid's session entry only if it still holds the epoch given: an entry of a
/// newer run with the same session id is kept.
pub const DELETE_IF_EPOCH: &str =
    "if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return redis.call('HDEL', KEYS[1], ARGV[1]) end return 0";

/// Session entries a reaper deletes per round trip, and the pause between batches.
const REAP_BATCH: usize = 200;
const REAP_PAUSE: Duration = Duration::from_millis(20);

/// Writes this node's session changes, keeps its liveness key and reaps after dead
/// nodes, until `stop`; then writes what is left, removes every session still
/// registered and the liveness key.
pub struct Registrar {
    pub redis: Redis,
    pub keys: Keys,
    pub hub: Arc<Hub>,
    pub node: u16,
    pub epoch: u64,
    pub ttl: Duration,
    pub metrics: Arc<Metrics>,
    /// Cancelled when another process turns out to hold this node's id.
    pub evicted: CancellationToken,
    /// Where topics' interest keys are: written while this node has subscribers to them.
    pub history: Arc<RedisHistory>,
    /// This node's presence members, and where they are written, when presence is on.
    pub presence: Option<(Arc<Presence>, Arc<Members>)>,
    /// Where this node's topics are written, when webhooks want topic_occupied/vacated or
    /// Pusher apps are configured.
    pub occupancy: Option<Occupancy>,
    pub listed: Arc<Listed>,
}

/// What a liveness refresh found.
enum Liveness {
    Held,
    /// The key had vanished (Redis restarted, or this node was unreachable past its TTL).
    Missing,
    /// Another run of this node id holds it.
    Taken(u64),
    Unknown,
}

impl Registrar {
    pub async fn run(self, mut changes: UnboundedReceiver<Change>, stop: CancellationToken) {
        // Latest change per session not yet written.
        let mut pending = Unwritten::default();
        // Opens someone waits to see written (resumes): written first, then told.
        let mut waiting: HashMap<SessionId, oneshot::Sender<()>> = HashMap::new();
        // Sessions open here, from the changes received.
        let mut known: i64 = 0;
        // Presence members whose connections here changed, and the topics recorded for
        // the reaper.
        let mut members = Membership::default();
        // Topics whose interest key is to be written.
        let mut listening: HashSet<Arc<str>> = HashSet::new();
        // Topics that gained their first subscriber here or lost their last, for the
        // occupancy webhooks.
        let mut occupied: HashSet<Arc<str>> = HashSet::new();
        let mut received = Vec::with_capacity(BATCH);
        let history_ttl = self.history.settings().ttl;
        let mut relisten = tokio::time::interval((history_ttl / 3).max(Duration::from_secs(1)));
        relisten.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let refresh_every = self.ttl / 3;
        let mut refresh = tokio::time::interval(refresh_every);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut retry = RETRY_FIRST;
        let mut failing = false;
        let mut must_register = false;
        // The link's break count at a liveness refresh that found this node's sessions
        // in Redis, or had them queued again: confirmed once they are written.
        let mut relisting: Option<u64> = None;
        // The link's break count at the last refresh; and whether Redis lost this node's
        // sessions where the relay's own `relay_lost` may not cover it: with the link
        // unbroken (a FLUSHALL, an eviction, a lapse while slow), or in a shard whose mark
        // vanished, which can come after a break the relay has already told and healed.
        // Pushes meanwhile found none of its clients: they are told once it is written.
        let mut breaks_before = self.redis.breaks();
        let mut lost_unbroken = false;
        let mut marks = ShardMarks::default();
        // Runs of other nodes whose liveness key the last reap found gone.
        let mut gone_before = HashSet::new();
        let mut reap = tokio::time::interval(self.ttl);
        reap.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let retry_timer = tokio::time::sleep(retry);
        tokio::pin!(retry_timer);
        loop {
            let mut due = !failing;
            // Sessions and members left to write go a batch per turn, so that a storm of
            // connects (or every session registered again) does not hold up the liveness
            // refresh past the node's TTL: a refresh that waits behind a minute of writes
            // to a slow Redis lets the key lapse, and the node then writes everything
            // again.
            let more = !failing && (!pending.is_empty() || !members.changed.is_empty());
            tokio::select! {
                _ = std::future::ready(()), if more => {}
                n = changes.recv_many(&mut received, BATCH) => {
                    if n == 0 {
                        break;
                    }
                    for change in received.drain(..) {
                        match change {
                            Change::Listening(topic) => {
                                if self.occupancy.as_ref().is_some_and(|o| o.tracks(&topic)) {
                                    occupied.insert(topic.clone());
                                }
                                listening.insert(topic);
                            }
                            Change::Member(topic, uid) => {
                                members.changed.insert((topic, uid));
                            }
                            Change::Written(session, told) => {
                                if pending.get(&session).is_some_and(|p| p.opened) {
                                    waiting.insert(session, told);
                                } else {
                                    // Written already (or closed since).
                                    let _ = told.send(());
                                }
                            }
                            change => {
                                known += match change {
                                    Change::Opened(..) => 1,
                                    _ => -1,
                                };
                                coalesce(&mut pending, change);
                            }
                        }
                    }
                }
                _ = relisten.tick() => {
                    listening.extend(self.hub.topic_subscribers().into_iter().map(|(topic, _)| topic));
                    due = true;
                }
                _ = self.listed.asked() => refresh.reset_immediately(),
                _ = refresh.tick(), if !self.evicted.is_cancelled() => {
                    let breaks = self.redis.breaks();
                    let liveness = self.refresh_liveness().await;
                    // On a Cluster the liveness key is in one shard: another that broke
                    // may have come back empty (restarted without persistence, or a
                    // replica promoted before it had every write) with this key intact,
                    // and the sessions in its slots gone. After any break, all is written
                    // again (found by an attack: a shard restarted empty left a third of
                    // the connected clients unreachable for good, untold). So after a
                    // Sentinel failover: the promoted replica has the liveness key, and
                    // may lack the last session writes.
                    match liveness {
                        Liveness::Missing => {
                            must_register = true;
                            lost_unbroken |= breaks == breaks_before;
                            // Redis lost its keys, topics' interest keys with them: mark
                            // them again now, not a third of the history TTL from now.
                            relisten.reset_immediately();
                        }
                        Liveness::Held if self.redis.breaks_may_lose_writes() && breaks != breaks_before => {
                            tracing::warn!("a Redis link broke (a Cluster shard, or a Sentinel failover): writing every session again, in case the server it reaches now lacks them");
                            must_register = true;
                            relisten.reset_immediately();
                        }
                        Liveness::Taken(other) => {
                            tracing::error!(
                                node = self.node,
                                other_epoch = other,
                                "another process holds this node id (claimed while this one could not reach Redis): closing every client so they reconnect elsewhere, and stopping"
                            );
                            self.evicted.cancel();
                            continue;
                        }
                        Liveness::Held | Liveness::Unknown => {}
                    }
                    // A shard that lost keys with its link up (see `shards`).
                    if self.redis.sharded() && matches!(liveness, Liveness::Held | Liveness::Missing) {
                        let lost = marks.refresh(&self.redis, |tag| self.keys.shard_mark(tag, self.node), self.epoch, self.ttl).await;
                        if lost == Some(true) {
                            tracing::warn!("a Redis Cluster shard lost this node's mark (a FLUSHALL, an eviction, a restart): writing every session again, then telling every client here of a gap");
                            must_register = true;
                            // Told even when a break was seen too: the relay may have told
                            // its gap and heard again before the loss (found by an attack:
                            // a FLUSHALL 3 s after a shard restart went untold).
                            lost_unbroken = true;
                            relisten.reset_immediately();
                        }
                    }
                    if must_register {
                        match self.announce().await {
                            Ok(()) => {
                                must_register = false;
                                self.register_again(&mut pending);
                                if let Some(occupancy) = &self.occupancy {
                                    occupied.extend(self.hub.topic_subscribers().into_iter().map(|(topic, _)| topic).filter(|topic| occupancy.tracks(topic)));
                                }
                                if let Some((presence, _)) = &self.presence {
                                    members.changed.extend(presence.local_members());
                                    members.recorded.clear();
                                }
                            }
                            Err(e) => tracing::warn!(error = %e, "registering sessions again failed; will retry at the next refresh"),
                        }
                    }
                    if !must_register && matches!(liveness, Liveness::Held | Liveness::Missing) {
                        relisting = Some(breaks);
                    }
                    if matches!(liveness, Liveness::Held | Liveness::Missing) {
                        pending.repeat_closes();
                    }
                    // A refresh that could not reach Redis judges nothing: the breaks
                    // since are weighed at the next.
                    if !matches!(liveness, Liveness::Unknown) {
                        breaks_before = breaks;
                    }
                    due = true;
                }
                _ = reap.tick() => {
                    if let Err(e) = self.reap(&mut gone_before).await {
                        tracing::debug!(error = %e, "reaping after dead nodes failed; will retry");
                    }
                }
                _ = &mut retry_timer, if failing => due = true,
                _ = stop.cancelled() => break,
            }
            if due {
                let written = match self.write_interest(&mut listening, history_ttl).await.and(self.flush(&mut pending, &mut waiting, false).await) {
                    Ok(()) => match self.write_members(&mut members, false).await {
                        Ok(()) => self.write_occupancy(&mut occupied).await,
                        failed => failed,
                    },
                    failed => failed,
                };
                match written {
                    Ok(()) => {
                        retry = RETRY_FIRST;
                        failing = false;
                        if pending.is_empty() {
                            if let Some(breaks) = relisting.take() {
                                self.listed.confirm(breaks);
                                // A broken link's clients are told by the relay, once
                                // this confirms; an unbroken one's only from here.
                                if std::mem::take(&mut lost_unbroken) {
                                    tracing::warn!("this node's sessions are in Redis again after Redis lost them with the link up (a FLUSHALL or an eviction?): telling every client here of a gap");
                                    super::relay::tell_relay_lost(&self.hub, &self.metrics).await;
                                }
                            }
                        }
                    }
                    Err(e) => {
                        if !failing {
                            tracing::warn!(error = %e, pending = pending.len(), "cannot write sessions to Redis; will retry");
                        }
                        failing = true;
                        retry_timer.as_mut().reset(tokio::time::Instant::now() + retry);
                        retry = (retry * 2).min(refresh_every);
                    }
                }
            }
            self.metrics.registry_pending.set(pending.len() as f64);
            self.metrics.registry_sessions.set(pending.registered(known));
        }
        // Shutdown: every connection has closed and reported it by now.
        while let Ok(change) = changes.try_recv() {
            match change {
                Change::Member(topic, uid) => {
                    members.changed.insert((topic, uid));
                }
                Change::Listening(topic) if self.occupancy.as_ref().is_some_and(|o| o.tracks(&topic)) => {
                    occupied.insert(topic);
                }
                change => coalesce(&mut pending, change),
            }
        }
        if let Err(e) = self.write_members(&mut members, true).await {
            tracing::warn!(error = %e, "could not take this node's presence members out of Redis; the reaper will, once its liveness key expires");
        }
        if let Some(occupancy) = &self.occupancy {
            let written = self.write_occupancy(&mut occupied).await;
            if let Err(e) = written.and(occupancy.left().await) {
                tracing::warn!(error = %e, "could not take this node out of its topics' occupancy in Redis; the reaper will, once its liveness key expires");
            }
        }
        let left = self.leave(&mut pending).await;
        match left {
            Ok(()) => tracing::info!(node = self.node, "removed this node's sessions and liveness key from Redis"),
            Err(e) => tracing::warn!(error = %e, "could not remove this node from Redis; its sessions expire with its liveness key"),
        }
    }

    /// Writes the interest keys of `topics` (this node has subscribers to them, or just
    /// lost its last one), so their messages are kept for `ttl`; what fails stays.
    async fn write_interest(&self, topics: &mut HashSet<Arc<str>>, ttl: Duration) -> redis::RedisResult<()> {
        if self.history.settings().size == 0 {
            topics.clear();
            return Ok(());
        }
        while !topics.is_empty() {
            let batch: Vec<Arc<str>> = topics.iter().take(BATCH).cloned().collect();
            let cmds: Vec<Cmd> = batch
                .iter()
                .map(|t| redis::cmd("SET").arg(self.history.interest_key(t)).arg(1).arg("PX").arg(ttl.as_millis() as u64).clone())
                .collect();
            self.redis.batch(RedisCommand::Interest, cmds).await?;
            for topic in &batch {
                topics.remove(topic);
            }
        }
        Ok(())
    }

    /// Writes a batch of this node's changed presence members (all of them when `all`);
    /// what fails stays.
    async fn write_members(&self, members: &mut Membership, all: bool) -> redis::RedisResult<()> {
        let Some((presence, writer)) = &self.presence else {
            members.changed.clear();
            return Ok(());
        };
        let mut turns = if all { usize::MAX } else { 1 };
        while !members.changed.is_empty() && turns > 0 {
            turns -= 1;
            let batch: Vec<(Arc<str>, CompactString)> = members.changed.iter().take(BATCH).cloned().collect();
            let new_topics: Vec<Arc<str>> = {
                let mut new: Vec<Arc<str>> = batch.iter().map(|(t, _)| t.clone()).filter(|t| !members.recorded.contains(t)).collect();
                new.sort();
                new.dedup();
                new
            };
            writer.write(presence, &batch, &new_topics).await?;
            members.recorded.extend(new_topics);
            for member in &batch {
                members.changed.remove(member);
            }
        }
        Ok(())
    }

    /// Writes whether this node still has subscribers to each of `topics`, a batch at a
    /// time; what fails stays.
    async fn write_occupancy(&self, topics: &mut HashSet<Arc<str>>) -> redis::RedisResult<()> {
        let Some(occupancy) = &self.occupancy else { return Ok(()) };
        while !topics.is_empty() {
            let batch: Vec<(Arc<str>, bool)> = topics.iter().take(BATCH).map(|t| (t.clone(), self.hub.has_subscribers(t))).collect();
            occupancy.write(&batch).await?;
            for (topic, _) in &batch {
                topics.remove(topic);
            }
        }
        Ok(())
    }

    /// Writes one batch of pending changes, or every one when `all`; what fails stays
    /// pending.
    async fn flush(&self, pending: &mut Unwritten, waiting: &mut HashMap<SessionId, oneshot::Sender<()>>, all: bool) -> redis::RedisResult<()> {
        let mut turns = if all { usize::MAX } else { 1 };
        // An awaited open closed before it was written is dropped (its waiter is told it
        // was not written); the others go first.
        waiting.retain(|session, _| pending.get(session).is_some_and(|p| p.opened));
        while !pending.is_empty() && turns > 0 {
            turns -= 1;
            let awaited = waiting.keys().copied();
            let rest = pending.keys().copied().filter(|s| !waiting.contains_key(s));
            let batch: Vec<(SessionId, Arc<str>, bool)> = awaited
                .chain(rest)
                .take(BATCH)
                .filter_map(|s| pending.get(&s).map(|p| (s, p.uid.clone(), p.opened)))
                .collect();
            let cmds = self.change_cmds(&batch);
            if let Err(e) = self.redis.batch(RedisCommand::Sessions, cmds).await {
                for (session, _, _) in &batch {
                    pending.mark_tried(session);
                }
                return Err(e);
            }
            for (session, _, _) in &batch {
                pending.written(session);
                if let Some(told) = waiting.remove(session) {
                    let _ = told.send(());
                }
            }
        }
        Ok(())
    }

    /// The writes of sessions opening or closing (each once in `batch`): each one's uid
    /// entry, and its member of this run's sessions set, added in one SADD and removed in
    /// one SREM for the whole batch, since they share that key.
    fn change_cmds(&self, batch: &[(SessionId, impl AsRef<str>, bool)]) -> Vec<Cmd> {
        // Each command is sized before it is written: growing them took about a third of
        // the registrar's CPU in a 1M connect (perf).
        let member_bytes: usize = batch.iter().map(|(_, uid, _)| uid.as_ref().len() + 21).sum();
        let key_bytes = self.keys.prefix().len() + 5;
        let mut cmds = Vec::with_capacity(batch.len() + 2);
        let sessions = self.keys.sessions(self.node, self.epoch);
        let set = |name: &str| {
            let mut cmd = Cmd::with_capacity(batch.len() + 2, member_bytes + sessions.len() + 4);
            cmd.arg(name).arg(&sessions);
            cmd
        };
        let (mut added, mut removed) = (set("SADD"), set("SREM"));
        let (mut any_added, mut any_removed) = (false, false);
        for (session, uid, open) in batch {
            let uid = uid.as_ref();
            let mut entry = Cmd::with_capacity(4, key_bytes + uid.len() + 48);
            entry.arg(if *open { "HSET" } else { "HDEL" }).arg(self.keys.uid_arg(uid)).arg(session.0);
            if *open {
                entry.arg(self.epoch);
            }
            cmds.push(entry);
            let set = if *open { &mut added } else { &mut removed };
            // A write into the command's own buffer, in memory: it cannot fail.
            let _ = write!(set.writer_for_next_arg(), "{}:{uid}", session.0);
            *(if *open { &mut any_added } else { &mut any_removed }) = true;
        }
        cmds.extend(any_added.then_some(added));
        cmds.extend(any_removed.then_some(removed));
        cmds
    }

    /// This run, as a member of `P:nodes`.
    fn run_name(&self) -> String {
        format!("{}:{}", self.node, self.epoch)
    }

    /// Records this run in `P:nodes`, so that others can clean up after it.
    pub async fn announce(&self) -> redis::RedisResult<()> {
        self.redis.query::<Value>(RedisCommand::Sessions, redis::cmd("SADD").arg(self.keys.runs()).arg(self.run_name())).await.map(drop)
    }

    /// Refreshes the liveness key, unless another process holds it.
    async fn refresh_liveness(&self) -> Liveness {
        const REFRESH: &str = "local v = redis.call('GET', KEYS[1]) \
            if v == false or v == ARGV[1] then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) end return v";
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(REFRESH).arg(1).arg(self.keys.node(self.node)).arg(self.epoch).arg(self.ttl.as_millis() as u64);
        match self.redis.query::<Option<u64>>(RedisCommand::Set, &cmd).await {
            Ok(Some(epoch)) if epoch == self.epoch => Liveness::Held,
            Ok(Some(other)) => Liveness::Taken(other),
            Ok(None) => {
                tracing::warn!(node = self.node, "liveness key was missing (Redis restarted or was unreachable past --node-ttl); registering every session again");
                Liveness::Missing
            }
            Err(e) => {
                tracing::debug!(error = %e, "liveness refresh failed");
                Liveness::Unknown
            }
        }
    }

    /// Cleans up after every node run in `P:nodes` whose liveness key no longer holds its
    /// epoch, one run at a time, under a lock so that one node does each.
    ///
    /// A run is reaped only when its key was gone at the previous pass too, a whole
    /// `--node-ttl` before: a live node whose key Redis lost (a FLUSHALL of its shard) sets
    /// it again within a third of that, and writes its sessions again, which a reap racing
    /// that rewrite would delete for good (found by an attack: a live run reaped 2 ms
    /// before it rewrote). `gone_before` holds the runs found gone at the previous pass.
    async fn reap(&self, gone_before: &mut HashSet<String>) -> redis::RedisResult<()> {
        let runs: Vec<String> = self.redis.query(RedisCommand::Get, redis::cmd("SMEMBERS").arg(self.keys.runs())).await?;
        let seen_gone = std::mem::take(gone_before);
        for run in runs {
            let Some((node, epoch)) = run.split_once(':').and_then(|(n, e)| Some((n.parse::<u16>().ok()?, e.parse::<u64>().ok()?)))
            else {
                continue;
            };
            if (node, epoch) == (self.node, self.epoch) {
                continue;
            }
            let live: Option<u64> = self.redis.query(RedisCommand::Get, redis::cmd("GET").arg(self.keys.node(node))).await?;
            if live.is_some_and(|live| live <= epoch) {
                continue;
            }
            if !seen_gone.contains(&run) {
                gone_before.insert(run);
                continue;
            }
            let mut lock = redis::cmd("SET");
            lock.arg(self.keys.reaping(&run)).arg(self.run_name()).arg("NX").arg("PX").arg(self.ttl.as_millis() as u64 * 3);
            if !matches!(self.redis.query::<Value>(RedisCommand::Set, &lock).await?, Value::Okay) {
                continue;
            }
            let removed = self.reap_run(node, epoch).await?;
            if let Some((_, writer)) = &self.presence {
                let left = writer.reap(node, epoch).await?;
                tracing::info!(node, epoch, members = left, "took a node that is gone out of its presence topics");
            }
            if let Some(occupancy) = &self.occupancy {
                let vacated = occupancy.reap(node, epoch).await?;
                tracing::info!(node, epoch, vacated, "took a node that is gone out of its topics' occupancy");
            }
            self.redis.query::<Value>(RedisCommand::Hdel, redis::cmd("SREM").arg(self.keys.runs()).arg(&run)).await?;
            tracing::info!(node, epoch, sessions = removed, "cleaned up after a node that is gone");
        }
        Ok(())
    }

    /// Deletes a dead run's uid entries, a batch at a time, then its sessions set.
    async fn reap_run(&self, node: u16, epoch: u64) -> redis::RedisResult<usize> {
        let set = self.keys.sessions(node, epoch);
        let (mut cursor, mut removed) = (0u64, 0);
        loop {
            let mut scan = redis::cmd("SSCAN");
            scan.arg(&set).arg(cursor).arg("COUNT").arg(REAP_BATCH);
            let (next, members): (u64, Vec<String>) = self.redis.query(RedisCommand::Get, &scan).await?;
            let deletes: Vec<Cmd> = members
                .iter()
                .filter_map(|m| m.split_once(':'))
                .map(|(session, uid)| {
                    redis::cmd("EVAL").arg(DELETE_IF_EPOCH).arg(1).arg(self.keys.uid_arg(uid)).arg(session).arg(epoch).clone()
                })
                .collect();
            removed += deletes.len();
            self.redis.batch(RedisCommand::Hdel, deletes).await?;
            if next == 0 {
                break;
            }
            cursor = next;
            tokio::time::sleep(REAP_PAUSE).await;
        }
        self.redis.query::<Value>(RedisCommand::Del, redis::cmd("DEL").arg(&set)).await?;
        Ok(removed)
    }

    /// Writes a close (HDEL) of every local session, a batch at a time.
    async fn remove_every_session(&self) -> redis::RedisResult<()> {
        let mut sessions = Vec::new();
        // The uids cloned as they are stored: inline, with no allocation, up to 24 bytes.
        self.hub.for_each(|conn| sessions.push((conn.session, conn.uid.clone(), false)));
        for chunk in sessions.chunks(BATCH) {
            self.redis.batch(RedisCommand::Sessions, self.change_cmds(chunk)).await?;
        }
        Ok(())
    }

    /// Queues every local session to be written again, after the liveness key was found
    /// missing. Redis may still hold any of them (the key lapsed, and no reaper took them
    /// yet), so each is marked tried: its close is written even if it comes first.
    fn register_again(&self, pending: &mut Unwritten) {
        self.hub.for_each(|conn| {
            pending.insert(conn.session, Pending { uid: Arc::from(conn.uid.as_str()), opened: true, tried: true, repeat: false });
        });
    }

    async fn leave(&self, pending: &mut Unwritten) -> redis::RedisResult<()> {
        if self.evicted.is_cancelled() {
            // The id is another process's now: its liveness key, and uid entries that may
            // carry the same session ids, are not ours to delete. Ours are reaped by epoch.
            return Ok(());
        }
        self.flush(pending, &mut HashMap::new(), true).await?;
        // Connections still open past the shutdown grace.
        self.remove_every_session().await?;
        const DELETE_IF_OURS: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0";
        let mut del = redis::cmd("EVAL");
        del.arg(DELETE_IF_OURS).arg(1).arg(self.keys.node(self.node)).arg(self.epoch);
        self.redis.query::<Value>(RedisCommand::Del, &del).await?;
        self.redis.query::<Value>(RedisCommand::Del, redis::cmd("DEL").arg(self.keys.sessions(self.node, self.epoch))).await?;
        if let Some((_, writer)) = &self.presence {
            writer.left().await?;
        }
        self.redis.query::<Value>(RedisCommand::Del, redis::cmd("SREM").arg(self.keys.runs()).arg(self.run_name())).await?;
        self.metrics.registry_sessions.set(0.0);
        Ok(())
    }
}

/// A session change not yet known to be written.
struct Pending {
    uid: Arc<str>,
    opened: bool,
    /// A write of it was sent and failed; Redis may have applied it anyway.
    tried: bool,
    /// A close whose open was sent and failed: that open may still reach Redis after the
    /// close does (the redis crate retries a Cluster's CLUSTERDOWN by itself, past the
    /// node's own timeout: found by an attack, a refused handshake's session listed for
    /// good), so the close is written once more a while later.
    repeat: bool,
}

/// Session changes not yet known to be written, latest per session, with their balance
/// (closes less opens) kept as they come and go: `registered` is read every turn of the
/// registrar, and summing a backlog of a million sessions written again after Redis lost
/// them, once per batch of 1,024, cost as much as writing them.
#[derive(Default)]
struct Unwritten {
    changes: HashMap<SessionId, Pending>,
    balance: i64,
    /// Closes written that are to be written once more, since the last liveness refresh,
    /// and since the one before: a close is repeated two refreshes after it was written.
    written_to_repeat: Vec<(SessionId, Arc<str>)>,
    repeating: Vec<(SessionId, Arc<str>)>,
}

impl Unwritten {
    fn weight(change: &Pending) -> i64 {
        if change.opened { -1 } else { 1 }
    }

    fn insert(&mut self, session: SessionId, change: Pending) {
        self.balance += Unwritten::weight(&change);
        if let Some(replaced) = self.changes.insert(session, change) {
            self.balance -= Unwritten::weight(&replaced);
        }
    }

    fn remove(&mut self, session: &SessionId) {
        if let Some(removed) = self.changes.remove(session) {
            self.balance -= Unwritten::weight(&removed);
        }
    }

    fn get(&self, session: &SessionId) -> Option<&Pending> {
        self.changes.get(session)
    }

    /// Its change is in Redis.
    fn written(&mut self, session: &SessionId) {
        if let Some(change) = self.changes.get(session).filter(|c| c.repeat) {
            self.written_to_repeat.push((*session, change.uid.clone()));
        }
        self.remove(session);
    }

    /// At a liveness refresh that reached Redis: the closes to repeat that were written
    /// before the previous refresh are pending again, once.
    fn repeat_closes(&mut self) {
        let due = std::mem::replace(&mut self.repeating, std::mem::take(&mut self.written_to_repeat));
        for (session, uid) in due {
            self.insert(session, Pending { uid, opened: false, tried: false, repeat: false });
        }
    }

    /// A write of it was sent and failed.
    fn mark_tried(&mut self, session: &SessionId) {
        if let Some(change) = self.changes.get_mut(session) {
            change.tried = true;
        }
    }

    fn keys(&self) -> impl Iterator<Item = &SessionId> {
        self.changes.keys()
    }

    fn len(&self) -> usize {
        self.changes.len()
    }

    fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// `pushline_registry_sessions`: the sessions Redis has been told this node holds,
    /// from the `known` open here, less opens not yet written, plus closes not yet
    /// written. Derived rather than counted write by write, so that it is exact again once
    /// every change is written, whatever Redis lost or restored meanwhile.
    fn registered(&self, known: i64) -> f64 {
        (known + self.balance) as f64
    }
}

impl std::ops::Index<&SessionId> for Unwritten {
    type Output = Pending;

    fn index(&self, session: &SessionId) -> &Pending {
        &self.changes[session]
    }
}

/// Presence members to write, and the topics this run has recorded for the reaper.
#[derive(Default)]
struct Membership {
    changed: HashSet<(Arc<str>, CompactString)>,
    recorded: HashSet<Arc<str>>,
}

/// Keeps the latest change per session; an open never sent and its close cancel out.
fn coalesce(pending: &mut Unwritten, change: Change) {
    match change {
        // Told nothing: whoever waits for it is told it was not written.
        Change::Listening(_) | Change::Member(..) | Change::Written(..) => {}
        Change::Opened(session, uid) => {
            pending.insert(session, Pending { uid, opened: true, tried: false, repeat: false });
        }
        Change::Closed(session, uid) => match pending.get(&session) {
            Some(Pending { opened: true, tried: false, .. }) => pending.remove(&session),
            Some(Pending { opened: true, tried: true, .. }) => pending.insert(session, Pending { uid, opened: false, tried: false, repeat: true }),
            _ => pending.insert(session, Pending { uid, opened: false, tried: false, repeat: false }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_open_and_close_not_yet_written_cancel_out() {
        let mut pending = Unwritten::default();
        let uid: Arc<str> = Arc::from("alice");
        coalesce(&mut pending, Change::Opened(SessionId(1), uid.clone()));
        coalesce(&mut pending, Change::Opened(SessionId(2), uid.clone()));
        coalesce(&mut pending, Change::Closed(SessionId(1), uid.clone()));
        coalesce(&mut pending, Change::Closed(SessionId(3), uid.clone()));
        assert_eq!(pending.len(), 2);
        assert!(pending[&SessionId(2)].opened, "2 opened");
        assert!(!pending[&SessionId(3)].opened, "3 closed (opened in an earlier batch)");
    }

    #[test]
    fn a_close_after_a_failed_open_is_still_written_and_once_more_later() {
        let mut pending = Unwritten::default();
        let uid: Arc<str> = Arc::from("bob");
        coalesce(&mut pending, Change::Opened(SessionId(1), uid.clone()));
        // The HSET was sent and failed: Redis may hold it, so the HDEL must go out.
        pending.mark_tried(&SessionId(1));
        coalesce(&mut pending, Change::Closed(SessionId(1), uid.clone()));
        assert!(!pending[&SessionId(1)].opened);
        // A close of an open that was written is written once.
        coalesce(&mut pending, Change::Closed(SessionId(2), uid));
        pending.written(&SessionId(1));
        pending.written(&SessionId(2));
        assert!(pending.is_empty());
        // The HSET may land after the HDEL: the HDEL goes out again, two refreshes on.
        pending.repeat_closes();
        assert!(pending.is_empty(), "not at the first refresh after it was written");
        pending.repeat_closes();
        assert_eq!(pending.keys().copied().collect::<Vec<_>>(), [SessionId(1)]);
        assert!(!pending[&SessionId(1)].opened && !pending[&SessionId(1)].repeat);
        pending.written(&SessionId(1));
        pending.repeat_closes();
        pending.repeat_closes();
        assert!(pending.is_empty(), "once");
    }

    #[test]
    fn registered_sessions_leave_out_unwritten_opens_and_keep_unwritten_closes() {
        let mut pending = Unwritten::default();
        let uid: Arc<str> = Arc::from("carol");
        // 3 open here; 7 and 8 were written; 9 is not yet; 6 closed, its HDEL not yet written.
        coalesce(&mut pending, Change::Opened(SessionId(9), uid.clone()));
        coalesce(&mut pending, Change::Closed(SessionId(6), uid));
        assert_eq!(pending.registered(3), 3.0 - 1.0 + 1.0);
        pending.remove(&SessionId(9));
        pending.remove(&SessionId(6));
        assert_eq!(pending.registered(3), 3.0, "exact once everything is written");
        // A failed open replaced by its close: the open's share goes with it.
        coalesce(&mut pending, Change::Opened(SessionId(5), Arc::from("dan")));
        pending.mark_tried(&SessionId(5));
        coalesce(&mut pending, Change::Closed(SessionId(5), Arc::from("dan")));
        assert_eq!(pending.registered(2), 3.0, "2 open here, and 5's close not yet written");
    }
}
