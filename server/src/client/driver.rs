//! One per core: the task that serves every connection living on that core. Their
//! sockets are in one edge-triggered epoll set of the driver's own (through mio), which
//! tokio's reactor watches as a single fd. A connection is served ([`Serving::advance`])
//! when its socket becomes ready or when it is signalled through the core's [`Inbox`];
//! between those it is only its record (`Conn`, with its `Io`) and a key in the driver's
//! table. A connection that must wait to close leaves for a task of its own (`closing`).

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use tokio::io::unix::AsyncFd;

use crate::conn::{Conn, Inbox};
use crate::cores::Cores;
use crate::telemetry::CloseReason;

use super::{closing, Clients, Left, Serving, Stop};

/// Readiness events taken per epoll call; the driver lets the core's other tasks run
/// between batches.
const EVENTS: usize = 256;

/// What an epoll event said of a socket.
#[derive(Clone, Copy)]
struct Ready {
    readable: bool,
    /// The client closed its end (or the socket failed).
    closed: bool,
}

impl Ready {
    const NOTHING: Ready = Ready { readable: false, closed: false };
}

pub struct Driver {
    poll: AsyncFd<Poll>,
    events: Events,
    conns: Slab<Arc<Conn>>,
    inbox: Arc<Inbox>,
    clients: Arc<Clients>,
    /// Buffers traded with the inbox, and the keys of connections with reading left over.
    arrivals: Vec<Arc<Conn>>,
    woken: Vec<u32>,
    ready: Vec<(usize, Ready)>,
    again: Vec<usize>,
}

/// Starts a driver on each core; returns their inboxes, in the cores' order.
pub fn start(cores: &Cores, clients: &Arc<Clients>) -> io::Result<Vec<Arc<Inbox>>> {
    let mut inboxes = Vec::new();
    for handle in cores.handles() {
        // Entered, so that the epoll set is watched by this core's reactor.
        let _entered = handle.enter();
        let inbox = Arc::new(Inbox::default());
        // SAFETY: the `Poll` owns its epoll fd, and the `AsyncFd` owns the `Poll`.
        let poll = unsafe { AsyncFd::register(Poll::new()?) }?;
        let driver = Driver {
            poll,
            events: Events::with_capacity(EVENTS),
            conns: Slab::new(),
            inbox: inbox.clone(),
            clients: clients.clone(),
            arrivals: Vec::new(),
            woken: Vec::new(),
            ready: Vec::with_capacity(EVENTS),
            again: Vec::new(),
        };
        handle.spawn(driver.run());
        inboxes.push(inbox);
    }
    Ok(inboxes)
}

impl Driver {
    async fn run(mut self) {
        loop {
            self.take_arrivals();
            self.serve_woken();
            let more = self.serve_ready();
            self.serve_again();
            if more || !self.again.is_empty() {
                tokio::task::yield_now().await;
                continue;
            }
            tokio::select! {
                () = self.inbox.notified() => {}
                ready = self.poll.readable() => match ready {
                    // Every turn of this loop asks the epoll set, so what made it ready is
                    // taken on the next, and anything after raises readiness again.
                    Ok(mut ready) => ready.clear_ready(),
                    Err(e) => {
                        tracing::error!(error = %e, "a core's epoll set failed; its connections are no longer served");
                        return;
                    }
                },
            }
        }
    }

    fn take_arrivals(&mut self) {
        self.inbox.take_arrivals(&mut self.arrivals);
        let mut arrivals = std::mem::take(&mut self.arrivals);
        for conn in arrivals.drain(..) {
            self.arrive(conn);
        }
        self.arrivals = arrivals;
    }

