//! Messages between nodes: how a publish is written onto a Redis channel, and the task
//! that reads this node's channels and delivers what arrives to local connections,
//! including this node's own publishes, which come back the same way.
//!
//! A relayed message carries its id and publish time, so every node frames the same
//! envelope and delivery latency counts from the original publish.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::{Cmd, PushInfo, PushKind, Value};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::Receiver;
use tokio::sync::{oneshot, Notify};

use pushline_alloc::Site;

use serde_json::value::RawValue;

use crate::history::redis::RedisHistory;
use crate::hub::Hub;
use super::listed::Listed;
use crate::presence::Presence;
use crate::redis_link::{DroppedPushes, Redis};
use crate::telemetry::{DropReason, Metrics, PublishKind, RedisCommand, Relayed};
use crate::wire::{envelope_position, Message};

/// What a relayed message is addressed to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target<'a> {
    /// These uids' connections on the receiving node.
    Uids(Vec<&'a str>),
    Topic(&'a str),
    Everyone,
    /// A presence topic's member change (see `members`), for every node's presence.
    Members(&'a str),
}

impl Target<'_> {
    pub fn kind(&self) -> PublishKind {
        match self {
            Target::Uids(_) => PublishKind::Push,
            Target::Topic(_) | Target::Members(_) => PublishKind::Topic,
            Target::Everyone => PublishKind::Broadcast,
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct Relay<'a> {
    /// The node that took the publish; it waits to hear what its own connections got.
    pub origin: u16,
    pub id: u64,
    /// Wall-clock milliseconds when the origin accepted it.
    pub published_ms: u64,
    /// The history group of the message's stream.
    pub group: u8,
    /// The group's append sequence the message was given (0: not kept). The node encodes
    /// zeros; the append script writes it in.
    pub sequence: u64,
    /// The publishing client's session, which the topic's delivery skips.
    pub except: Option<u64>,
    pub target: Target<'a>,
    /// The JSON envelope; empty when encoding the header the append script completes.
    pub envelope: &'a str,
}

/// Digits of the sequence field: ASCII, so the append script writes it with
/// `string.format('%020d', seq)` at bytes [`SEQUENCE_AT`]`..SEQUENCE_AT + 20`, keeping
/// what is before and after it.
const SEQUENCE_DIGITS: usize = 20;
/// Where the sequence field starts (0-based).
const SEQUENCE_AT: usize = 1 + 2 + 8 + 8 + 1;

/// `value` in [`SEQUENCE_DIGITS`] decimal digits, zero-padded (a u64 has at most 20):
/// what `{:020}` writes, without the formatting machinery.
fn decimal_digits(mut value: u64) -> [u8; SEQUENCE_DIGITS] {
    let mut digits = [b'0'; SEQUENCE_DIGITS];
    for digit in digits.iter_mut().rev() {
        *digit = b'0' + (value % 10) as u8;
        value /= 10;
    }
    digits
}
const HEADER: usize = SEQUENCE_AT + SEQUENCE_DIGITS + 1 + 8;

impl<'a> Relay<'a> {
    /// `kind(1) origin(2) id(8) published_ms(8) group(1) sequence(20 ASCII digits)
    /// has_except(1) except(8)`, then
    /// for a topic `len(2) topic`, for uids `count(4) (len(2) uid)*`, then the envelope to
    /// the end. Integers big-endian.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + self.envelope.len() + 64);
        out.push(match self.target {
            Target::Uids(_) => b'P',
            Target::Topic(_) => b'T',
            Target::Everyone => b'B',
            Target::Members(_) => b'M',
        });
        out.extend_from_slice(&self.origin.to_be_bytes());
        out.extend_from_slice(&self.id.to_be_bytes());
        out.extend_from_slice(&self.published_ms.to_be_bytes());
        out.push(self.group);
        out.extend_from_slice(&decimal_digits(self.sequence));
        out.push(self.except.is_some() as u8);
        out.extend_from_slice(&self.except.unwrap_or(0).to_be_bytes());
        match &self.target {
            Target::Uids(uids) => {
                out.extend_from_slice(&(uids.len() as u32).to_be_bytes());
                for uid in uids {
                    let uid = &uid.as_bytes()[..uid.len().min(u16::MAX as usize)];
                    out.extend_from_slice(&(uid.len() as u16).to_be_bytes());
                    out.extend_from_slice(uid);
                }
            }
            Target::Topic(topic) | Target::Members(topic) => {
                out.extend_from_slice(&(topic.len() as u16).to_be_bytes());
                out.extend_from_slice(topic.as_bytes());
            }
            Target::Everyone => {}
        }
        out.extend_from_slice(self.envelope.as_bytes());
        out
    }

    /// Reads what `encode` wrote; `None` for anything else.
    pub fn decode(bytes: &'a [u8]) -> Option<Relay<'a>> {
        let mut r = Bytes(bytes);
        let kind = r.take(1)?[0];
        let origin = u16::from_be_bytes(r.take(2)?.try_into().ok()?);
        let id = u64::from_be_bytes(r.take(8)?.try_into().ok()?);
        let published_ms = u64::from_be_bytes(r.take(8)?.try_into().ok()?);
        let group = r.take(1)?[0];
        let digits = r.take(SEQUENCE_DIGITS)?;
        if !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let sequence = std::str::from_utf8(digits).ok()?.parse().ok()?;
        let has_except = r.take(1)?[0];
        let except = u64::from_be_bytes(r.take(8)?.try_into().ok()?);
        let except = match has_except {
            0 => None,
            1 => Some(except),
            _ => return None,
        };
        let target = match kind {
            b'P' => {
                let count = u32::from_be_bytes(r.take(4)?.try_into().ok()?) as usize;
                // Each uid takes at least its 2-byte length: a count the bytes cannot hold is bad input.
                if count > r.0.len() / 2 {
                    return None;
                }
                let mut uids = Vec::with_capacity(count);
                for _ in 0..count {
                    let len = u16::from_be_bytes(r.take(2)?.try_into().ok()?) as usize;
                    uids.push(std::str::from_utf8(r.take(len)?).ok()?);
                }
                Target::Uids(uids)
            }
            b'T' | b'M' => {
                let len = u16::from_be_bytes(r.take(2)?.try_into().ok()?) as usize;
                let topic = std::str::from_utf8(r.take(len)?).ok()?;
                if kind == b'T' { Target::Topic(topic) } else { Target::Members(topic) }
            }
            b'B' => Target::Everyone,
            _ => return None,
        };
        let envelope = std::str::from_utf8(r.0).ok()?;
        Some(Relay { origin, id, published_ms, group, sequence, except, target, envelope })
    }
}

/// A member change as it travels between nodes.
#[derive(Serialize, Deserialize)]
pub struct Told<'a> {
    pub joined: bool,
    pub version: u64,
    pub members: usize,
    /// Read owned: a uid with an escape (`"`, `\\`, a control character) cannot be
    /// borrowed from the JSON it came in.
    #[serde(borrow)]
    pub uids: Vec<std::borrow::Cow<'a, str>>,
    #[serde(borrow, skip_serializing_if = "Option::is_none")]
    pub info: Option<&'a RawValue>,
}

struct Bytes<'a>(&'a [u8]);

impl<'a> Bytes<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
}

