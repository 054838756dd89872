//! One connection's bounded outbound queue and the policy for when it is full.
//!
//! The queue holds `Arc<Message>`s (8 bytes each): the framed bytes are shared with every
//! other connection that got the same message. An empty queue allocates nothing, and
//! costs the connection's record one pointer. What a
//! resume replays, and the gaps drop-oldest leaves, go out before the queue
//! ([`Tracking`]).
//!
//! The outbox also says who may write to the socket. Normally only the connection's driver
//! does. When the driver has written everything a plain WebSocket owes, it lends the
//! socket to publishers ([`Outbox::lend`]): while the queue is empty, a publisher writes the
//! message itself, under this lock, and the driver is not woken at all. The driver takes the
//! socket back ([`Outbox::take_back`]) before it writes anything of its own.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::config::SlowConsumer;
use crate::wire::{Message, Transport};

use super::tracking::{Partial, Popped, Tracking};

pub struct Limits {
    pub max_messages: usize,
    pub max_bytes: usize,
    pub policy: SlowConsumer,
}

/// What happened to a message offered to a queue.
#[derive(Debug, PartialEq, Eq)]
pub enum Enqueued {
    /// Queued, making the queue `depth` long; `dropped` older messages were discarded to
    /// make room (drop-oldest).
    Queued { dropped: usize, dropped_bytes: usize, depth: usize },
    /// The queue was full under the disconnect policy: the connection must close with
    /// 1013, and the new message plus everything queued (`dropped`) is discarded.
    Overflow { dropped: usize, dropped_bytes: usize },
    /// The connection is already closing; the message is discarded.
    Closed,
}

/// Who writes to the socket: the driver (`DRIVER`), a publisher (the socket's fd plus one:
/// the driver lent it), or nobody: the connection is closing (`CLOSED`). A u32 beside
/// `full_since_s`: lending costs an idle connection nothing.
const DRIVER: u32 = 0;
const CLOSED: u32 = u32::MAX;

/// Seconds of the process clock plus one: what `full_since_s` holds when set.
fn now_s_plus_one() -> u32 {
    (crate::clock::now_ms() / 1000) as u32 + 1
}

#[derive(Default)]
pub struct Outbox {
    /// Messages waiting; None (unallocated) when none are, as on an idle connection.
    backlog: Option<Box<Backlog>>,
    /// When drop-oldest first had to drop for a queue that has not been read from since,
    /// in seconds of the process clock plus one (0: not full).
    full_since_s: u32,
    writer: u32,
    tracking: Option<Box<Tracking>>,
}

#[derive(Default)]
struct Backlog {
    queue: VecDeque<Arc<Message>>,
    bytes: usize,
}

impl Outbox {
    /// Messages queued, and their bytes (a replay aside).
    fn backlog(&self) -> (usize, usize) {
        self.backlog.as_ref().map_or((0, 0), |b| (b.queue.len(), b.bytes))
    }

    /// `since_ms`: the connection's start, should it need a [`Tracking`] to note a gap.
    pub fn push(&mut self, msg: &Arc<Message>, transport: Transport, limits: &Limits, since_ms: u64) -> Enqueued {
        if self.writer == CLOSED {
            return Enqueued::Closed;
        }
        let size = msg.bytes(transport).len();
        let (queued, queued_bytes) = self.backlog();
        if queued >= limits.max_messages || queued_bytes + size > limits.max_bytes {
            // A Pusher client has no gap notice to read: it is closed (4100), to come back.
            let policy = if transport == Transport::Pusher { SlowConsumer::Disconnect } else { limits.policy };
            match policy {
                SlowConsumer::Disconnect => {
                    // Everything closing drops is counted: the queue, and a half-sent
                    // message or a replay left, which were counted as queued too.
                    let (messages, bytes) = self.close();
                    return Enqueued::Overflow { dropped: messages + 1, dropped_bytes: bytes + size };
                }
                SlowConsumer::DropOldest => {
                    let (mut dropped, mut dropped_bytes) = (0, 0);
                    let backlog = self.backlog.get_or_insert_with(Box::default);
                    while backlog.queue.len() >= limits.max_messages || backlog.bytes + size > limits.max_bytes {
                        // Answers the client waits for are kept: a connection has few of
                        // them at once (`conn::MAX_IN_FLIGHT`).
                        let Some(oldest) = backlog.queue.iter().position(|m| !m.answer) else { break };
                        let Some(old) = backlog.queue.remove(oldest) else { break };
                        self.tracking.get_or_insert_with(|| Box::new(Tracking::new(since_ms))).lose(&old);
                        let old_size = old.bytes(transport).len();
                        backlog.bytes -= old_size;
                        dropped += 1;
                        dropped_bytes += old_size;
                    }
                    backlog.queue.push_back(msg.clone());
                    backlog.bytes += size;
                    if self.full_since_s == 0 {
                        self.full_since_s = now_s_plus_one();
                    }
                    return Enqueued::Queued { dropped, dropped_bytes, depth: backlog.queue.len() };
                }
            }
        }
        let backlog = self.backlog.get_or_insert_with(Box::default);
        backlog.queue.push_back(msg.clone());
        backlog.bytes += size;
        Enqueued::Queued { dropped: 0, dropped_bytes: 0, depth: backlog.queue.len() }
    }

