//! A client coming back: from its cursor, which streams of its connection to read and
//! from where ([`plan`]); then, once the connection is registered (so that nothing
//! published from now on can be missed), what each stream holds past the client's
//! position, queued for the connection ahead of anything live, and the `resumed` notice
//! that says, per stream, whether the client now has everything.
//!
//! A message that arrives live and was also read from history is written once: the
//! connection skips queued messages at or before the position it has written.

use std::collections::VecDeque;
use std::sync::Arc;

use super::memory::MemoryHistory;
use super::read::{Found, From, Loss};
use super::redis::RedisHistory;
use super::{epoch_text, Cursor, Position, Stream};
use crate::conn::tracking::{Replayed, Tracking};
use crate::conn::Conn;
use crate::error::{Error, Kind};
use crate::telemetry::{Metrics, ResumeOutcome};
use crate::wire::{Message, Transport};

/// Where history is kept.
pub enum History {
    Memory(Arc<MemoryHistory>),
    Redis(Arc<RedisHistory>),
}

impl History {
    pub fn keeps(&self, stream: &Stream) -> bool {
        match self {
            History::Memory(h) => h.settings().keeps(stream),
            History::Redis(h) => h.settings().keeps(stream),
        }
    }

    pub async fn read(&self, plan: &[(Stream, From)]) -> Result<Vec<Found>, Error> {
        match self {
            History::Memory(h) => Ok(plan.iter().map(|(stream, from)| h.read(stream, *from)).collect()),
            History::Redis(h) => h.read(plan).await,
        }
    }
}

/// What a client asked to be given again.
pub struct Request {
    pub cursor: Option<Cursor>,
    /// `?mailbox=1`: its uid stream from the oldest message kept.
    pub mailbox: bool,
}

/// The streams of a connection of `uid` on `topics` to read, and from where; none when
/// the client asked for nothing. A cursor with another uid's stream in it is refused.
pub fn plan(uid: &str, topics: &[String], request: &Request) -> Result<Vec<(Stream, From)>, Error> {
    let own = Stream::Uid(uid.into());
    if let Some(cursor) = &request.cursor {
        let own_key = own.key();
        if cursor.positions.iter().any(|p| matches!(p.key, super::StreamKey::Uid(_)) && p.key != own_key) {
            return Err(Error::bad_request("bad cursor: it holds another uid's stream; a cursor is only good for the uid it was given to"));
        }
    }
    let streams = std::iter::once(own).chain(std::iter::once(Stream::Broadcast)).chain(topics.iter().map(|t| Stream::Topic(t.as_str().into())));
    let mut plan = Vec::new();
    for stream in streams {
        let position = request.cursor.as_ref().and_then(|c| c.position(stream.key()));
        let from = match (position, &stream) {
            (Some(p), _) => From::After(*p),
            (None, Stream::Uid(_)) if request.mailbox => From::Start,
            (None, _) => match request.cursor.as_ref().and_then(|c| c.since_ms) {
                Some(since) => From::Since(since),
                None => continue,
            },
        };
        plan.push((stream, from));
    }
    Ok(plan)
}