/// This node's publishes waiting for their messages to come back on its own channels,
/// by message id: how many are still to come, and the connections they reached.
#[derive(Default)]
pub struct Awaited {
    waiting: Mutex<HashMap<u64, Awaiting>>,
}

struct Awaiting {
    remaining: usize,
    online: usize,
    delivered: usize,
    done: Option<oneshot::Sender<(usize, usize)>>,
}

impl Awaited {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Awaiting>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Expects `arrivals` messages with this id back; None when none are.
    pub fn expect(&self, id: u64, arrivals: usize) -> Option<oneshot::Receiver<(usize, usize)>> {
        if arrivals == 0 {
            return None;
        }
        let (done, wait) = oneshot::channel();
        self.lock().insert(id, Awaiting { remaining: arrivals, online: 0, delivered: 0, done: Some(done) });
        Some(wait)
    }

    /// A message with this id came back and reached `online` connections, `delivered`
    /// of them queued it.
    fn arrived(&self, id: u64, online: usize, delivered: usize) {
        let mut waiting = self.lock();
        let Some(entry) = waiting.get_mut(&id) else { return };
        entry.online += online;
        entry.delivered += delivered;
        entry.remaining = entry.remaining.saturating_sub(1);
        if entry.remaining == 0 {
            if let Some(entry) = waiting.remove(&id) {
                let _ = entry.done.map(|done| done.send((entry.online, entry.delivered)));
            }
        }
    }

