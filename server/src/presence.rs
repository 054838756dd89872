//! Presence: who is in a topic. A topic matching `--presence-topics` keeps its members:
//! a uid, with the `info` its first connection brought (its token's `info` claim, or
//! `?info=` in open mode). A uid joins when its first connection subscribes and leaves
//! when its last one goes, however many connections it has.
//!
//! Subscribers are told at most once per topic per `--presence-batch`: the changes of a
//! batch are netted (a uid that left and came back within it changed nothing) and sent as
//! one frame, `join` or `leave` for a single change, `presence_diff` listing who came and
//! went for several, and only the counts (`presence_count`) above
//! `--presence-events-max-members`, so a join to a 100,000-member topic is one small frame
//! per subscriber. Members are read a page at a time, in uid order from a cursor, and the
//! counts in O(1).
//!
//! This node's own members are kept here, by topic. On the memory registry they are all
//! there is, and each change is told at once to the batches. On Redis they are this
//! node's share: each change goes to the registry (`Change::Member`), which writes the
//! uid's connection count here to Redis, where the members of every node are summed, and
//! sends what changed to every node, whose batches tell their subscribers.
//!
//! A connection that brought no info and holds no presence topic costs nothing here.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, RandomState};
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use compact_str::CompactString;
use pushline_alloc::Site;
use serde::Serialize;
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

use crate::conn::Conn;
use crate::hub::{Change, Changes, Hub, Watcher};
use crate::rights::Rights;
use crate::telemetry::{Metrics, PresenceEvent};
use crate::webhooks::Webhooks;
use crate::wire::Message;

const SHARDS: usize = 16;

/// Most members one page holds.
pub const MAX_PAGE: usize = 1000;

pub struct Settings {
    /// `--presence-topics`.
    pub topics: Rights,
    pub batch: Duration,
    pub events_max_members: usize,
    /// `--presence-info-bytes`: the most a member's info may hold.
    pub info_bytes: usize,
}

pub struct Presence {
    settings: Settings,
    metrics: Arc<Metrics>,
    /// The info connections brought, by session: only those that brought some.
    infos: Mutex<HashMap<u64, Arc<RawValue>>>,
    /// The member a Pusher connection is in its presence channels (the `user_id` its
    /// application signed), by session; the others are their uid.
    users: Mutex<HashMap<u64, CompactString>>,
    /// This node's members of each presence topic, sharded by the topic's hash.
    rosters: Box<[Mutex<HashMap<Arc<str>, Roster>>]>,
    hasher: RandomState,
    /// Where this node's member changes go to be written to Redis; None on the memory
    /// registry, where they are told here at once.
    registry: Option<Changes>,
    /// Told of each member change on the memory registry (on Redis, the registry tells it).
    webhooks: Option<Arc<Webhooks>>,
    /// Versions of the memory registry's changes.
    version: AtomicU64,
    /// What the next batch tells.
    told: Mutex<Told>,
}

#[derive(Default)]
struct Roster {
    /// By uid, so that pages walk them in order from a cursor.
    members: BTreeMap<CompactString, Member>,
    connections: usize,
}

struct Member {
    connections: u32,
    info: Option<Arc<RawValue>>,
}

/// Changes not yet told, by topic, in the order topics first changed.
#[derive(Default)]
struct Told {
    topics: HashMap<Arc<str>, Changed>,
    order: Vec<Arc<str>>,
}

/// A topic's changes since its last batch.
#[derive(Default)]
struct Changed {
    /// The member count with the newest change, and that change's version.
    members: (u64, usize),
    uids: HashMap<CompactString, Turns>,
}

/// A uid's first and last change in a batch, by version (they may arrive out of order
/// from several nodes): the same change told once; opposite ones changed nothing.
struct Turns {
    first: (u64, bool),
    last: (u64, bool),
    info: Option<Arc<RawValue>>,
}

/// One member who joined, as a `presence_diff` lists it.
#[derive(Serialize)]
struct Shown<'a> {
    uid: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    info: Option<&'a RawValue>,
}

/// A member on a page: its info is written as it came, never parsed again.
#[derive(Serialize)]
pub struct Listed {
    pub uid: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub info: Option<Box<RawValue>>,
}

/// A page of a topic's members and its counts, as the client and the API are answered.
#[derive(Serialize)]
pub struct Page {
    /// `presence` when answering a client.
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    pub topic: String,
    pub members: Vec<Listed>,
    /// Members and connections of the whole topic.
    pub count: usize,
    pub connections: usize,
    /// Where the next page starts; None after the last.
    pub cursor: Option<String>,
}

