//! What a connection knows of its streams, once it needs to: the last position written to
//! the client in each (an SSE connection's cursor, and what a resume must not repeat),
//! the messages a resume replays before anything queued, and the ranges drop-oldest
//! discarded, which the client is told of before its next message.
//!
//! Boxed and created on first need, so a connection that never resumed, never lost a
//! message and is not SSE holds a null pointer for all of it; what is owed beside the
//! queue is boxed again and given back once written, so an SSE connection's cursor is its
//! `since` and one position per stream.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;

use crate::wire::cursor::{epoch_text, Cursor, Position, StreamKey};
use crate::wire::{self, sse, Message, Transport};

/// The last position `written` holds in `position`'s stream, if it is of the same epoch.
fn written_in<'a>(written: &'a mut [Position], position: &Position) -> Option<&'a mut Position> {
    written.iter_mut().find(|w| w.key == position.key && w.epoch == position.epoch)
}

/// What a resume queues for the connection, in order.
pub enum Replayed {
    Message(Arc<Message>),
    /// The `resumed` notice that ends a replay; from then on the cursor's `since` is the
    /// new connection's.
    Resumed { json: String, since_ms: u64 },
}

/// A run of messages one stream lost to drop-oldest (or, for messages with no stream
/// position, how many).
struct Lost {
    position: Option<Position>,
    to: u64,
    count: usize,
    /// Noted before or during a resume's replay, which may have written some of it since
    /// (a live message dropped while history was read is in the history too): told only
    /// from past what the client was written.
    before_replay: bool,
}

pub struct Tracking {
    /// Wall-clock ms the positions start from: the cursor's `since`.
    since_ms: u64,
    written: Vec<Position>,
    /// None (unallocated) once written: what an SSE connection keeps for its cursor is the
    /// two fields above.
    pending: Option<Box<Pending>>,
}

/// What is still owed the client beside its queue.
#[derive(Default)]
struct Pending {
    replay: VecDeque<Replayed>,
    /// Bytes of the replayed messages not yet written: they count as queued.
    replay_bytes: usize,
    lost: Vec<Lost>,
    /// A publisher's direct write that the socket took only part of.
    partial: Option<Partial>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.replay.is_empty() && self.lost.is_empty() && self.partial.is_none()
    }
}

/// A message a publisher's direct write left half-sent: the driver writes the rest first.
pub struct Partial {
    pub bytes: Bytes,
    pub written: usize,
    pub message: Arc<Message>,
}

/// The next thing to write, and (SSE) the tail that ends it.
pub struct Popped {
    pub bytes: Bytes,
    pub tail: Option<Bytes>,
    /// Set for published messages, whose delivery is counted and timed.
    pub message: Option<Arc<Message>>,
    /// Taken from the queue (not replayed from history): counted off the queue gauges,
    /// and its delivery timed.
    pub queued: bool,
    /// A replayed message: counted off the queue gauges, not timed (it is not new).
    pub replayed: bool,
}

impl Tracking {
    pub fn new(since_ms: u64) -> Tracking {
        Tracking { since_ms, written: Vec::new(), pending: None }
    }

    /// A resume: `positions` the client holds (carried into this connection's cursor) and
    /// what it missed, `replay_bytes` of messages as the connection writes them.
    pub fn resumed(since_ms: u64, positions: Vec<Position>, replay: VecDeque<Replayed>, replay_bytes: usize) -> Tracking {
        let pending = Pending { replay, replay_bytes, lost: Vec::new(), partial: None };
        Tracking { since_ms, written: positions, pending: (!pending.is_empty()).then(|| Box::new(pending)) }
    }

    /// Takes over what drop-oldest noted in `earlier` (messages lost while the resume read
    /// history), so their gaps are still told.
    pub fn inherit(&mut self, earlier: Tracking) {
        if let Some(earlier) = earlier.pending.filter(|p| !p.lost.is_empty()) {
            self.pending().lost.extend(earlier.lost.into_iter().map(|run| Lost { before_replay: true, ..run }));
        }
    }

    /// Replayed messages not yet written, and their bytes.
    pub fn replay_left(&self) -> (usize, usize) {
        self.pending.as_ref().map_or((0, 0), |p| (p.replay.iter().filter(|r| matches!(r, Replayed::Message(_))).count(), p.replay_bytes))
    }

    /// Whether replayed messages are still to be written.
    pub fn replaying(&self) -> bool {
        self.pending.as_ref().is_some_and(|p| p.replay_bytes > 0)
    }