    pub fn forget(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// (online, delivered) here, once every expected message came back, or what had
    /// after `limit`.
    pub async fn wait(&self, id: u64, wait: Option<oneshot::Receiver<(usize, usize)>>, limit: Duration) -> (usize, usize) {
        let Some(wait) = wait else { return (0, 0) };
        match tokio::time::timeout(limit, wait).await {
            Ok(Ok(counts)) => counts,
            _ => {
                let entry = self.lock().remove(&id);
                tracing::debug!(id, "a publish's own message did not come back in time");
                entry.map_or((0, 0), |e| (e.online, e.delivered))
            }
        }
    }
}

/// Reads this node's subscriptions and delivers each message to local connections, in
/// the order Redis sent them, and makes sure the node still listens where its channels
/// live: a failover, a slot move or a dropped link can take a subscription away, and
/// Redis does not always say so.
pub struct Inbox {
    pub hub: Arc<Hub>,
    pub metrics: Arc<Metrics>,
    pub redis: Redis,
    pub node: u16,
    /// The channels this node listens to.
    pub channels: Vec<String>,
    /// This node's own channels (one per group, in the same slot as that group's fan-out
    /// channel), which no other node listens to: a publish on one is answered with 1
    /// while this node listens there, 0 once it does not.
    pub own_channels: Vec<String>,
    pub awaited: Arc<Awaited>,
    /// Told every group sequence that arrives, so this node's floor covers what other
    /// nodes appended too.
    pub history: Arc<RedisHistory>,
    /// Told every member change of a presence topic, when presence is on.
    pub presence: Option<Arc<Presence>>,
    /// Whether Redis lists this node's sessions since the link's last break.
    pub listed: Arc<Listed>,
}

/// Told to every connection of a node that stopped hearing its channels (its Redis link
/// dropped, a subscription was taken away, or messages were dropped on the way in), and
/// again once it hears them all and Redis lists its sessions (a Redis that came back empty
/// lists them once the registrar has written them again): what other nodes published in
/// between is only in history.
const RELAY_LOST: &str = r#"{"type":"gap","reason":"relay_lost"}"#;

/// Tells every client here that messages published meanwhile may not have reached it.
pub async fn tell_relay_lost(hub: &Arc<Hub>, metrics: &Metrics) {
    metrics.relay_lost.increment(1);
    let notice = Site::Codec.scope(|| Arc::new(Message::from_envelope(0, RELAY_LOST, None, Instant::now())));
    hub.broadcast(&notice).await;
}

/// How often a node checks that it still listens on each of its channels.
const LISTENING_CHECK_EVERY: Duration = Duration::from_secs(1);

/// First wait before checking and subscribing again while deaf; doubles up to
/// [`LISTENING_CHECK_EVERY`].
const RESUBSCRIBE_FIRST: Duration = Duration::from_millis(50);

/// Whether the node may have missed messages on its channels since it last heard them all.
#[derive(Default)]
struct Hearing {
    deaf: AtomicBool,
    check_now: Notify,
}

impl Inbox {
    /// Runs until the Redis link is dropped.
    pub async fn run(self, pushes: Receiver<PushInfo>) {
        let hearing = Hearing::default();
        tokio::select! {
            _ = self.read(pushes, &hearing) => {}
            _ = self.keep_listening(&hearing) => {}
        }
    }