    /// The next thing to write: a replayed message or notice, a gap notice, or the next
    /// queued message. A queued message the client was already sent (a resume replayed
    /// it) is passed to `skipped` instead. An SSE connection starts tracking its cursor
    /// at its first message with a position; `since_ms` is its start.
    pub fn pop(&mut self, transport: Transport, since_ms: u64, mut skipped: impl FnMut(&Message)) -> Option<Popped> {
        if let Some(tracking) = self.tracking.as_mut().filter(|t| t.has_pending()) {
            let popped = tracking.pop_pending(transport);
            // The client is reading its replay; the timeout counts from its last progress.
            self.full_since_s = if tracking.replaying() { now_s_plus_one() } else { 0 };
            if popped.is_some() {
                return popped;
            }
            // Only gaps the replay had filled since were owed: the queue is next.
        }
        loop {
            let backlog = self.backlog.as_mut()?;
            let Some(msg) = backlog.queue.pop_front() else {
                self.backlog = None;
                return None;
            };
            self.full_since_s = 0;
            backlog.bytes -= msg.bytes(transport).len();
            if backlog.queue.is_empty() {
                // Give back a burst's worth of slots; an idle connection holds no queue memory.
                self.backlog = None;
            }
            if let Some(position) = msg.position {
                if transport == Transport::Sse && self.tracking.is_none() {
                    self.tracking = Some(Box::new(Tracking::new(since_ms)));
                }
                if let Some(tracking) = self.tracking.as_mut() {
                    if tracking.has(&position) {
                        skipped(&msg);
                        continue;
                    }
                    if tracking.missed_before(&position) {
                        // The gap first; the message stays at the front of the queue.
                        let backlog = self.backlog.get_or_insert_with(Box::default);
                        backlog.bytes += msg.bytes(transport).len();
                        backlog.queue.push_front(msg);
                        return tracking.pop_pending(transport);
                    }
                    tracking.advance(position);
                }
            }
            let bytes = msg.bytes(transport).clone();
            let popped = match &self.tracking {
                Some(tracking) => tracking.popped(transport, bytes, Some(msg)),
                None => Popped { bytes, tail: None, message: Some(msg), queued: true, replayed: false },
            };
            return Some(Popped { queued: true, ..popped });
        }
    }

    /// Lends the socket `fd` to publishers, if nothing is waiting for the driver to write:
    /// the queue is empty, and nothing tracks what this connection was sent (a resume, a
    /// gap, a half-sent message all go through the driver). True if it was lent.
    pub fn lend(&mut self, fd: std::os::fd::RawFd) -> bool {
        if self.writer != DRIVER || self.backlog().0 > 0 || self.tracking.is_some() || fd < 0 {
            return false;
        }
        self.writer = fd as u32 + 1;
        true
    }

    /// The socket's fd, while it is lent to publishers.
    pub fn lent(&self) -> Option<std::os::fd::RawFd> {
        (self.writer != DRIVER && self.writer != CLOSED).then(|| (self.writer - 1) as std::os::fd::RawFd)
    }

    /// Gives the socket back to the driver (unless the connection is closing), with what a
    /// publisher left half-sent, which the driver must write before anything else.
    pub fn take_back(&mut self) -> Option<Partial> {
        if self.writer != CLOSED {
            self.writer = DRIVER;
        }
        self.tracking.as_mut().and_then(|t| t.take_partial())
    }

    /// A publisher's direct write took only `written` bytes of `message`: the driver is to
    /// write the rest, first. The socket goes back to the driver.
    pub fn half_sent(&mut self, message: &Arc<Message>, transport: Transport, written: usize, since_ms: u64) {
        self.writer = DRIVER;
        let bytes = message.bytes(transport).clone();
        self.tracking.get_or_insert_with(|| Box::new(Tracking::new(since_ms))).set_partial(Partial { bytes, written, message: message.clone() });
    }

