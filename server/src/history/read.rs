//! What a stream holds for a client, whichever store keeps it: where to read from, what
//! is found, and what cannot be found any more.

use std::sync::Arc;
use std::time::Duration;

use strum::IntoStaticStr;

use super::{id_time_ms, Position, SINCE_MARGIN_MS};
use crate::wire::Message;

/// Where to read a stream from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum From {
    /// Past the client's position.
    After(Position),
    /// Messages minted from this wall-clock ms (less the skew margin): a stream the
    /// client holds no position in.
    Since(u64),
    /// Everything kept: the offline mailbox, asked for with `?mailbox=1`.
    Start,
}

impl From {
    /// A `since` no server wrote (later than now, past clock skew): like a position ahead,
    /// reading from it would skip what the stream holds and call that recovered.
    fn since_ahead(self) -> bool {
        matches!(self, From::Since(since) if since > crate::clock::wall_ms() + SINCE_MARGIN_MS)
    }
}

/// Why a stream could not be resumed from the client's position.
#[derive(Clone, Copy, Debug, PartialEq, Eq, IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub enum Loss {
    /// The stream's history was lost and started again (restart, eviction, Redis flushed).
    EpochChanged,
    /// Messages after the client's position are no longer kept (`--history-size`, `--history-ttl`).
    Trimmed,
    /// Nothing is kept for the stream, so nothing can be said of what the client missed.
    Unknown,
    /// The cursor claims messages the stream has not had, or a `since` still to come: not
    /// a cursor this server wrote.
    CursorAhead,
    /// The stream keeps no history (`--history-size 0`, `--history-off`).
    NotKept,
    /// More was missed than the connection's queue may hold (`--queue-max-bytes`): the
    /// newest messages were replayed, the older ones not.
    QueueLimit,
}

/// What a stream holds for a client.
pub struct Found {
    pub messages: Vec<Arc<Message>>,
    /// The stream's last position; None when it holds nothing.
    pub tail: Option<Position>,
    /// Set when the client's position could not be resumed: then `messages` is all that
    /// is kept, and the client is told what it lost.
    pub loss: Option<Loss>,
}

impl Found {
    /// A stream with no history at all: unremarkable for a client that held no position
    /// in it, unless its `since` goes back before what this history can vouch for
    /// (`known_since_ms`, or the TTL).
    pub fn unknown(from: From, known_since_ms: u64, ttl: Duration) -> Found {
        let vouched_from = known_since_ms.max(crate::clock::wall_ms().saturating_sub(ttl.as_millis() as u64));
        let loss = match from {
            From::After(_) => Some(Loss::Unknown),
            _ if from.since_ahead() => Some(Loss::CursorAhead),
            From::Since(since) if since < vouched_from => Some(Loss::Unknown),
            From::Since(_) | From::Start => None,
        };
        Found { messages: Vec::new(), tail: None, loss }
    }

    pub fn not_kept() -> Found {
        Found { messages: Vec::new(), tail: None, loss: Some(Loss::NotKept) }
    }
}

/// What a stream whose last position is `tail` and which keeps `kept` (oldest first)
/// holds past `from`. When the client's position cannot be resumed (epoch changed,
/// trimmed), everything kept is returned with the loss, so that the client's position
/// is well defined again after it.
pub fn select(from: From, tail: Position, kept: &[Arc<Message>], ttl: Duration) -> Found {
    let first = kept.first().and_then(|m| m.position).map_or(tail.offset + 1, |p| p.offset);
    let all = |loss| Found { messages: kept.to_vec(), tail: Some(tail), loss: Some(loss) };
    let skip = match from {
        From::After(p) if p.epoch != tail.epoch => return all(Loss::EpochChanged),
        From::After(p) if p.offset > tail.offset => return Found { messages: Vec::new(), tail: Some(tail), loss: Some(Loss::CursorAhead) },
        From::After(p) if p.offset + 1 < first => return all(Loss::Trimmed),
        From::After(p) => (p.offset + 1 - first) as usize,
        _ if from.since_ahead() => return Found { messages: Vec::new(), tail: Some(tail), loss: Some(Loss::CursorAhead) },
        From::Since(since_ms) => {
            let from_ms = since_ms.saturating_sub(SINCE_MARGIN_MS);
            // Messages before the oldest kept may have come after `since`, unless they
            // aged out (then they are older than the TTL, and so is `since`).
            let aged_out_before_ms = crate::clock::wall_ms().saturating_sub(ttl.as_millis() as u64);
            let lost = first > 1 && kept.first().map_or(from_ms < aged_out_before_ms, |oldest| id_time_ms(oldest.id) >= from_ms);
            if lost {
                return all(Loss::Trimmed);
            }
            kept.iter().take_while(|m| id_time_ms(m.id) < from_ms).count()
        }
        // The mailbox: pushes stored and since trimmed are lost to it too.
        From::Start if first > 1 => return all(Loss::Trimmed),
        From::Start => 0,
    };
    Found { messages: kept.iter().skip(skip).cloned().collect(), tail: Some(tail), loss: None }
}