    async fn read(&self, mut pushes: Receiver<PushInfo>, hearing: &Hearing) {
        while let Some(push) = pushes.recv().await {
            match push.kind {
                PushKind::Message | PushKind::SMessage => self.deliver(&push.data).await,
                PushKind::Disconnection => {
                    self.metrics.redis_reconnects.increment(1);
                    self.went_deaf(hearing, "lost a Redis connection").await;
                }
                // Nothing here unsubscribes: an unasked-for (S)UNSUBSCRIBE means the
                // channel's slot moved to another shard, and the redis crate has forgotten
                // the subscription.
                PushKind::SUnsubscribe | PushKind::Unsubscribe => {
                    let Some(Value::BulkString(channel)) = push.data.first() else { continue };
                    if self.channels.iter().any(|c| c.as_bytes() == channel.as_slice()) {
                        self.went_deaf(hearing, "unsubscribed by Redis (a slot migration?)").await;
                    }
                }
                _ => {}
            }
            match self.redis.take_dropped_pushes() {
                DroppedPushes::None => {}
                DroppedPushes::Messages => self.tell_relay_lost().await,
                DroppedPushes::Notices => self.went_deaf(hearing, "dropped what Redis said about this node's subscriptions").await,
            }
        }
    }

    /// Tells every client here of the gap (once until the node hears again) and has the
    /// subscriptions checked now.
    async fn went_deaf(&self, hearing: &Hearing, why: &str) {
        if !hearing.deaf.swap(true, Ordering::AcqRel) {
            tracing::warn!("{why}: subscribing again, and telling every client here of a gap");
            self.tell_relay_lost().await;
        }
        hearing.check_now.notify_one();
    }

    async fn tell_relay_lost(&self) {
        tell_relay_lost(&self.hub, &self.metrics).await;
    }

