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
//! A connection that brought no info and holds no presence topic costs nothing here.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, RandomState};
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use compact_str::CompactString;
use pushline_alloc::Site;
use serde::Serialize;
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

use crate::conn::Conn;
use crate::hub::Hub;
use crate::rights::Rights;
use crate::telemetry::{Metrics, PresenceEvent};
use crate::wire::Message;

const SHARDS: usize = 16;

/// Most members one page holds.
pub const MAX_PAGE: usize = 1000;

pub struct Settings {
    /// `--presence-topics`.
    pub topics: Rights,
    pub batch: Duration,
    pub events_max_members: usize,
}

pub struct Presence {
    settings: Settings,
    metrics: Arc<Metrics>,
    /// The info connections brought, by session: only those that brought some.
    infos: Mutex<HashMap<u64, Arc<RawValue>>>,
    /// Each presence topic with members, sharded by the topic's hash.
    rosters: Box<[Mutex<HashMap<Arc<str>, Roster>>]>,
    hasher: RandomState,
    /// Topics with changes not yet told, in the order they first changed.
    dirty: Mutex<Vec<Arc<str>>>,
}

#[derive(Default)]
struct Roster {
    /// By uid, so that pages walk them in order from a cursor.
    members: BTreeMap<CompactString, Member>,
    connections: usize,
    /// Net changes since the last batch went out, by uid.
    pending: HashMap<CompactString, Change>,
}

struct Member {
    connections: u32,
    info: Option<Arc<RawValue>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Change {
    Joined,
    Left,
}

/// One member, as pages and events show it.
#[derive(Serialize)]
pub struct Shown<'a> {
    pub uid: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub info: Option<&'a RawValue>,
}

/// A page of a topic's members and its counts, as the client and the API are answered.
#[derive(Serialize)]
pub struct Page {
    pub topic: String,
    pub members: Vec<serde_json::Value>,
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

fn shown<'a>(members: &'a BTreeMap<CompactString, Member>, uid: &'a str) -> Shown<'a> {
    Shown { uid, info: members.get(uid).and_then(|m| m.info.as_deref()) }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Presence {
    pub fn new(settings: Settings, metrics: Arc<Metrics>) -> Presence {
        Presence {
            settings,
            metrics,
            infos: Mutex::new(HashMap::new()),
            rosters: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            dirty: Mutex::new(Vec::new()),
        }
    }

    pub fn is_presence_topic(&self, topic: &str) -> bool {
        self.settings.topics.allows(topic)
    }

    fn shard(&self, topic: &str) -> MutexGuard<'_, HashMap<Arc<str>, Roster>> {
        lock(&self.rosters[self.hasher.hash_one(topic) as usize % SHARDS])
    }

    /// The member info a connection brought, kept until it closes.
    pub fn bring(&self, session: u64, info: Arc<RawValue>) {
        Site::Sessions.scope(|| lock(&self.infos).insert(session, info));
    }

    /// A connection closed (after it left its topics).
    pub fn forget(&self, session: u64) {
        lock(&self.infos).remove(&session);
    }

    /// `conn` subscribed to `topic`: its uid joins if this is its first connection there.
    pub fn subscribed(&self, topic: &Arc<str>, conn: &Conn) {
        if !self.is_presence_topic(topic) {
            return;
        }
        let info = lock(&self.infos).get(&conn.session.0).cloned();
        let _site = Site::Topics.enter();
        let mut shard = self.shard(topic);
        let roster = shard.entry(topic.clone()).or_default();
        roster.connections += 1;
        let uid = conn.uid.as_str();
        if let Some(member) = roster.members.get_mut(uid) {
            member.connections += 1;
            return;
        }
        roster.members.insert(conn.uid.clone(), Member { connections: 1, info });
        self.metrics.presence_members.increment(1.0);
        let first_change = roster.pending.is_empty();
        match roster.pending.get(uid) {
            Some(Change::Left) => {
                roster.pending.remove(uid);
            }
            _ => {
                roster.pending.insert(conn.uid.clone(), Change::Joined);
            }
        }
        if first_change && !roster.pending.is_empty() {
            lock(&self.dirty).push(topic.clone());
        }
    }

    /// `conn` left `topic` (or closed): its uid leaves if that was its last connection there.
    pub fn unsubscribed(&self, topic: &Arc<str>, conn: &Conn) {
        if !self.is_presence_topic(topic) {
            return;
        }
        let mut shard = self.shard(topic);
        let Some(roster) = shard.get_mut(topic) else { return };
        let uid = conn.uid.as_str();
        let Some(member) = roster.members.get_mut(uid) else { return };
        roster.connections -= 1;
        member.connections -= 1;
        if member.connections > 0 {
            return;
        }
        roster.members.remove(uid);
        self.metrics.presence_members.decrement(1.0);
        let first_change = roster.pending.is_empty();
        match roster.pending.get(uid) {
            Some(Change::Joined) => {
                roster.pending.remove(uid);
            }
            _ => {
                roster.pending.insert(conn.uid.clone(), Change::Left);
            }
        }
        let changed = first_change && !roster.pending.is_empty();
        if roster.members.is_empty() && roster.pending.is_empty() {
            shard.remove(topic);
        }
        drop(shard);
        if changed {
            lock(&self.dirty).push(topic.clone());
        }
    }

    pub fn stats(&self, topic: &str) -> Stats {
        let shard = self.shard(topic);
        let (members, connections) = shard.get(topic).map_or((0, 0), |r| (r.members.len(), r.connections));
        Stats { topic: topic.to_owned(), members, connections }
    }

    /// Up to `limit` members of `topic` after `cursor` (a uid; the start when None).
    pub fn page(&self, topic: &str, cursor: Option<&str>, limit: usize) -> Page {
        let shard = self.shard(topic);
        let Some(roster) = shard.get(topic) else {
            return Page { topic: topic.to_owned(), members: Vec::new(), count: 0, connections: 0, cursor: None };
        };
        let from = cursor.map_or(Bound::Unbounded, |c| Bound::Excluded(CompactString::from(c)));
        let mut walk = roster.members.range((from, Bound::Unbounded));
        let mut members = Vec::with_capacity(limit.min(roster.members.len()));
        let mut last = None;
        for (uid, member) in walk.by_ref().take(limit) {
            members.push(serde_json::to_value(Shown { uid, info: member.info.as_deref() }).unwrap_or_default());
            last = Some(uid.to_string());
        }
        let cursor = last.filter(|_| walk.next().is_some());
        Page { topic: topic.to_owned(), members, count: roster.members.len(), connections: roster.connections, cursor }
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
            let dirty = std::mem::take(&mut *lock(&self.dirty));
            for topic in dirty {
                let Some((kind, event)) = self.event(&topic) else { continue };
                self.metrics.presence_event(kind);
                let msg = Site::Codec.scope(|| Arc::new(Message::from_envelope(0, &event, None, Instant::now())));
                hub.publish(&topic, &msg).await;
            }
        }
    }