    /// Starts a resume: `tracking` holds what to replay before the queue. A socket lent
    /// to publishers goes back to the driver first: nothing live may overtake the replay.
    /// A replay is a backlog like a full queue: until the client reads it, the
    /// slow-consumer timeout runs.
    pub fn resume(&mut self, mut tracking: Tracking) {
        if self.writer != CLOSED {
            self.writer = DRIVER;
        }
        if let Some(earlier) = self.tracking.take() {
            tracking.inherit(*earlier);
        }
        if tracking.replaying() {
            self.full_since_s = now_s_plus_one();
        }
        self.tracking = Some(Box::new(tracking));
    }

    /// The connection's cursor, when it tracks one.
    pub fn cursor(&self) -> Option<String> {
        self.tracking.as_ref().map(|t| t.cursor())
    }

    /// Stops taking messages; returns how many were still queued (and their bytes), a
    /// half-sent message and a replay not yet written included.
    pub fn close(&mut self) -> (usize, usize) {
        self.writer = CLOSED;
        let partial = self.tracking.as_mut().and_then(|t| t.take_partial()).map_or((0, 0), |p| (1, p.bytes.len() - p.written));
        let replay = self.tracking.as_ref().map_or((0, 0), |t| t.replay_left());
        let (queued, queued_bytes) = self.backlog();
        let left = (queued + partial.0 + replay.0, queued_bytes + partial.1 + replay.1);
        self.backlog = None;
        self.tracking = None;
        left
    }

    /// Messages owed: queued, and replayed not yet written.
    pub fn len(&self) -> usize {
        self.backlog().0 + self.tracking.as_ref().map_or(0, |t| t.replay_left().0)
    }

    pub fn is_closed(&self) -> bool {
        self.writer == CLOSED
    }

    pub fn is_empty(&self) -> bool {
        self.backlog().0 == 0 && !self.tracking.as_ref().is_some_and(|t| t.has_pending())
    }

    /// Bytes owed: queued, and replayed not yet written.
    pub fn bytes(&self) -> usize {
        self.backlog().1 + self.tracking.as_ref().map_or(0, |t| t.replay_left().1)
    }