    /// Whether the client has been sent `position` (or a later one of the same epoch).
    pub fn has(&self, position: &Position) -> bool {
        self.written.iter().any(|w| w.key == position.key && w.epoch == position.epoch && w.offset >= position.offset)
    }

    /// Records `position` as written.
    pub fn advance(&mut self, position: Position) {
        match self.written.iter_mut().find(|w| w.key == position.key) {
            Some(w) => *w = position,
            None => {
                // One place per stream the connection reads, and most read one or two: a
                // first push would make room for four.
                self.written.reserve_exact(1);
                self.written.push(position)
            }
        }
    }

    pub fn cursor(&self) -> String {
        let mut out = String::new();
        Cursor::write(self.since_ms, &self.written, &mut out);
        out
    }

    /// Whether `position`, in the connection's uid stream, skips offsets of the epoch
    /// written last: they never reached this node for it (on a Redis Cluster, a push
    /// whose lookup ran before Redis listed a resuming session, and whose append ran after
    /// its history was read). The run is noted as lost, to be told before `position`.
    /// Only the uid stream: a topic's messages the client published itself skip it.
    pub fn missed_before(&mut self, position: &Position) -> bool {
        if !matches!(position.key, StreamKey::Uid(_)) {
            return false;
        }
        let Some(last) = written_in(&mut self.written, position) else { return false };
        if position.offset <= last.offset + 1 {
            return false;
        }
        let from = Position { offset: last.offset + 1, ..*last };
        last.offset = position.offset - 1;
        let count = (position.offset - from.offset) as usize;
        self.pending().lost.push(Lost { position: Some(from), to: position.offset - 1, count, before_replay: false });
        true
    }

    /// Notes a message drop-oldest discarded, merging it with the run before it; one the
    /// client was already sent (a resume replayed it) is no loss.
    pub fn lose(&mut self, msg: &Message) {
        if msg.position.is_some_and(|p| self.has(&p)) {
            return;
        }
        // Told as this run, not again as a skip when the next message comes.
        if let Some(p) = msg.position {
            if let Some(last) = written_in(&mut self.written, &p) {
                last.offset = last.offset.max(p.offset);
            }
        }
        let key = msg.position.map(|p| (p.key, p.epoch));
        let pending = self.pending();
        let before_replay = !pending.replay.is_empty();
        if let Some(run) = pending.lost.iter_mut().find(|l| l.position.map(|p| (p.key, p.epoch)) == key) {
            run.count += 1;
            run.before_replay |= before_replay;
            if let Some(p) = msg.position {
                run.to = run.to.max(p.offset);
            }
            return;
        }
        pending.lost.push(Lost { position: msg.position, to: msg.position.map_or(0, |p| p.offset), count: 1, before_replay });
    }

    pub fn set_partial(&mut self, partial: Partial) {
        self.pending().partial = Some(partial);
    }

    pub fn take_partial(&mut self) -> Option<Partial> {
        let partial = self.pending.as_mut()?.partial.take();
        self.settle();
        partial
    }

    pub fn has_pending(&self) -> bool {
        self.pending.as_ref().is_some_and(|p| !p.replay.is_empty() || !p.lost.is_empty())
    }

    fn pending(&mut self) -> &mut Pending {
        self.pending.get_or_insert_with(Box::default)
    }

    /// Gives back what is no longer owed (a replay's buffer keeps its room otherwise).
    fn settle(&mut self) {
        if self.pending.as_ref().is_some_and(|p| p.is_empty()) {
            self.pending = None;
        }
    }

    /// The next replayed message or notice, then the next `gap` notice.
    pub fn pop_pending(&mut self, transport: Transport) -> Option<Popped> {
        let pending = self.pending.as_deref_mut()?;
        let popped = match pending.replay.pop_front() {
            Some(Replayed::Message(msg)) => {
                let bytes = msg.bytes(transport).clone();
                pending.replay_bytes -= bytes.len();
                if let Some(p) = msg.position {
                    self.advance(p);
                }
                Popped { replayed: true, ..self.popped(transport, bytes, Some(msg)) }
            }
            Some(Replayed::Resumed { json, since_ms }) => {
                self.since_ms = since_ms;
                self.popped(transport, wire::notice(transport, "resumed", &json), None)
            }
            None => {
                let lost = loop {
                    let Some(mut run) = pending.lost.pop() else {
                        self.settle();
                        return None;
                    };
                    let to = run.to;
                    if let Some(from) = run.position.as_mut().filter(|_| run.before_replay) {
                        let written = written_in(&mut self.written, from).map(|w| w.offset);
                        if written.is_some_and(|w| w >= to) {
                            continue;
                        }
                        from.offset = from.offset.max(written.map_or(0, |w| w + 1));
                    }
                    break run;
                };
                let json = match lost.position {
                    Some(from) => serde_json::json!({
                        "type": "gap",
                        "stream": from.key.to_string(),
                        "epoch": epoch_text(from.epoch),
                        "from": from.offset,
                        "to": lost.to,
                    }),
                    None => serde_json::json!({ "type": "gap", "count": lost.count }),
                };
                self.popped(transport, wire::notice(transport, "gap", &json.to_string()), None)
            }
        };
        self.settle();
        Some(popped)
    }