/// Reads what `conn` missed and queues it ahead of anything live, ending with the
/// `resumed` notice. `conn` must already be registered.
///
/// A replay is outbound data like any other: it holds at most `max_bytes` (the
/// connection's queue limit), the newest messages of every stream that fit, and the
/// streams whose older messages did not fit are reported lost (`queue_limit`).
pub async fn resume(history: &History, conn: &Conn, request: &Request, plan: Vec<(Stream, From)>, max_bytes: usize, metrics: &Metrics) -> Result<(), Error> {
    let readable: Vec<(Stream, From)> = plan.iter().filter(|(s, _)| history.keeps(s)).cloned().collect();
    let mut read = history.read(&readable).await?.into_iter();
    let mut found = Vec::with_capacity(plan.len());
    for (stream, _) in &plan {
        found.push(if history.keeps(stream) { read.next().ok_or_else(|| Error::new(Kind::Internal, "history read fewer streams than asked"))? } else { Found::not_kept() });
    }
    // Where each stream's history begins, before the queue limit cut the oldest off.
    let kept_from: Vec<Option<Position>> = found.iter().map(|f| f.messages.first().and_then(|m| m.position)).collect();
    let mut replay_bytes = hold_to(&mut found, max_bytes, conn.transport);
    let mut replay = VecDeque::new();
    let mut streams = Vec::new();
    let (mut recovered, mut replayed) = (true, 0);
    let cursor = request.cursor.as_ref();
    let mut positions = Vec::new();
    for (((stream, from), found), kept_from) in plan.iter().zip(found).zip(kept_from) {
        let mut entry = serde_json::json!({ "stream": stream.key().to_string(), "replayed": found.messages.len(), "recovered": found.loss.is_none() });
        if let Some(tail) = found.tail {
            entry["epoch"] = epoch_text(tail.epoch).into();
            entry["offset"] = tail.offset.into();
        }
        if let Some(loss) = found.loss {
            recovered = false;
            entry["reason"] = <&str>::from(loss).into();
            if let From::After(p) = from {
                entry["lost_after"] = serde_json::json!({ "epoch": epoch_text(p.epoch), "offset": p.offset });
            }
        }
        // Where the client stands in this stream from now on. A cursor ahead of the stream
        // names offsets the stream has not reached: the client stands at the stream's top,
        // or every message up to the cursor's offset would be taken for one it has.
        let held = cursor.and_then(|c| c.position(stream.key())).copied();
        let stands = match found.loss {
            Some(Loss::CursorAhead) => found.tail,
            _ => held,
        };
        positions.extend(stands);
        replayed += found.messages.len();
        for gap in found.loss.map(|loss| gaps_before(stream, from, loss, kept_from, &found.messages, found.tail)).unwrap_or_default() {
            replay_bytes += gap.bytes(conn.transport).len();
            replay.push_back(Replayed::Message(gap));
        }
        replay.extend(found.messages.into_iter().map(Replayed::Message));
        streams.push(entry);
    }
    let since_ms = conn.since_ms();
    let notice = serde_json::json!({
        "type": "resumed",
        "recovered": recovered,
        "since": since_ms.to_string(),
        "streams": streams,
    });
    replay.push_back(Replayed::Resumed { json: notice.to_string(), since_ms });
    let client_since = cursor.and_then(|c| c.since_ms).unwrap_or(since_ms);
    conn.resume(Tracking::resumed(client_since, positions, replay, replay_bytes), metrics);
    metrics.resumed(if recovered { ResumeOutcome::Recovered } else { ResumeOutcome::NotRecovered }, replayed);
    Ok(())
}

/// The `gap` notices written before a stream's replay that skips messages the client
/// never had: the first replayed message moves the client's cursor past them, so a
/// connection that drops before its `resumed` would otherwise leave the client with a gap
/// it was never told of. What history no longer holds is told `trimmed`, and what it
/// holds but the queue limit cut `queue_limit` (a later resume may still give those), each
/// with its range; a replaced epoch `epoch_changed`, from the client's old position, then
/// the new epoch's own ranges. When the queue limit cut all of a stream, the ranges run to
/// its last offset (`tail`).
fn gaps_before(stream: &Stream, from: &From, loss: Loss, kept_from: Option<Position>, replayed: &[Arc<Message>], tail: Option<Position>) -> Vec<Arc<Message>> {
    let key = stream.key().to_string();
    let gap = |mut fields: serde_json::Value, reason: Loss| {
        fields["type"] = "gap".into();
        fields["stream"] = key.as_str().into();
        fields["reason"] = <&str>::from(reason).into();
        Arc::new(Message::from_envelope(0, &fields.to_string(), None, std::time::Instant::now()))
    };
    let mut gaps = Vec::new();
    if let (Loss::EpochChanged, From::After(p)) = (loss, from) {
        gaps.push(gap(serde_json::json!({ "epoch": epoch_text(p.epoch), "from": p.offset + 1 }), loss));
    }
    // Where the replay starts: its first message, else just past the stream's last.
    let next = replayed.first().and_then(|m| m.position).or_else(|| tail.map(|t| Position { offset: t.offset + 1, ..t }));
    let Some(next) = next else { return gaps };
    let range = |from: u64, to: u64, reason| (from <= to).then(|| gap(serde_json::json!({ "epoch": epoch_text(next.epoch), "from": from, "to": to }), reason));
    // The client's last offset in the replayed epoch (none before the first: a mailbox,
    // or an epoch it never saw).
    let held = match (loss, from) {
        (Loss::EpochChanged, From::After(_)) => 0,
        (Loss::Trimmed | Loss::QueueLimit, From::After(p)) if p.epoch == next.epoch => p.offset,
        (Loss::Trimmed | Loss::QueueLimit, From::Start) => 0,
        (Loss::Trimmed | Loss::QueueLimit, From::Since(_)) => return vec![gap(serde_json::json!({}), loss)],
        _ => return Vec::new(),
    };
    let kept = kept_from.filter(|k| k.epoch == next.epoch).map_or(next.offset, |k| k.offset);
    gaps.extend([range(held + 1, kept - 1, Loss::Trimmed), range(kept, next.offset - 1, Loss::QueueLimit)].into_iter().flatten());
    gaps
}