    /// Every [`LISTENING_CHECK_EVERY`] (and at once when told), publishes nothing on each
    /// of this node's own channels. A group answered 0 has lost its subscription without
    /// a word (seen after a cluster failover): the node goes deaf. While deaf, it
    /// subscribes every channel again, wherever its slot now lives (subscribing twice
    /// changes nothing), and checks again, sooner; once every channel is subscribed and
    /// heard, and Redis lists this node's sessions again, its clients are told of the gap
    /// between.
    async fn keep_listening(&self, hearing: &Hearing) {
        let mut wait = LISTENING_CHECK_EVERY;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = hearing.check_now.notified() => {}
            }
            let heard = self.hears_every_group().await;
            if heard == Some(false) {
                self.went_deaf(hearing, "no longer subscribed to a channel of this node").await;
            }
            if !hearing.deaf.load(Ordering::Acquire) {
                wait = LISTENING_CHECK_EVERY;
                continue;
            }
            let subscribed = futures_util::future::join_all(self.channels.iter().map(|c| self.redis.subscribe(c))).await;
            if heard == Some(true) && subscribed.iter().all(Result::is_ok) {
                let breaks = self.redis.breaks();
                self.listed.after(breaks, LISTENING_CHECK_EVERY).await;
                if self.redis.breaks() != breaks {
                    wait = RESUBSCRIBE_FIRST;
                    continue;
                }
                hearing.deaf.store(false, Ordering::Release);
                tracing::info!("hearing every channel again; telling every client here of the gap");
                self.tell_relay_lost().await;
                wait = LISTENING_CHECK_EVERY;
            } else {
                wait = if wait >= LISTENING_CHECK_EVERY { RESUBSCRIBE_FIRST } else { (wait * 2).min(LISTENING_CHECK_EVERY) };
            }
        }
    }

    /// Whether this node listens on every own channel: `Some(false)` if Redis answered 0
    /// for one, `None` if it could not ask for some (Redis unreachable).
    async fn hears_every_group(&self) -> Option<bool> {
        let probes: Vec<Cmd> = self.own_channels.iter().map(|c| self.redis.publish_cmd(c, b"")).collect();
        let answers = self.redis.batch_results(RedisCommand::Publish, probes).await.ok()?;
        if answers.iter().any(|a| matches!(a, Ok(Value::Int(0)))) {
            return Some(false);
        }
        answers.iter().all(Result::is_ok).then_some(true)
    }

    /// A presence topic's member change, from any node: told with this node's next batch.
    fn members_changed(&self, topic: &str, envelope: &str) {
        let Some(presence) = &self.presence else { return };
        let Ok(told) = serde_json::from_str::<Told>(envelope) else {
            self.metrics.dropped(DropReason::BadRelay, 1);
            return;
        };
        let info: Option<Arc<RawValue>> = told.info.map(|i| Arc::from(i.to_owned()));
        for uid in &told.uids {
            presence.changed(topic, uid, told.joined, told.version, told.members, info.clone());
        }
    }

    /// One message on a channel: `data` is `[channel, payload]`.
    async fn deliver(&self, data: &[Value]) {
        let (hub, metrics) = (&self.hub, &self.metrics);
        let Some(Value::BulkString(payload)) = data.get(1) else {
            metrics.dropped(DropReason::BadRelay, 1);
            return;
        };
        // A listening check's probe.
        if payload.is_empty() {
            return;
        }
        let Some(relay) = Relay::decode(payload) else {
            tracing::warn!(bytes = payload.len(), "undecodable message on a node channel");
            metrics.dropped(DropReason::BadRelay, 1);
            return;
        };
        if let Target::Members(topic) = relay.target {
            self.members_changed(topic, relay.envelope);
            return;
        }
        if relay.sequence > 0 {
            self.history.observed(u64::from(relay.group), relay.sequence);
        }
        let own = relay.origin == self.node;
        if !own {
            metrics.relayed(Relayed::In, relay.target.kind());
        }
        let age = Duration::from_millis(crate::clock::wall_ms().saturating_sub(relay.published_ms));
        let accepted_at = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
        // A gap the append script sent ahead of a client's message (id 0) is for every subscriber.
        let except = relay.except.filter(|_| relay.id != 0);
        let msg = Site::Codec.scope(|| Arc::new(Message::from_envelope(relay.id, relay.envelope, envelope_position(relay.envelope), accepted_at).except(except)));
        let (online, delivered) = match &relay.target {
            Target::Uids(uids) => hub.push(uids, &msg).await,
            Target::Topic(topic) => {
                let delivered = hub.publish(topic, &msg).await;
                (delivered, delivered)
            }
            Target::Everyone => {
                let delivered = hub.broadcast(&msg).await;
                (delivered, delivered)
            }
            Target::Members(_) => (0, 0),
        };
        if own {
            self.awaited.arrived(relay.id, online, delivered);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sequence_is_twenty_zero_padded_digits() {
        for value in [0, 7, 1234567890, u64::MAX] {
            assert_eq!(decimal_digits(value), *format!("{value:020}").as_bytes());
        }
    }

    #[test]
    fn a_member_change_of_a_uid_with_escapes_is_read_back() {
        let uids = ["q\"", "bs\\", "n\n", "x\u{1f}"];
        let told = Told { joined: true, version: 7, members: 4, uids: uids.iter().map(|u| (*u).into()).collect(), info: None };
        let text = serde_json::to_string(&told).unwrap();
        let read: Told = serde_json::from_str(&text).expect("escaped uids are read, owned");
        assert_eq!(read.uids, uids);
    }

    #[test]
    fn every_target_round_trips() {
        for target in [Target::Uids(vec!["alice", "", "bob"]), Target::Topic("news"), Target::Everyone, Target::Members("room")] {
            let relay = Relay { origin: 7, id: 1 << 40, published_ms: 1_700_000_000_000, group: 15, sequence: 12_345_678_901, except: Some(42), target, envelope: r#"{"a":[1,2]}"# };
            assert_eq!(Relay::decode(&relay.encode()), Some(relay));
        }
    }

    #[test]
    fn truncated_or_unknown_input_is_refused() {
        let bytes = Relay { origin: 1, id: 2, published_ms: 3, group: 0, sequence: 0, except: None, target: Target::Uids(vec!["x"]), envelope: "1" }.encode();
        for cut in 0..HEADER + 4 + 2 + 1 {
            assert_eq!(Relay::decode(&bytes[..cut]), None, "cut at {cut}");
        }
        let mut unknown = bytes.clone();
        unknown[0] = b'Z';
        assert_eq!(Relay::decode(&unknown), None);
        let mut huge_count = bytes;
        huge_count[HEADER..HEADER + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(Relay::decode(&huge_count), None);
    }
}
