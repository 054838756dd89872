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

pub mod idempotency;
pub mod memory;
pub mod read;
pub mod redis;
pub mod resume;

use std::sync::Arc;
use std::time::Duration;

use crate::rights::Rights;

pub use crate::wire::cursor::{epoch_text, parse_epoch, Cursor, Position, StreamKey};

/// Which stream a message belongs to, by name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Stream {
    /// Pushes to one uid: its offline mailbox too.
    Uid(Arc<str>),
    Topic(Arc<str>),
    Broadcast,
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

/// A fresh epoch: random, so that a stream recreated anywhere (another node, a restarted
/// process, a flushed Redis) never reuses one a client may hold. From a per-thread
/// generator seeded from the OS once: every append on Redis offers the script two, and a
/// `getrandom` call each was two system calls per push.
pub fn new_epoch() -> u32 {
    fastrand::u32(..)
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
    /// Of those, the most one API key's streams may hold; 0: no per-key share.
    pub max_bytes_per_publisher: usize,
    /// Topics whose messages are never kept (`typing.*`).
    pub off: Rights,
    /// How long an idempotency key is remembered.
    pub idempotency_window: Duration,
    /// Redis replicas a publish's write must reach before it is answered 200 (0: none).
    pub min_replicas: usize,
    /// How long a publish waits for them.
    pub replica_timeout: Duration,
}

impl Settings {
    pub fn from_config(config: &crate::config::Config) -> Settings {
        Settings {
            size: config.history_size,
            ttl: config.history_ttl,
            max_bytes: config.history_max_bytes,
            max_bytes_per_publisher: config.history_max_bytes_per_key,
            // Checked by `Config::problems`.
            off: Rights::parse(&config.history_off, "").unwrap_or_default(),
            idempotency_window: config.idempotency_window,
            min_replicas: config.history_min_replicas,
            replica_timeout: config.history_replica_timeout,
        }
    }

    /// Whether messages of `stream` are numbered and kept.
    /// Whether `stream` keeps history. `--history-off` names a Pusher channel by its name
    /// (`cache-scores`, `cache-*`), as the application knows it, or by its topic.
    pub fn keeps(&self, stream: &Stream) -> bool {
        self.size > 0
            && match stream {
                Stream::Topic(topic) => {
                    let channel = crate::pusher::app_and_channel(topic).map(|(_, channel)| channel);
                    !self.off.allows(topic) && !channel.is_some_and(|channel| self.off.allows(channel))
                }
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
    }

    #[test]
    fn history_off_names_a_pusher_channel_by_its_name_or_its_topic() {
        let mut config = crate::config::Config::for_loopback();
        config.history_off = vec!["cache-off*".into(), "typing.*".into(), "pusher:7:cache-x".into()];
        let settings = Settings::from_config(&config);
        let keeps = |topic: &str| settings.keeps(&Stream::Topic(topic.into()));
        assert!(!keeps("pusher:1:cache-off-scores"), "by its name, in any app");
        assert!(!keeps("pusher:7:cache-x"), "by its topic");
        assert!(keeps("pusher:8:cache-x"), "a topic names one app's channel");
        assert!(!keeps("typing.alice"));
        assert!(keeps("pusher:1:cache-scores"));
        assert!(keeps("news"));
    }
}