    /// Puts a connection handed over by its handshake in the table and the epoll set, and
    /// serves it (what its welcome left, bytes that came with its head, messages queued
    /// since it registered).
    fn arrive(&mut self, conn: Arc<Conn>) {
        let Some((fd, plain)) = conn.io().as_ref().map(|io| (io.socket.as_raw_fd(), io.socket.is_plain())) else { return };
        if self.conns.len() == self.conns.capacity() {
            // Grown by an eighth, not doubled: a table only ever doubled carries up to a
            // slot (16 bytes) of empty room per connection.
            self.conns.reserve_exact(self.conns.capacity() / 8 + 64);
        }
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        let registered = u32::try_from(key).map_err(|_| io::ErrorKind::OutOfMemory.into()).and_then(|_| {
            self.poll.get_ref().registry().register(&mut SourceFd(&fd), Token(key), Interest::READABLE | Interest::WRITABLE)
        });
        if let Err(e) = registered {
            tracing::warn!(error = %e, "cannot watch a connection's socket; closing it");
            let io = conn.io().take();
            if let Some(io) = io {
                closing::close(conn, io, self.clients.clone(), CloseReason::IoError);
            }
            return;
        }
        entry.insert(conn.clone());
        conn.keyed(key as u32);
        // A plain socket's bytes so far were read with its head (`early`), and any since
        // raise an event: registering reports what is already there. TLS may hold
        // records it has read but not yet decrypted, so it is read now.
        self.serve(key, Ready { readable: !plain, closed: false });
    }

    fn serve_woken(&mut self) {
        self.inbox.take_woken(&mut self.woken);
        let mut woken = std::mem::take(&mut self.woken);
        for key in woken.drain(..) {
            self.serve(key as usize, Ready::NOTHING);
        }
        self.woken = woken;
    }

    /// Serves the connections whose sockets became ready; true if there may be more.
    fn serve_ready(&mut self) -> bool {
        if let Err(e) = self.poll.get_mut().poll(&mut self.events, Some(Duration::ZERO)) {
            if e.kind() != io::ErrorKind::Interrupted {
                tracing::warn!(error = %e, "epoll_wait failed");
            }
            return false;
        }
        self.ready.extend(self.events.iter().map(|e| {
            let closed = e.is_read_closed() || e.is_error();
            (e.token().0, Ready { readable: e.is_readable() || closed, closed })
        }));
        let full = self.ready.len() == EVENTS;
        let mut ready = std::mem::take(&mut self.ready);
        for (key, readiness) in ready.drain(..) {
            self.serve(key, readiness);
        }
        self.ready = ready;
        full
    }

    fn serve_again(&mut self) {
        let mut again = std::mem::take(&mut self.again);
        for key in again.drain(..) {
            self.serve(key, Ready::NOTHING);
        }
        if self.again.is_empty() {
            self.again = again;
        }
    }

    /// One wake-up of the connection under `key`, with what its socket said. A key whose
    /// connection has gone (or whose place another took since) is served anyway, or not
    /// at all: a wake-up with nothing to do costs a look.
    fn serve(&mut self, key: usize, ready: Ready) {
        let Some(conn) = self.conns.get(key) else { return };
        let mut io = conn.io();
        let Some(record) = io.as_mut() else { return };
        record.readable |= ready.readable;
        record.peer_closed |= ready.closed;
        let outcome = Serving { io: record, conn, clients: &self.clients }.advance();
        drop(io);
        match outcome {
            Ok(Left::Waiting) => {}
            Ok(Left::More) => self.again.push(key),
            Err(Stop(reason)) => self.close(key, reason),
        }
    }

    fn close(&mut self, key: usize, reason: CloseReason) {
        let conn = self.conns.remove(key);
        let Some(io) = conn.io().take() else { return };
        let _ = self.poll.get_ref().registry().deregister(&mut SourceFd(&io.socket.as_raw_fd()));
        closing::close(conn, io, self.clients.clone(), reason);
    }
}

impl Drop for Driver {
    /// The core's runtime is ending: what is still here is closed and counted now.
    fn drop(&mut self) {
        self.inbox.take_arrivals(&mut self.arrivals);
        let conns = std::mem::take(&mut self.conns);
        for conn in conns.into_iter().map(|(_, conn)| conn).chain(self.arrivals.drain(..)) {
            let io = conn.io().take();
            if let Some(io) = io {
                closing::drop_now(conn, io, self.clients.clone(), CloseReason::Shutdown);
            }
        }
    }
}
