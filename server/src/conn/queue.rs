//! One connection's bounded outbound queue and the policy for when it is full.
//!
//! The queue holds `Arc<Message>`s (8 bytes each): the framed bytes are shared with every
//! other connection that got the same message. An empty queue allocates nothing.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::config::SlowConsumer;
use crate::wire::{Message, Transport};

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

#[derive(Default)]
pub struct Outbox {
    queue: VecDeque<Arc<Message>>,
    bytes: usize,
    /// When drop-oldest first had to drop for a queue that has not been read from since,
    /// in seconds of the process clock plus one (0: not full). Seconds in a u32 fit the
    /// padding beside `closed`, so this costs an idle connection nothing.
    full_since_s: u32,
    closed: bool,
}

impl Outbox {
    pub fn push(&mut self, msg: &Arc<Message>, transport: Transport, limits: &Limits) -> Enqueued {
        if self.closed {
            return Enqueued::Closed;
        }
        let size = msg.bytes(transport).len();
        let full = |q: &Outbox| q.queue.len() >= limits.max_messages || q.bytes + size > limits.max_bytes;
        if full(self) {
            match limits.policy {
                SlowConsumer::Disconnect => {
                    let (dropped, dropped_bytes) = (self.queue.len(), self.bytes);
                    self.close();
                    return Enqueued::Overflow { dropped: dropped + 1, dropped_bytes: dropped_bytes + size };
                }
                SlowConsumer::DropOldest => {
                    let (mut dropped, mut dropped_bytes) = (0, 0);
                    while full(self) {
                        let Some(old) = self.queue.pop_front() else { break };
                        let old_size = old.bytes(transport).len();
                        self.bytes -= old_size;
                        dropped += 1;
                        dropped_bytes += old_size;
                    }
                    self.queue.push_back(msg.clone());
                    self.bytes += size;
                    if self.full_since_s == 0 {
                        self.full_since_s = (crate::clock::now_ms() / 1000) as u32 + 1;
                    }
                    return Enqueued::Queued { dropped, dropped_bytes, depth: self.queue.len() };
                }
            }
        }
        self.queue.push_back(msg.clone());
        self.bytes += size;
        Enqueued::Queued { dropped: 0, dropped_bytes: 0, depth: self.queue.len() }
    }

    pub fn pop(&mut self, transport: Transport) -> Option<Arc<Message>> {
        let msg = self.queue.pop_front()?;
        self.full_since_s = 0;
        self.bytes -= msg.bytes(transport).len();
        if self.queue.is_empty() {
            // Give back a burst's worth of slots; an idle connection holds no queue memory.
            self.queue = VecDeque::new();
        }
        Some(msg)
    }

    /// Stops taking messages; returns how many were still queued (and their bytes).
    pub fn close(&mut self) -> (usize, usize) {
        self.closed = true;
        let left = (self.queue.len(), self.bytes);
        self.queue = VecDeque::new();
        self.bytes = 0;
        left
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Milliseconds (of the process clock) since the queue became full without being
    /// read from; None when it is not full.
    pub fn full_since_ms(&self) -> Option<u64> {
        (self.full_since_s > 0).then(|| (self.full_since_s as u64 - 1) * 1000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn msg(id: u64) -> Arc<Message> {
        Arc::new(Message::new(id, None, "1", Instant::now()))
    }

    #[test]
    fn drop_oldest_keeps_newest() {
        let limits = Limits { max_messages: 2, max_bytes: 1 << 20, policy: SlowConsumer::DropOldest };
        let mut q = Outbox::default();
        for id in 1..=3 {
            q.push(&msg(id), Transport::WebSocket, &limits);
        }
        assert_eq!(q.len(), 2);
        assert!(q.full_since_ms().is_some(), "a drop marks the queue full");
        assert_eq!(q.pop(Transport::WebSocket).unwrap().id, 2);
        assert_eq!(q.full_since_ms(), None, "a read clears it");
        assert_eq!(q.pop(Transport::WebSocket).unwrap().id, 3);
        assert_eq!(q.bytes(), 0);
    }

    #[test]
    fn disconnect_policy_overflows_and_closes() {
        let limits = Limits { max_messages: 2, max_bytes: 1 << 20, policy: SlowConsumer::Disconnect };
        let mut q = Outbox::default();
        q.push(&msg(1), Transport::WebSocket, &limits);
        q.push(&msg(2), Transport::WebSocket, &limits);
        assert!(matches!(q.push(&msg(3), Transport::WebSocket, &limits), Enqueued::Overflow { dropped: 3, .. }));
        assert_eq!(q.push(&msg(4), Transport::WebSocket, &limits), Enqueued::Closed);
        assert!(q.is_empty());
    }

    #[test]
    fn byte_budget_is_honoured() {
        let one = msg(11).bytes(Transport::WebSocket).len();
        let limits = Limits { max_messages: 100, max_bytes: one * 3, policy: SlowConsumer::DropOldest };
        let mut q = Outbox::default();
        for id in 11..=20 {
            q.push(&msg(id), Transport::WebSocket, &limits);
            assert!(q.bytes() <= one * 3);
        }
        assert_eq!(q.len(), 3);
    }
}
