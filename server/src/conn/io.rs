//! A connection's own side: its socket and where reading and writing it stand. It lives
//! in the connection's [`Conn`](super::Conn), owned by the driver of the core the
//! connection lives on (`client::driver`), so an idle connection is this record and
//! nothing else: no task, no reactor registration, no buffer.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::Bytes;

use crate::socket::RawSocket;
use crate::wire::ws;

pub struct Io {
    pub socket: RawSocket,
    pub window: Window,
    /// What the connection is partway through; None (unallocated) while idle.
    pub busy: Option<Box<Busy>>,
    /// The socket may have bytes to read: an edge was seen and no read since said
    /// WouldBlock (the driver's epoll set is edge-triggered).
    pub readable: bool,
    /// The client's end is closed (an edge said so): read to the end, since no further
    /// edge will come for the end-of-file behind the last bytes.
    pub peer_closed: bool,
    /// `busy.partial` holds frames held back: handle them once replies drain.
    pub held_back: bool,
    /// The socket is lent to publishers (nothing was owed when last flushed).
    pub lent: bool,
}

/// A client's recent commands, against its per-connection limits.
#[derive(Default)]
pub struct Window {
    /// Low bits of the process clock's second and minute these counts are for.
    pub second: u16,
    pub commands: u16,
    /// Publishes this second.
    pub publishes: u16,
    pub minute: u16,
    pub topic_changes: u16,
}

/// What a connection with work in hand holds between wake-ups.
#[derive(Default)]
pub struct Busy {
    /// Inbound bytes not yet handled: a frame not yet complete, or frames held back while
    /// replies are backed up.
    pub partial: Box<[u8]>,
    /// Replies (pongs, acks, errors) written before queued messages.
    pub replies: VecDeque<Bytes>,
    pub writing: Option<Writing>,
    /// Holds a message arriving in fragments.
    pub decoder: ws::Decoder,
}

impl Busy {
    fn is_empty(&self) -> bool {
        self.partial.is_empty() && self.replies.is_empty() && self.writing.is_none() && self.decoder.is_idle()
    }
}

/// A frame partly written to the socket.
pub struct Writing {
    pub bytes: Bytes,
    pub written: usize,
    /// Set for published messages, whose delivery is counted and timed.
    pub accepted_at: Option<Instant>,
}

impl Io {
    /// A connection's record as its handshake leaves it: `unsent`, what of its answer and
    /// welcome the socket did not take, to write first, and `early`, bytes the client sent
    /// right after its handshake, to handle. With neither, it starts idle.
    pub fn new(socket: RawSocket, unsent: Option<Writing>, early: Vec<u8>) -> Io {
        let busy = (unsent.is_some() || !early.is_empty()).then(|| {
            Box::new(Busy { partial: early.into_boxed_slice(), replies: VecDeque::new(), writing: unsent, decoder: ws::Decoder::new() })
        });
        Io {
            socket,
            window: Window::default(),
            held_back: busy.as_ref().is_some_and(|b| !b.partial.is_empty()),
            busy,
            readable: false,
            peer_closed: false,
            lent: false,
        }
    }

    /// What the connection is partway through, made room for if it was idle.
    pub fn busy(&mut self) -> &mut Busy {
        self.busy.get_or_insert_with(Box::default)
    }

    /// Inbound bytes not yet handled, taken out (empty while idle).
    pub fn take_partial(&mut self) -> Box<[u8]> {
        self.busy.as_mut().map(|b| std::mem::take(&mut b.partial)).unwrap_or_default()
    }

    pub fn replies(&self) -> usize {
        self.busy.as_ref().map_or(0, |b| b.replies.len())
    }

    pub fn writing(&self) -> Option<&Writing> {
        self.busy.as_ref().and_then(|b| b.writing.as_ref())
    }

    /// Gives back what an idle connection no longer needs.
    pub fn settle(&mut self) {
        if self.busy.as_ref().is_some_and(|b| b.is_empty()) {
            self.busy = None;
        }
    }
}