#[derive(Serialize)]
pub struct Stats {
    pub topic: String,
    pub members: usize,
    pub connections: usize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Presence {
    /// `registry`: where member changes go on a Redis registry.
    pub fn new(settings: Settings, metrics: Arc<Metrics>, registry: Option<Changes>, webhooks: Option<Arc<Webhooks>>) -> Presence {
        Presence {
            settings,
            metrics,
            infos: Mutex::new(HashMap::new()),
            users: Mutex::new(HashMap::new()),
            rosters: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            webhooks: webhooks.filter(|_| registry.is_none()),
            registry,
            version: AtomicU64::new(0),
            told: Mutex::new(Told::default()),
        }
    }

    /// Whether `topic` keeps members: a native topic `--presence-topics` names, or a
    /// Pusher `presence-` channel. The native patterns never reach Pusher's namespace
    /// (`*` would make every public channel's subscribers members, each told the others'
    /// socket ids).
    pub fn is_presence_topic(&self, topic: &str) -> bool {
        match topic.starts_with(crate::pusher::PREFIX) {
            true => crate::pusher::is_presence_topic(topic),
            false => self.settings.topics.allows(topic),
        }
    }

    /// A Pusher connection joins presence channels as `user`, showing `info`; a
    /// connection is one user. Err: it is already another.
    pub fn bring_user(&self, session: u64, user: &str, info: Option<Arc<RawValue>>) -> Result<(), String> {
        let mut users = lock(&self.users);
        match users.get(&session) {
            Some(known) if known != user => return Err(format!("this connection is user `{known}` in presence channels; one connection is one user")),
            Some(_) => return Ok(()),
            None => {}
        }
        Site::Sessions.scope(|| users.insert(session, CompactString::from(user)));
        drop(users);
        if let Some(info) = info {
            self.bring(session, info);
        }
        Ok(())
    }

    /// The Pusher user a connection is in presence channels, if it joined one.
    pub fn user_of(&self, session: u64) -> Option<CompactString> {
        lock(&self.users).get(&session).cloned()
    }

    /// The most bytes a member's info may hold.
    pub fn info_bytes(&self) -> usize {
        self.settings.info_bytes
    }

    /// Who a connection is as a member: its Pusher user, or its uid.
    fn member_of(&self, conn: &Conn) -> CompactString {
        lock(&self.users).get(&conn.session.0).cloned().unwrap_or_else(|| conn.uid.clone())
    }

    fn shard(&self, topic: &str) -> MutexGuard<'_, HashMap<Arc<str>, Roster>> {
        lock(&self.rosters[self.hasher.hash_one(topic) as usize % SHARDS])
    }

    /// The member info a connection brought, kept until it closes.
    pub fn bring(&self, session: u64, info: Arc<RawValue>) {
        Site::Sessions.scope(|| lock(&self.infos).insert(session, info));
    }

    /// This node's connections of `uid` in `topic`, and the info its member shows.
    pub fn local(&self, topic: &str, uid: &str) -> (u32, Option<Arc<RawValue>>) {
        let shard = self.shard(topic);
        shard.get(topic).and_then(|r| r.members.get(uid)).map_or((0, None), |m| (m.connections, m.info.clone()))
    }

    /// Every (topic, uid) this node has a member in.
    pub fn local_members(&self) -> Vec<(Arc<str>, CompactString)> {
        let mut all = Vec::new();
        for shard in self.rosters.iter() {
            for (topic, roster) in lock(shard).iter() {
                all.extend(roster.members.keys().map(|uid| (topic.clone(), uid.clone())));
            }
        }
        all
    }

    /// The counts of `topic` on this node (all there is on the memory registry).
    pub fn local_stats(&self, topic: &str) -> Stats {
        let shard = self.shard(topic);
        let (members, connections) = shard.get(topic).map_or((0, 0), |r| (r.members.len(), r.connections));
        Stats { topic: topic.to_owned(), members, connections }
    }

