//! Session ids and message ids: 64-bit numbers that say which node made them.
//!
//! A session id is `node_id << 48 | counter` (the talk's server id + worker id + counter),
//! so any node can tell which node holds a session without asking anyone.
//! A message id is `milliseconds << 22 | sequence << 10 | node_id`: unique across nodes,
//! increasing on each node, and ordered by time across nodes.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

const NODE_BITS: u32 = 16;
const COUNTER_BITS: u32 = 64 - NODE_BITS;
const COUNTER_MASK: u64 = (1 << COUNTER_BITS) - 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

impl SessionId {
    pub fn node(self) -> u16 {
        (self.0 >> COUNTER_BITS) as u16
    }

    /// The id with this node and counter, if they fit.
    pub fn from_parts(node: u16, counter: u64) -> Option<SessionId> {
        let id = SessionId(((node as u64) << COUNTER_BITS) | counter);
        (counter <= COUNTER_MASK && id.node() == node).then_some(id)
    }

    pub fn counter(self) -> u64 {
        self.0 & COUNTER_MASK
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Hands out this node's session ids.
pub struct SessionIds {
    node: u16,
    next: AtomicU64,
}

impl SessionIds {
    /// Counting from a random start below 2^36: a run's ids are not the last run's, so a
    /// Pusher channel authorization, which signs a socket id, is not good again after a
    /// restart.
    pub fn new(node: u16) -> Self {
        let mut seed = [0u8; 8];
        let start = match getrandom::fill(&mut seed) {
            Ok(()) => u64::from_le_bytes(seed) & ((1 << 36) - 1),
            Err(_) => crate::clock::wall_ms() & ((1 << 36) - 1),
        };
        SessionIds { node, next: AtomicU64::new(start.max(1)) }
    }

    pub fn next(&self) -> SessionId {
        let counter = self.next.fetch_add(1, Ordering::Relaxed) & COUNTER_MASK;
        SessionId((self.node as u64) << COUNTER_BITS | counter)
    }
}

const MSG_NODE_BITS: u32 = 10;
const MSG_SEQ_SHIFT: u32 = MSG_NODE_BITS;
const MSG_TIME_SHIFT: u32 = 22;

/// Hands out this node's message ids; never repeats and never goes backwards, even if
/// the wall clock does.
pub struct MessageIds {
    node: u64,
    last: AtomicU64,
}

impl MessageIds {
    pub fn new(node: u16) -> Self {
        assert!(node < 1 << MSG_NODE_BITS, "node id must fit in {MSG_NODE_BITS} bits");
        MessageIds { node: node as u64, last: AtomicU64::new(0) }
    }

    pub fn next(&self) -> u64 {
        let millis = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let from_clock = millis << MSG_TIME_SHIFT;
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            // Time and sequence share the upper bits: bumping past the previous id carries
            // from the sequence into the milliseconds when a millisecond is full.
            let next = from_clock.max(((last >> MSG_SEQ_SHIFT) + 1) << MSG_SEQ_SHIFT) | self.node;
            match self.last.compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return next,
                Err(seen) => last = seen,
            }
        }
    }

    pub fn node_of(id: u64) -> u16 {
        (id & ((1 << MSG_NODE_BITS) - 1)) as u16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_id_carries_its_node() {
        let ids = SessionIds::new(513);
        let a = ids.next();
        let b = ids.next();
        assert_eq!(a.node(), 513);
        assert_eq!(b.counter(), a.counter() + 1);
    }

    #[test]
    fn message_ids_increase_and_carry_node() {
        let ids = MessageIds::new(7);
        let mut prev = 0;
        for _ in 0..100_000 {
            let id = ids.next();
            assert!(id > prev, "{id} after {prev}");
            assert_eq!(MessageIds::node_of(id), 7);
            prev = id;
        }
    }
}