    /// `bytes` with, for SSE, the cursor as it stands after them.
    pub fn popped(&self, transport: Transport, bytes: Bytes, message: Option<Arc<Message>>) -> Popped {
        let tail = (transport == Transport::Sse).then(|| sse::tail(&self.cursor()));
        Popped { bytes, tail, message, queued: false, replayed: false }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn positioned(offset: u64) -> Arc<Message> {
        let position = Position { key: StreamKey::Broadcast, epoch: 5, offset };
        Arc::new(Message::new(offset, None, "1", Some(position), Instant::now()))
    }

    fn replay_of(offsets: std::ops::RangeInclusive<u64>) -> Tracking {
        let replay: VecDeque<Replayed> = offsets.map(|i| Replayed::Message(positioned(i))).collect();
        let bytes = replay.iter().map(|r| if let Replayed::Message(m) = r { m.bytes(Transport::WebSocket).len() } else { 0 }).sum();
        Tracking::resumed(0, Vec::new(), replay, bytes)
    }

    fn popped_text(tracking: &mut Tracking) -> Vec<String> {
        std::iter::from_fn(|| tracking.pop_pending(Transport::WebSocket)).map(|p| String::from_utf8_lossy(crate::wire::ws::payload_of(&p.bytes)).into_owned()).collect()
    }

    /// Live messages drop-oldest discarded while a resume read history, or while its
    /// replay was being written, are told lost only past what the replay wrote: the
    /// history held them (a cluster failover test saw `gap 1..3` after offset 67).
    #[test]
    fn a_loss_the_replay_made_good_is_not_told() {
        let mut earlier = Tracking::new(0);
        for i in [1, 2, 3, 6, 7] {
            earlier.lose(&positioned(i));
        }
        let mut tracking = replay_of(1..=5);
        tracking.inherit(earlier);
        tracking.lose(&positioned(4));
        let written = popped_text(&mut tracking);
        assert_eq!(written.len(), 6, "{written:?}");
        let gap: serde_json::Value = serde_json::from_str(&written[5]).unwrap();
        assert_eq!(gap, serde_json::json!({"type": "gap", "stream": "b", "epoch": "00000005", "from": 6, "to": 7}));

        let mut earlier = Tracking::new(0);
        earlier.lose(&positioned(2));
        let mut tracking = replay_of(1..=5);
        tracking.inherit(earlier);
        assert_eq!(popped_text(&mut tracking).len(), 5, "no gap: the replay wrote offset 2");
        assert!(tracking.pending.is_none());
    }

    /// Once a replay is written, what it needed is given back: a resumed connection keeps
    /// its positions, one per stream, and nothing of the replay.
    #[test]
    fn a_written_replay_is_given_back_and_the_cursor_keeps_one_place_per_stream() {
        let replay: VecDeque<Replayed> = (1..=40).map(|i| Replayed::Message(positioned(i))).collect();
        let bytes = replay.iter().map(|r| if let Replayed::Message(m) = r { m.bytes(Transport::Sse).len() } else { 0 }).sum();
        let mut tracking = Tracking::resumed(0, Vec::new(), replay, bytes);
        assert!(tracking.replaying());
        assert_eq!(tracking.replay_left().0, 40);
        for _ in 0..40 {
            assert!(tracking.pop_pending(Transport::Sse).is_some_and(|p| p.replayed));
        }
        assert!(tracking.pop_pending(Transport::Sse).is_none());
        assert!(tracking.pending.is_none(), "the replay's buffer was kept");
        assert_eq!((tracking.written.len(), tracking.written.capacity()), (1, 1));
        assert!(tracking.has(&positioned(40).position.unwrap()));
        // The cursor's record: `since`, the positions, and a pointer for what may be owed.
        assert!(std::mem::size_of::<Tracking>() <= 40, "Tracking is {} bytes", std::mem::size_of::<Tracking>());
    }
}