    /// Up to `limit` of this node's members of `topic` after `cursor` (a uid; the start
    /// when None).
    pub fn local_page(&self, topic: &str, cursor: Option<&str>, limit: usize) -> Page {
        let shard = self.shard(topic);
        let Some(roster) = shard.get(topic) else {
            return Page { kind: None, topic: topic.to_owned(), members: Vec::new(), count: 0, connections: 0, cursor: None };
        };
        let from = cursor.map_or(Bound::Unbounded, |c| Bound::Excluded(CompactString::from(c)));
        let mut walk = roster.members.range((from, Bound::Unbounded));
        let mut members = Vec::with_capacity(limit.min(roster.members.len()));
        let mut last = None;
        for (uid, member) in walk.by_ref().take(limit) {
            members.push(Listed { uid: uid.to_string(), info: member.info.as_deref().map(ToOwned::to_owned) });
            last = Some(uid.to_string());
        }
        let cursor = last.filter(|_| walk.next().is_some());
        Page { kind: None, topic: topic.to_owned(), members, count: roster.members.len(), connections: roster.connections, cursor }
    }

    /// `uid` joined (or left) `topic`, as of `version`, leaving it `members` members: told
    /// with the next batch.
    pub fn changed(&self, topic: &str, uid: &str, joined: bool, version: u64, members: usize, info: Option<Arc<RawValue>>) {
        let _site = Site::Topics.enter();
        let mut told = lock(&self.told);
        let Told { topics, order } = &mut *told;
        let changed = match topics.get_mut(topic) {
            Some(changed) => changed,
            None => {
                let topic: Arc<str> = Arc::from(topic);
                order.push(topic.clone());
                topics.entry(topic).or_default()
            }
        };
        if version >= changed.members.0 {
            changed.members = (version, members);
        }
        let turn = (version, joined);
        match changed.uids.get_mut(uid) {
            Some(turns) => {
                if version < turns.first.0 {
                    turns.first = turn;
                }
                if version >= turns.last.0 {
                    turns.last = turn;
                    if joined {
                        turns.info = info;
                    }
                }
            }
            None => {
                changed.uids.insert(CompactString::from(uid), Turns { first: turn, last: turn, info });
            }
        }
    }

    /// On the memory registry, a member change is told here; on Redis, it goes to the
    /// registry, which writes it and tells every node.
    fn member_changed(&self, topic: &Arc<str>, uid: &CompactString, joined: Option<(bool, usize, Option<Arc<RawValue>>)>) {
        match (&self.registry, joined) {
            (Some(registry), _) => {
                let _ = registry.send(Change::Member(topic.clone(), uid.clone()));
            }
            (None, Some((joined, members, info))) => {
                if let Some(webhooks) = &self.webhooks {
                    webhooks.member(topic, uid, joined, info.as_deref());
                }
                let version = self.version.fetch_add(1, Ordering::Relaxed) + 1;
                self.changed(topic, uid, joined, version, members, info);
            }
            (None, None) => {}
        }
    }