    /// Milliseconds (of the process clock) since the queue became full, or a replay was
    /// queued, without being read from; None when neither.
    pub fn full_since_ms(&self) -> Option<u64> {
        (self.full_since_s > 0).then(|| (self.full_since_s as u64 - 1) * 1000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::cursor::{Position, StreamKey};
    use std::time::Instant;

    fn msg(id: u64) -> Arc<Message> {
        Arc::new(Message::new(id, None, "1", None, Instant::now()))
    }

    fn positioned(offset: u64) -> Arc<Message> {
        let position = Position { key: StreamKey::Broadcast, epoch: 5, offset };
        Arc::new(Message::new(offset, None, "1", Some(position), Instant::now()))
    }

    fn pop_text(q: &mut Outbox, transport: Transport) -> Option<String> {
        let popped = q.pop(transport, 0, |_| panic!("nothing was sent twice"))?;
        let mut text = match transport {
            Transport::WebSocket | Transport::Pusher => String::from_utf8(crate::wire::ws::payload_of(&popped.bytes).to_vec()).unwrap(),
            Transport::Sse => String::from_utf8(popped.bytes.to_vec()).unwrap(),
        };
        if let Some(tail) = popped.tail {
            text.push_str(std::str::from_utf8(&tail).unwrap());
        }
        Some(text)
    }

    #[test]
    fn drop_oldest_keeps_newest_and_says_what_it_dropped() {
        let limits = Limits { max_messages: 2, max_bytes: 1 << 20, policy: SlowConsumer::DropOldest };
        let mut q = Outbox::default();
        for id in 1..=3 {
            q.push(&msg(id), Transport::WebSocket, &limits, 0);
        }
        assert_eq!(q.len(), 2);
        assert!(q.full_since_ms().is_some(), "a drop marks the queue full");
        assert_eq!(pop_text(&mut q, Transport::WebSocket).unwrap(), r#"{"count":1,"type":"gap"}"#);
        assert!(pop_text(&mut q, Transport::WebSocket).unwrap().contains(r#""id":"2""#));
        assert_eq!(q.full_since_ms(), None, "a read clears it");
        assert!(pop_text(&mut q, Transport::WebSocket).unwrap().contains(r#""id":"3""#));
        assert_eq!(q.bytes(), 0);
    }

    #[test]
    fn a_gap_names_the_stream_range_lost() {
        let limits = Limits { max_messages: 2, max_bytes: 1 << 20, policy: SlowConsumer::DropOldest };
        let mut q = Outbox::default();
        for offset in 1..=6 {
            q.push(&positioned(offset), Transport::WebSocket, &limits, 0);
        }
        let gap: serde_json::Value = serde_json::from_str(&pop_text(&mut q, Transport::WebSocket).unwrap()).unwrap();
        assert_eq!(gap, serde_json::json!({"type": "gap", "stream": "b", "epoch": "00000005", "from": 1, "to": 4}));
        assert!(pop_text(&mut q, Transport::WebSocket).unwrap().ends_with(r#""offset":5}"#));
    }

    /// An SSE connection (it tracks what it was sent) whose uid stream skips offsets is
    /// told the run before the message; a run drop-oldest already told is not told twice.
    #[test]
    fn a_uid_stream_that_skips_offsets_is_told_the_run_it_never_got() {
        let uid = |offset| {
            let position = Position { key: StreamKey::Uid(7), epoch: 5, offset };
            Arc::new(Message::new(offset, None, "1", Some(position), Instant::now()))
        };
        let limits = Limits { max_messages: 2, max_bytes: 1 << 20, policy: SlowConsumer::DropOldest };
        let mut q = Outbox::default();
        q.push(&uid(1), Transport::Sse, &limits, 0);
        assert!(pop_text(&mut q, Transport::Sse).unwrap().contains("u.00000007:00000005:1\n"));
        q.push(&uid(4), Transport::Sse, &limits, 0);
        let gap = pop_text(&mut q, Transport::Sse).unwrap();
        assert!(gap.starts_with("event: gap\n") && gap.contains(r#""from":2"#) && gap.contains(r#""to":3"#), "{gap}");
        assert!(pop_text(&mut q, Transport::Sse).unwrap().contains(r#""offset":4}"#));
        assert_eq!(q.bytes(), 0);
        for offset in 5..=8 {
            q.push(&uid(offset), Transport::Sse, &limits, 0);
        }
        let told = pop_text(&mut q, Transport::Sse).unwrap();
        assert!(told.contains(r#""from":5"#) && told.contains(r#""to":6"#), "{told}");
        assert!(pop_text(&mut q, Transport::Sse).unwrap().contains(r#""offset":7}"#), "no second gap for the dropped run");
        assert!(pop_text(&mut q, Transport::Sse).unwrap().contains(r#""offset":8}"#));
        // A topic's stream may skip the client's own publishes: not a loss.
        let topic = |offset| Arc::new(Message::new(offset, None, "1", Some(Position { key: StreamKey::Topic(3), epoch: 5, offset }), Instant::now()));
        q.push(&topic(1), Transport::Sse, &limits, 0);
        q.push(&topic(3), Transport::Sse, &limits, 0);
        assert!(pop_text(&mut q, Transport::Sse).unwrap().contains(r#""offset":1}"#));
        assert!(pop_text(&mut q, Transport::Sse).unwrap().contains(r#""offset":3}"#));
    }

    /// Drop-oldest discarding messages the client already has (a resume replayed them,
    /// and they also arrived live) tells no gap: nothing was lost.
    #[test]
    fn dropping_what_the_client_already_has_is_no_gap() {
        let limits = Limits { max_messages: 2, max_bytes: 1 << 20, policy: SlowConsumer::DropOldest };
        let mut q = Outbox::default();
        let at = positioned(5).position.unwrap();
        q.resume(Tracking::resumed(0, vec![at], Default::default(), 0));
        for offset in 3..=7 {
            q.push(&positioned(offset), Transport::WebSocket, &limits, 0);
        }
        assert!(pop_text(&mut q, Transport::WebSocket).unwrap().ends_with(r#""offset":6}"#), "no gap first");
        assert!(pop_text(&mut q, Transport::WebSocket).unwrap().ends_with(r#""offset":7}"#));
    }

    #[test]
    fn sse_events_end_with_the_connection_cursor_and_nothing_is_sent_twice() {
        let limits = Limits { max_messages: 10, max_bytes: 1 << 20, policy: SlowConsumer::DropOldest };
        let mut q = Outbox::default();
        q.push(&positioned(1), Transport::Sse, &limits, 0);
        q.push(&positioned(2), Transport::Sse, &limits, 0);
        assert!(pop_text(&mut q, Transport::Sse).unwrap().ends_with("\nid: s0,b:00000005:1\n\n"));
        q.push(&positioned(1), Transport::Sse, &limits, 0);
        assert!(pop_text(&mut q, Transport::Sse).unwrap().ends_with("\nid: s0,b:00000005:2\n\n"));
        let mut skipped = 0;
        assert!(q.pop(Transport::Sse, 0, |_| skipped += 1).is_none());
        assert_eq!(skipped, 1, "offset 1 again is a duplicate");
    }

    #[test]
    fn disconnect_policy_overflows_and_closes() {
        let limits = Limits { max_messages: 2, max_bytes: 1 << 20, policy: SlowConsumer::Disconnect };
        let mut q = Outbox::default();
        q.push(&msg(1), Transport::WebSocket, &limits, 0);
        q.push(&msg(2), Transport::WebSocket, &limits, 0);
        assert!(matches!(q.push(&msg(3), Transport::WebSocket, &limits, 0), Enqueued::Overflow { dropped: 3, .. }));
        assert_eq!(q.push(&msg(4), Transport::WebSocket, &limits, 0), Enqueued::Closed);
        assert!(q.is_empty());
    }

    #[test]
    fn a_pusher_queue_that_overflows_closes_whatever_the_policy() {
        let limits = Limits { max_messages: 2, max_bytes: 1 << 20, policy: SlowConsumer::DropOldest };
        let mut q = Outbox::default();
        q.push(&msg(1), Transport::Pusher, &limits, 0);
        q.push(&msg(2), Transport::Pusher, &limits, 0);
        assert!(matches!(q.push(&msg(3), Transport::Pusher, &limits, 0), Enqueued::Overflow { dropped: 3, .. }), "no gap notice a Pusher client cannot read");
    }

    #[test]
    fn byte_budget_is_honoured() {
        let one = msg(11).bytes(Transport::WebSocket).len();
        let limits = Limits { max_messages: 100, max_bytes: one * 3, policy: SlowConsumer::DropOldest };
        let mut q = Outbox::default();
        for id in 11..=20 {
            q.push(&msg(id), Transport::WebSocket, &limits, 0);
            assert!(q.bytes() <= one * 3);
        }
        assert_eq!(q.len(), 3);
    }

    #[test]
    fn the_socket_is_lent_only_while_nothing_waits_and_comes_back_for_a_resume() {
        let limits = Limits { max_messages: 8, max_bytes: 1 << 20, policy: SlowConsumer::DropOldest };
        let mut q = Outbox::default();
        q.push(&msg(1), Transport::WebSocket, &limits, 0);
        assert!(!q.lend(7), "a queued message waits for the driver");
        pop_text(&mut q, Transport::WebSocket);
        assert!(q.lend(7));
        assert_eq!(q.lent(), Some(7));
        q.resume(Tracking::new(0));
        assert_eq!(q.lent(), None, "a replay must not be overtaken by direct writes");
        assert!(!q.lend(7), "nor lent again while tracking");
    }

    #[test]
    fn a_half_sent_message_goes_to_the_driver_and_counts_when_closed() {
        let mut q = Outbox::default();
        assert!(q.lend(3));
        let m = msg(1);
        q.half_sent(&m, Transport::WebSocket, 10, 0);
        assert_eq!(q.lent(), None);
        let partial = q.take_back().expect("the rest of the frame");
        assert_eq!((partial.written, partial.bytes.len()), (10, m.bytes(Transport::WebSocket).len()));
        q.half_sent(&m, Transport::WebSocket, 10, 0);
        assert_eq!(q.close(), (1, m.bytes(Transport::WebSocket).len() - 10), "closing counts the half-sent message");
        assert!(!q.lend(3) && q.lent().is_none(), "a closed outbox lends nothing");
    }

    /// What an overflow discards is all counted dropped: the queue, the new message, and a
    /// half-sent one (counted as queued, so the node's gauge must give it back too).
    #[test]
    fn an_overflow_counts_the_half_sent_message_it_drops() {
        let limits = Limits { max_messages: 1, max_bytes: 1 << 20, policy: SlowConsumer::Disconnect };
        let mut q = Outbox::default();
        assert!(q.lend(3));
        let (half, queued, new) = (msg(1), msg(2), msg(3));
        q.half_sent(&half, Transport::WebSocket, 10, 0);
        q.push(&queued, Transport::WebSocket, &limits, 0);
        let len = |m: &Arc<Message>| m.bytes(Transport::WebSocket).len();
        let expected = Enqueued::Overflow { dropped: 3, dropped_bytes: len(&half) - 10 + len(&queued) + len(&new) };
        assert_eq!(q.push(&new, Transport::WebSocket, &limits, 0), expected);
    }
}