    /// The frame telling `topic`'s subscribers its changes since the last batch.
    fn event(&self, topic: &Arc<str>) -> Option<(PresenceEvent, String)> {
        let mut shard = self.shard(topic);
        let roster = shard.get_mut(topic)?;
        let pending = std::mem::take(&mut roster.pending);
        let members = roster.members.len();
        let (joined, left): (Vec<_>, Vec<_>) = pending.iter().partition(|(_, change)| **change == Change::Joined);
        let shown = |uid| shown(&roster.members, uid);
        let event = if members > self.settings.events_max_members {
            let event = serde_json::json!({"type": "presence_count", "topic": &**topic, "members": members, "joined": joined.len(), "left": left.len()});
            (PresenceEvent::Count, event.to_string())
        } else if let ([(uid, _)], []) = (&joined[..], &left[..]) {
            let Shown { uid, info } = shown(uid.as_str());
            (PresenceEvent::Join, serde_json::json!({"type": "join", "topic": &**topic, "uid": uid, "info": info}).to_string())
        } else if let ([], [(uid, _)]) = (&joined[..], &left[..]) {
            (PresenceEvent::Leave, serde_json::json!({"type": "leave", "topic": &**topic, "uid": uid.as_str()}).to_string())
        } else if joined.is_empty() && left.is_empty() {
            return None;
        } else {
            let came: Vec<Shown> = joined.iter().map(|(uid, _)| shown(uid.as_str())).collect();
            let went: Vec<&str> = left.iter().map(|(uid, _)| uid.as_str()).collect();
            let event = serde_json::json!({"type": "presence_diff", "topic": &**topic, "joined": came, "left": went, "members": members});
            (PresenceEvent::Diff, event.to_string())
        };
        if roster.members.is_empty() {
            shard.remove(topic);
        }
        Some(event)
    }
}
