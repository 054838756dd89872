//! What a client missed: every message belongs to a stream (a uid's, a topic's, or the
//! broadcast stream) that numbers its messages with a contiguous offset under an epoch, an
//! id that changes whenever the stream's history is lost. A client that saw offset 41 and
//! is next handed 43 knows it missed one; a client that comes back with its [`Cursor`]
//! is given what it missed, or told plainly that it cannot be.
//!
//! History is kept in this process for the memory registry ([`memory`]) and in Redis
//! Streams for the Redis registries ([`redis`]); [`resume`] reads either when a client
//! reconnects with a cursor. An idle connection pays nothing for any of it: positions
//! are carried by messages, and a connection only tracks them once it has resumed, or
//! (SSE) once it has been sent one.

pub mod cursor;
pub mod idempotency;
pub mod memory;
pub mod redis;
pub mod resume;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::auth::rights::Rights;

pub use cursor::Cursor;

/// Which stream a message belongs to, by name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Stream {
    /// Pushes to one uid: its offline mailbox too.
    Uid(Arc<str>),
    Topic(Arc<str>),
    Broadcast,
}

/// A stream as cursors and envelopes name it: short, and the same on every node. A uid
/// stream's key hashes the uid, so a cursor carried to another uid's connection is
/// recognised as foreign.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StreamKey {
    Uid(u32),
    Topic(u64),
    Broadcast,
}

/// Where a message sits in its stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    pub key: StreamKey,
    pub epoch: u32,
    /// 1 for the first message of an epoch.
    pub offset: u64,
}

/// A stable hash: every node and every restart must name a stream the same way.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ *b as u64).wrapping_mul(0x100_0000_01b3))
}

impl Stream {
    pub fn key(&self) -> StreamKey {
        match self {
            Stream::Uid(uid) => StreamKey::Uid(fnv1a(uid.as_bytes()) as u32),
            Stream::Topic(topic) => StreamKey::Topic(fnv1a(topic.as_bytes())),
            Stream::Broadcast => StreamKey::Broadcast,
        }
    }

    /// The stream's group, 0 to `GROUPS - 1`: on Redis, the hash slot its keys and its
    /// channels share.
    pub fn group(&self) -> u64 {
        match self {
            Stream::Uid(name) | Stream::Topic(name) => fnv1a(name.as_bytes()) % GROUPS,
            Stream::Broadcast => 0,
        }
    }
}

/// Streams are spread over this many groups; on Redis each group is one hash slot that
/// holds its streams' keys and the channels their messages travel on, so that appending
/// to a stream and publishing its message is one script on one shard.
pub const GROUPS: u64 = 16;

impl fmt::Display for StreamKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamKey::Uid(hash) => write!(f, "u.{hash:08x}"),
            StreamKey::Topic(hash) => write!(f, "t.{hash:016x}"),
            StreamKey::Broadcast => f.write_str("b"),
        }
    }
}

impl StreamKey {
    pub fn parse(text: &str) -> Option<StreamKey> {
        match text.split_once('.') {
            None if text == "b" => Some(StreamKey::Broadcast),
            Some(("u", hex)) if hex.len() == 8 => u32::from_str_radix(hex, 16).ok().map(StreamKey::Uid),
            Some(("t", hex)) if hex.len() == 16 => u64::from_str_radix(hex, 16).ok().map(StreamKey::Topic),
            _ => None,
        }
    }
}

/// An epoch as envelopes and cursors write it.
pub fn epoch_text(epoch: u32) -> String {
    format!("{epoch:08x}")
}

pub fn parse_epoch(text: &str) -> Option<u32> {
    (text.len() == 8).then(|| u32::from_str_radix(text, 16).ok()).flatten()
}

/// A fresh epoch: random, so that a stream recreated anywhere (another node, a restarted
/// process, a flushed Redis) never reuses one a client may hold.
pub fn new_epoch() -> u32 {
    let mut bytes = [0u8; 4];
    if getrandom::fill(&mut bytes).is_err() {
        // No entropy source: the clock still makes a repeat unlikely.
        return (crate::auth::now_ms() as u32).wrapping_mul(2_654_435_761);
    }
    u32::from_ne_bytes(bytes)
}

/// How much history is kept, and where none is.
#[derive(Clone)]
pub struct Settings {
    /// Most messages kept per stream; 0 keeps none (history off).
    pub size: usize,
    /// A message is kept this long; a stream nobody listens to is forgotten after it.
    pub ttl: Duration,
    /// Bytes of history this node keeps in memory (memory registry), across streams.
    pub max_bytes: usize,
    /// Topics whose messages are never kept (`typing.*`).
    pub off: Rights,
    /// How long an idempotency key is remembered.
    pub idempotency_window: Duration,
}

impl Settings {
    /// Whether messages of `stream` are numbered and kept.
    pub fn keeps(&self, stream: &Stream) -> bool {
        self.size > 0
            && match stream {
                Stream::Topic(topic) => !self.off.allows(topic),
                _ => true,
            }
    }
}

/// Clock skew between nodes allowed for when a cursor's `since` time is compared with
/// message ids minted on other nodes: a stream with no position in the cursor is
/// replayed from this much before `since`. What that adds are messages the client was
/// never sent (it holds no position in that stream), never duplicates.
pub const SINCE_MARGIN_MS: u64 = 5_000;

/// The wall-clock millisecond a message id was minted in.
pub fn id_time_ms(id: u64) -> u64 {
    id >> 22
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_keys_round_trip_as_text() {
        for stream in [Stream::Uid("alice".into()), Stream::Topic("news".into()), Stream::Broadcast] {
            let key = stream.key();
            assert_eq!(StreamKey::parse(&key.to_string()), Some(key));
        }
        assert_eq!(StreamKey::parse("u.123"), None);
        assert_eq!(StreamKey::parse("x.12345678"), None);
        assert_eq!(parse_epoch(&epoch_text(0xdead_beef)), Some(0xdead_beef));
    }
}