    /// Tells every topic's subscribers what changed, once per batch, until `stop`.
    pub async fn tell(self: Arc<Self>, hub: Arc<Hub>, stop: CancellationToken) {
        let mut every = tokio::time::interval(self.settings.batch);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = every.tick() => {}
                _ = stop.cancelled() => return,
            }
            let Told { mut topics, order } = std::mem::take(&mut *lock(&self.told));
            for topic in order {
                let Some(changed) = topics.remove(&topic) else { continue };
                if let Some(channel) = crate::pusher::channel_of_topic(&topic) {
                    self.tell_pusher(&hub, &topic, channel, changed).await;
                    continue;
                }
                let Some((kind, event)) = self.event(&topic, changed) else { continue };
                self.metrics.presence_event(kind);
                let msg = Site::Codec.scope(|| Arc::new(Message::from_envelope(0, &event, None, Instant::now())));
                hub.publish(&topic, &msg).await;
            }
        }
    }

    /// A Pusher presence channel's changes, as its clients read them: a
    /// `pusher_internal:member_added` or `member_removed` per member, not sent to the
    /// member's own connections. A batch's changes of a member are not netted: a client
    /// that subscribed in between listed the member as it was then, so it is told the
    /// first change and then the last when they differ, ending where the member is.
    async fn tell_pusher(&self, hub: &Arc<Hub>, topic: &str, channel: &str, changed: Changed) {
        for (uid, turns) in &changed.uids {
            let told = if turns.first.1 == turns.last.1 { &[turns.last.1][..] } else { &[turns.first.1, turns.last.1][..] };
            for &joined in told {
                let user = serde_json::to_string(uid.as_str()).unwrap_or_default();
                let (event, data) = if joined {
                    let info = turns.info.as_deref().map_or("null", RawValue::get);
                    ("pusher_internal:member_added", format!(r#"{{"user_id":{user},"user_info":{info}}}"#))
                } else {
                    ("pusher_internal:member_removed", format!(r#"{{"user_id":{user}}}"#))
                };
                self.metrics.presence_event(if joined { PresenceEvent::Join } else { PresenceEvent::Leave });
                let frame = crate::pusher::frame(event, Some(channel), &serde_json::to_string(&data).unwrap_or_default());
                let msg = Site::Codec.scope(|| Arc::new(Message::from_envelope(0, &frame, None, Instant::now())));
                hub.publish_to(topic, &msg, |conn| self.member_of(conn) != *uid).await;
            }
        }
    }

    /// The frame telling a topic's subscribers its changes since the last batch.
    fn event(&self, topic: &str, changed: Changed) -> Option<(PresenceEvent, String)> {
        let members = changed.members.1;
        let mut joined = Vec::new();
        let mut left = Vec::new();
        for (uid, turns) in &changed.uids {
            // A uid back where it was before the batch changed nothing.
            match (turns.first.1, turns.last.1) {
                (true, true) => joined.push(Shown { uid, info: turns.info.as_deref() }),
                (false, false) => left.push(uid.as_str()),
                _ => {}
            }
        }
        let frame = |kind| Frame { kind, topic, uid: None, info: None, joined: None, left: None, members: None };
        let (kind, frame) = if members > self.settings.events_max_members {
            let counts = Frame { joined: Some(Joined::Count(joined.len())), left: Some(Left::Count(left.len())), members: Some(members), ..frame("presence_count") };
            (PresenceEvent::Count, counts)
        } else if let ([one], []) = (&joined[..], &left[..]) {
            (PresenceEvent::Join, Frame { uid: Some(one.uid), info: one.info, ..frame("join") })
        } else if let ([], [one]) = (&joined[..], &left[..]) {
            (PresenceEvent::Leave, Frame { uid: Some(one), ..frame("leave") })
        } else if joined.is_empty() && left.is_empty() {
            return None;
        } else {
            let diff = Frame { joined: Some(Joined::List(&joined)), left: Some(Left::List(&left)), members: Some(members), ..frame("presence_diff") };
            (PresenceEvent::Diff, diff)
        };
        // Written, not built as a `Value`: info goes out as it came, never parsed again.
        serde_json::to_string(&frame).ok().map(|frame| (kind, frame))
    }
}

/// A presence frame. Fields a kind does not use are left out.
#[derive(Serialize)]
struct Frame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    topic: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    uid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    info: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    joined: Option<Joined<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    left: Option<Left<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    members: Option<usize>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Joined<'a> {
    List(&'a [Shown<'a>]),
    Count(usize),
}

#[derive(Serialize)]
#[serde(untagged)]
enum Left<'a> {
    List(&'a [&'a str]),
    Count(usize),
}

impl Watcher for Presence {
    /// A uid joins with its first connection here; on Redis every connection counts.
    fn subscribed(&self, topic: &Arc<str>, conn: &Conn) {
        if !self.is_presence_topic(topic) {
            return;
        }
        let info = lock(&self.infos).get(&conn.session.0).cloned();
        let uid = self.member_of(conn);
        let _site = Site::Topics.enter();
        let mut shard = self.shard(topic);
        let roster = shard.entry(topic.clone()).or_default();
        roster.connections += 1;
        let joined = match roster.members.get_mut(uid.as_str()) {
            Some(member) => {
                member.connections += 1;
                None
            }
            None => {
                roster.members.insert(uid.clone(), Member { connections: 1, info: info.clone() });
                self.metrics.presence_members.increment(1.0);
                Some((true, roster.members.len(), info))
            }
        };
        drop(shard);
        self.member_changed(topic, &uid, joined);
    }

    /// A uid leaves with its last connection here.
    fn unsubscribed(&self, topic: &Arc<str>, conn: &Conn) {
        if !self.is_presence_topic(topic) {
            return;
        }
        let member_uid = self.member_of(conn);
        let mut shard = self.shard(topic);
        let Some(roster) = shard.get_mut(topic) else { return };
        let uid = member_uid.as_str();
        let Some(member) = roster.members.get_mut(uid) else { return };
        roster.connections -= 1;
        member.connections -= 1;
        let left = (member.connections == 0).then(|| {
            roster.members.remove(uid);
            self.metrics.presence_members.decrement(1.0);
            (false, roster.members.len(), None)
        });
        if roster.members.is_empty() {
            shard.remove(topic);
        }
        drop(shard);
        self.member_changed(topic, &member_uid, left);
    }

    fn closed(&self, session: u64) {
        lock(&self.infos).remove(&session);
        lock(&self.users).remove(&session);
    }
}