/// Drops the oldest messages of `found`, across its streams, until what is left takes at
/// most `max_bytes` on `transport`; a stream that lost any is marked so. Returns the bytes
/// left.
fn hold_to(found: &mut [Found], max_bytes: usize, transport: Transport) -> usize {
    let size = |m: &Arc<Message>| m.bytes(transport).len();
    let mut total: usize = found.iter().flat_map(|f| f.messages.iter()).map(size).sum();
    if total <= max_bytes {
        return total;
    }
    let mut firsts = vec![0usize; found.len()];
    while total > max_bytes {
        // The stream whose oldest remaining message is oldest (ids grow with time).
        let Some(oldest) = (0..found.len()).filter(|i| firsts[*i] < found[*i].messages.len()).min_by_key(|i| found[*i].messages[firsts[*i]].id) else {
            break;
        };
        total -= size(&found[oldest].messages[firsts[oldest]]);
        firsts[oldest] += 1;
    }
    for (f, first) in found.iter_mut().zip(firsts) {
        if first > 0 {
            f.messages.drain(..first);
            f.loss.get_or_insert(Loss::QueueLimit);
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{Position, StreamKey};

    #[test]
    fn a_plan_reads_positions_since_and_mailbox() {
        let topics = vec!["news".to_string()];
        let mine = Stream::Uid("alice".into()).key();
        let cursor = Cursor { since_ms: Some(1000), positions: vec![Position { key: mine, epoch: 1, offset: 4 }] };
        let resumed = plan("alice", &topics, &Request { cursor: Some(cursor), mailbox: false }).unwrap();
        assert_eq!(resumed[0].1, From::After(Position { key: mine, epoch: 1, offset: 4 }));
        assert_eq!(resumed[1], (Stream::Broadcast, From::Since(1000)));
        assert_eq!(resumed[2], (Stream::Topic("news".into()), From::Since(1000)));

        let mailbox = plan("alice", &topics, &Request { cursor: None, mailbox: true }).unwrap();
        assert_eq!(mailbox, vec![(Stream::Uid("alice".into()), From::Start)]);
    }

    /// The gap notices' fields, in order.
    fn told(gaps: &[Arc<Message>]) -> Vec<serde_json::Value> {
        gaps.iter().map(|g| serde_json::from_slice(g.envelope()).unwrap()).collect()
    }

    #[test]
    fn a_new_epoch_cut_by_the_queue_is_told_after_the_old_epochs_gap() {
        let stream = Stream::Uid("alice".into());
        let at = |epoch, offset| Position { key: stream.key(), epoch, offset };
        let replayed = [Arc::new(Message::new(9, None, "1", Some(at(2, 9)), std::time::Instant::now()))];
        let gaps = gaps_before(&stream, &From::After(at(1, 30)), Loss::EpochChanged, Some(at(2, 1)), &replayed, Some(at(2, 9)));
        let told = told(&gaps);
        assert_eq!(told.len(), 2, "{told:?}");
        assert_eq!((told[0]["reason"].as_str(), told[0]["epoch"].as_str(), told[0]["from"].as_u64()), (Some("epoch_changed"), Some(epoch_text(1).as_str()), Some(31)));
        assert_eq!((told[1]["reason"].as_str(), told[1]["epoch"].as_str()), (Some("queue_limit"), Some(epoch_text(2).as_str())));
        assert_eq!((told[1]["from"].as_u64(), told[1]["to"].as_u64()), (Some(1), Some(8)));
    }

    #[test]
    fn a_stream_the_queue_cut_whole_is_told_up_to_its_last_offset() {
        let stream = Stream::Topic("news".into());
        let at = |offset| Position { key: stream.key(), epoch: 7, offset };
        let gaps = gaps_before(&stream, &From::After(at(3)), Loss::QueueLimit, Some(at(5)), &[], Some(at(20)));
        let told = told(&gaps);
        assert_eq!(told.len(), 2, "{told:?}");
        assert_eq!((told[0]["reason"].as_str(), told[0]["from"].as_u64(), told[0]["to"].as_u64()), (Some("trimmed"), Some(4), Some(4)));
        assert_eq!((told[1]["reason"].as_str(), told[1]["from"].as_u64(), told[1]["to"].as_u64()), (Some("queue_limit"), Some(5), Some(20)));
        // An epoch change with nothing kept of the new epoch: the old epoch's gap alone.
        let gaps = gaps_before(&stream, &From::After(at(3)), Loss::EpochChanged, None, &[], None);
        assert_eq!(told_reasons(&gaps), ["epoch_changed"]);
    }

    fn told_reasons(gaps: &[Arc<Message>]) -> Vec<String> {
        told(gaps).iter().map(|g| g["reason"].as_str().unwrap_or_default().to_owned()).collect()
    }

    #[test]
    fn another_uids_cursor_is_refused() {
        let theirs = Stream::Uid("mallory".into()).key();
        assert!(matches!(theirs, StreamKey::Uid(_)));
        let cursor = Cursor { since_ms: None, positions: vec![Position { key: theirs, epoch: 1, offset: 4 }] };
        let error = plan("alice", &[], &Request { cursor: Some(cursor), mailbox: false }).unwrap_err();
        assert!(error.message.contains("another uid"), "{}", error.message);
    }
}
