//! A connected client: the task that owns its socket, reading its frames and writing
//! what it is owed, and the sweeper that keeps time for every connection at once.
//!
//! An idle connection costs its task (the socket, a few words of state) and its `Conn`
//! handle; nothing else. There is no read buffer while idle: when the socket is readable
//! the task reads into a per-thread scratch buffer and keeps only the tail of an
//! incomplete frame. There is no per-connection timer: the sweeper ([`sweep`]) checks
//! idle deadlines and due pings for every connection at once, and signals the task.

pub mod commands;
pub mod sweep;

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use pushline_alloc::Site;
use tokio::io::AsyncWriteExt;

use arc_swap::ArcSwap;

use crate::admission::Slot;
use crate::auth::Auth;
use crate::clock;
use crate::config::MAX_CLIENT_FRAME_LIMIT;
use crate::conn::{Conn, Next, Signals};
use crate::hub::Hub;
use crate::socket::Socket;
use crate::telemetry::{probes, ClientError, CloseReason, DropReason, Metrics};
use crate::wire::{sse, ws, Transport};

/// How long a closing connection may take to write its last bytes and close frame.
const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// After its close frame, how long and how many bytes a closing connection reads and
/// discards before closing: closed with unread input, the kernel would answer with a
/// reset, and the client would lose the close frame (and why) before reading it.
const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1024 * 1024;

/// Bytes read per wake-up before the task lets others run.
const READ_BUDGET: usize = 256 * 1024;

/// Replies (pongs, acks, errors) a client may have unsent before the task stops reading
/// from it: one that sends and never reads is held by TCP flow control, not by memory.
const MAX_PENDING_REPLIES: usize = 32;

/// What every client task shares.
pub struct Clients {
    pub hub: Arc<Hub>,
    pub metrics: Arc<Metrics>,
    /// Who may read what; swapped when keys are reloaded (SIGHUP).
    pub auth: Arc<ArcSwap<Auth>>,
    /// Largest message a client may send.
    pub max_message: usize,
    pub max_commands_per_second: u16,
    pub max_topic_changes_per_minute: u16,
    /// Time a client whose token expired has to refresh it.
    pub refresh_grace_ms: u64,
}

/// A client's recent commands, against its per-connection limits; and whether it was
/// told its token expired. Eight bytes: the task future's budget is 256.
#[derive(Default)]
struct Window {
    /// Low bits of the process clock's second and minute these counts are for.
    second: u16,
    commands: u16,
    minute: u16,
    topic_changes: u16,
}

thread_local! {
    /// Where every connection on this thread reads into; only the tail of an incomplete
    /// frame is copied out to the connection. Room for the largest frame allowed, its
    /// header, and a read's worth beyond it.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(Site::Codec.scope(|| vec![0; MAX_CLIENT_FRAME_LIMIT + 4 * 1024]));
}

/// A frame partly written to the socket.
struct Writing {
    bytes: Bytes,
    written: usize,
    /// Set for published messages, whose delivery is counted and timed.
    accepted_at: Option<Instant>,
}

enum Event {
    Signals(Signals),
    Readable,
    Writable,
    Failed,
}

/// The end of a connection's task, and why.
struct Stop(CloseReason);

/// Owns the socket of one connection. Dropping it unregisters the connection and counts
/// why it closed, whichever way the task ended.
struct Task {
    socket: Socket,
    conn: Arc<Conn>,
    clients: Arc<Clients>,
    /// Inbound bytes not yet handled: a frame not yet complete, or frames held back while
    /// replies are backed up; empty (unallocated) otherwise.
    partial: Box<[u8]>,
    /// `partial` holds frames held back: handle them once replies drain.
    held_back: bool,
    /// The socket is lent to publishers (nothing was owed when last flushed).
    lent: bool,
    decoder: ws::Decoder,
    /// Replies (pongs, acks, errors) written before queued messages.
    replies: VecDeque<Bytes>,
    writing: Option<Writing>,
    window: Window,
    reason: CloseReason,
    slot: Slot,
}

impl Drop for Task {
    fn drop(&mut self) {
        let metrics = &self.clients.metrics;
        if self.writing.as_ref().is_some_and(|w| w.accepted_at.is_some()) {
            metrics.dropped(DropReason::ConnectionClosed, 1);
        }
        self.conn.close_outbox(metrics);
        self.slot.release_address(self.conn.address);
        probes::conn_close(self.conn.session.0, self.reason as u8, self.conn.age_ms(clock::now_ms()));
        self.clients.hub.unregister(&self.conn, self.reason);
    }
}

/// Serves a registered connection until it closes. `first` is the welcome frame,
/// `early` any bytes the client sent right after its handshake.
///
/// Not an `async fn`: one would keep its arguments in the future beside the `Task`
/// they are moved into, for the connection's whole life.
pub fn serve(
    socket: Socket,
    conn: Arc<Conn>,
    clients: Arc<Clients>,
    slot: Slot,
    first: Bytes,
    early: Vec<u8>,
) -> impl std::future::Future<Output = ()> + Send {
    let mut task = Task {
        socket,
        conn,
        clients,
        held_back: !early.is_empty(),
        lent: false,
        partial: early.into_boxed_slice(),
        decoder: ws::Decoder::new(),
        replies: VecDeque::new(),
        writing: Some(Writing { bytes: first, written: 0, accepted_at: None }),
        window: Window::default(),
        reason: CloseReason::IoError,
        slot,
    };
    // An `async move` block that uses `task` in place: an `async fn` taking the task (or
    // these arguments) would hold a second copy of it in the future for its whole life.
    async move {
        let reason = task.run().await;
        // Boxed: closing needs a timer and write futures, and an idle connection should
        // not carry their space in its task for its whole life.
        Box::pin(task.finish(reason)).await;
    }
}

impl Task {
    async fn run(&mut self) -> CloseReason {
        loop {
            if self.flush().is_err() {
                return CloseReason::IoError;
            }
            if self.held_back && self.replies.len() < MAX_PENDING_REPLIES {
                // Frames that came with the handshake, or that waited for replies to drain.
                if let Err(Stop(reason)) = self.on_held_bytes() {
                    return reason;
                }
                continue;
            }
            let event = poll_fn(|cx| self.poll_event(cx)).await;
            let step = match event {
                Event::Signals(signals) => self.on_signals(signals),
                Event::Readable => self.on_readable(),
                Event::Writable => Ok(()),
                Event::Failed => Err(Stop(CloseReason::IoError)),
            };
            if let Err(Stop(reason)) = step {
                return reason;
            }
        }
    }

    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        let signals = self.conn.take_signals(cx.waker());
        if signals.any() {
            return Poll::Ready(Event::Signals(signals));
        }
        if self.writing.is_some() || self.socket.has_unsent() {
            if let Poll::Ready(r) = self.socket.tcp().poll_write_ready(cx) {
                return Poll::Ready(if r.is_ok() { Event::Writable } else { Event::Failed });
            }
        }
        if self.replies.len() >= MAX_PENDING_REPLIES {
            // Backpressure: read again once the client has taken its replies.
            return Poll::Pending;
        }
        match self.socket.tcp().poll_read_ready(cx) {
            Poll::Ready(Ok(())) => Poll::Ready(Event::Readable),
            Poll::Ready(Err(_)) => Poll::Ready(Event::Failed),
            Poll::Pending => Poll::Pending,
        }
    }

    fn on_signals(&mut self, signals: Signals) -> Result<(), Stop> {
        if signals.has(Signals::WORK) && self.lent {
            // A publisher handed the socket back (it was full), or a resume took it.
            self.reclaim();
        }
        if signals.has(Signals::CLOSE) {
            return Err(Stop(self.conn.close_reason().unwrap_or(CloseReason::Shutdown)));
        }
        if signals.has(Signals::EXPIRED) && self.conn.transport == Transport::WebSocket {
            let grace_ms = self.clients.refresh_grace_ms;
            let notice = serde_json::json!({ "type": "token_expired", "grace_ms": grace_ms }).to_string();
            self.replies.push_back(ws::text(&notice));
        }
        if signals.has(Signals::REVOKED) {
            let revoked = self.conn.state().grant.as_deref_mut().map(|g| std::mem::take(&mut g.revoked)).unwrap_or_default();
            if !revoked.is_empty() {
                let notice = serde_json::json!({ "type": "unsubscribed", "topics": revoked, "reason": "subscription token expired" });
                self.replies.push_back(ws::text(&notice.to_string()));
            }
        }
        if signals.has(Signals::PING) && self.replies.len() < MAX_PENDING_REPLIES {
            self.replies.push_back(match self.conn.transport {
                Transport::WebSocket => ws::frame(ws::OP_PING, b""),
                Transport::Sse => Bytes::from_static(sse::KEEPALIVE),
            });
        }
        Ok(())
    }

    /// Writes replies, then queued messages, until done or the socket would block.
    /// Returns true when nothing is left to write, and then lends a plain WebSocket's
    /// socket to publishers (see `conn::queue`). While it is lent, replies go out under the
    /// publishers' lock; anything else takes the socket back first.
    fn flush(&mut self) -> io::Result<bool> {
        if !self.socket.flush()? {
            return Ok(false);
        }
        if self.lent {
            // Nothing queued is ours to write; what publishers send, they write themselves
            // (and a WORK signal reclaims the socket when they hand something back).
            while let Some(reply) = self.replies.pop_front() {
                match self.conn.send_while_lent(&reply) {
                    Some(sent) if sent == reply.len() => {}
                    Some(sent) => {
                        // The socket is the task's again; the rest goes out below.
                        self.lent = false;
                        self.writing = Some(Writing { bytes: reply, written: sent, accepted_at: None });
                        break;
                    }
                    None => {
                        self.replies.push_front(reply);
                        break;
                    }
                }
            }
            if self.lent {
                if self.replies.is_empty() {
                    return Ok(true);
                }
                self.reclaim();
            }
        }
        loop {
            let writing = match &mut self.writing {
                Some(w) => w,
                None => {
                    let next = if let Some(bytes) = self.replies.pop_front() {
                        Writing { bytes, written: 0, accepted_at: None }
                    } else {
                        let lend = (self.conn.transport == Transport::WebSocket && self.socket.is_plain()).then(|| self.socket.as_raw_fd());
                        match self.conn.pop(&self.clients.metrics, lend) {
                            Next::Write(popped) => {
                                let accepted_at = popped.message.as_ref().filter(|_| popped.queued).map(|m| m.accepted_at);
                                let bytes = match popped.tail {
                                    // An SSE event ends with this connection's cursor, so it is
                                    // copied whole: one buffer keeps `Writing`, and so every
                                    // connection's task, small.
                                    Some(tail) => Bytes::from([&popped.bytes[..], &tail[..]].concat()),
                                    None => popped.bytes,
                                };
                                Writing { bytes, written: 0, accepted_at }
                            }
                            Next::Nothing { lent } => {
                                self.lent = lent;
                                return Ok(true);
                            }
                        }
                    };
                    self.writing.insert(next)
                }
            };
            match self.socket.write(&writing.bytes[writing.written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    writing.written += n;
                    if writing.written == writing.bytes.len() {
                        if let Some(accepted_at) = writing.accepted_at {
                            self.conn.written(writing.bytes.len(), accepted_at, &self.clients.metrics);
                        }
                        self.writing = None;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
    }

    /// Takes back the socket lent to publishers, with what one of them left half-sent.
    fn reclaim(&mut self) {
        self.lent = false;
        if let Some(partial) = self.conn.take_back(&self.clients.metrics) {
            let accepted_at = Some(partial.message.accepted_at);
            self.writing = Some(Writing { bytes: partial.bytes, written: partial.written, accepted_at });
        }
    }

    /// Flushes until nothing is left; false if the socket failed.
    async fn flush_all(&mut self) -> bool {
        loop {
            match self.flush() {
                Ok(true) => return true,
                Ok(false) => {
                    if self.socket.tcp().writable().await.is_err() {
                        return false;
                    }
                }
                Err(_) => return false,
            }
        }
    }

    fn on_readable(&mut self) -> Result<(), Stop> {
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let mut filled = self.partial.len();
            scratch[..filled].copy_from_slice(&self.partial);
            self.partial = Box::default();
            let mut budget = READ_BUDGET;
            let result = loop {
                match self.socket.read(&mut scratch[filled..]) {
                    Ok(0) => break Err(Stop(CloseReason::Client)),
                    Ok(n) => {
                        self.conn.heard_from(clock::now_ms());
                        filled += n;
                        let used = match self.on_bytes(&mut scratch[..filled]) {
                            Ok(used) => used,
                            Err(stop) => break Err(stop),
                        };
                        scratch.copy_within(used..filled, 0);
                        filled -= used;
                        budget = budget.saturating_sub(n);
                        if self.replies.len() >= MAX_PENDING_REPLIES {
                            // What is left waits in `partial` until the replies drain.
                            self.held_back = filled > 0;
                            break Ok(());
                        }
                        if budget == 0 {
                            // Readiness stays set: the next poll comes straight back here.
                            break Ok(());
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(()),
                    Err(_) => break Err(Stop(CloseReason::IoError)),
                }
            };
            if result.is_ok() && filled > 0 {
                self.partial = scratch[..filled].into();
            }
            result
        })
    }

    /// Handles bytes already read: those that came with the handshake, or those held
    /// back while replies were backed up.
    fn on_held_bytes(&mut self) -> Result<(), Stop> {
        self.held_back = false;
        let mut bytes = std::mem::take(&mut self.partial).into_vec();
        let used = self.on_bytes(&mut bytes)?;
        bytes.drain(..used);
        self.held_back = !bytes.is_empty() && self.replies.len() >= MAX_PENDING_REPLIES;
        self.partial = bytes.into_boxed_slice();
        Ok(())
    }

    /// Handles every complete frame at the start of `buf`; returns the bytes used.
    fn on_bytes(&mut self, buf: &mut [u8]) -> Result<usize, Stop> {
        if self.conn.transport == Transport::Sse {
            // An SSE client has nothing to say after its request; ignore what it sends.
            return Ok(buf.len());
        }
        let mut used = 0;
        loop {
            if self.replies.len() >= MAX_PENDING_REPLIES {
                return Ok(used);
            }
            match self.decoder.decode(&mut buf[used..], self.clients.max_message) {
                Ok(decoded) if decoded.used == 0 => return Ok(used),
                Ok(decoded) => {
                    used += decoded.used;
                    if let Some(event) = decoded.event {
                        self.on_event(event)?;
                    }
                }
                Err(e) => return Err(self.protocol_error(e)),
            }
        }
    }

    fn protocol_error(&mut self, e: ws::ProtocolError) -> Stop {
        tracing::debug!(session = %self.conn.session, error = e.as_str(), "closing on protocol error");
        self.replies.push_back(ws::close(e.close_code(), e.as_str()));
        Stop(CloseReason::ProtocolError)
    }

    fn on_event(&mut self, event: ws::Event<'_>) -> Result<(), Stop> {
        match event {
            ws::Event::Text(text) => {
                self.count_command()?;
                let handled = commands::handle(&text, &self.conn, &self.clients);
                self.count_topic_changes(handled.topic_changes)?;
                self.replies.push_back(handled.reply);
            }
            ws::Event::Ping(payload) => {
                probes::heartbeat(self.conn.session.0, 1);
                self.replies.push_back(ws::frame(ws::OP_PONG, payload));
            }
            ws::Event::Pong => probes::heartbeat(self.conn.session.0, 2),
            ws::Event::Binary => {
                self.clients.metrics.client_error(ClientError::BinaryFrame);
                self.replies.push_back(commands::error_reply("binary messages are not accepted; send JSON text"));
            }
            ws::Event::Close { code } => {
                // Echo the client's code, as RFC 6455 5.5.1 asks.
                self.replies.push_back(ws::close(code.unwrap_or(ws::CLOSE_NORMAL), ""));
                return Err(Stop(CloseReason::Client));
            }
        }
        Ok(())
    }

    fn policy_violation(&mut self, why: &str) -> Stop {
        self.clients.metrics.client_error(ClientError::OverLimit);
        self.replies.push_back(ws::close(ws::CLOSE_POLICY_VIOLATION, why));
        Stop(CloseReason::PolicyViolation)
    }

    /// One more command this second, within `--max-commands-per-second`.
    fn count_command(&mut self) -> Result<(), Stop> {
        let second = (clock::now_ms() / 1000) as u16;
        if self.window.second != second {
            self.window.second = second;
            self.window.commands = 0;
        }
        self.window.commands += 1;
        if self.window.commands > self.clients.max_commands_per_second {
            return Err(self.policy_violation("too many commands per second"));
        }
        Ok(())
    }

    /// `changes` more topics subscribed or left this minute, within
    /// `--max-topic-changes-per-minute`.
    fn count_topic_changes(&mut self, changes: usize) -> Result<(), Stop> {
        let minute = (clock::now_ms() / 60_000) as u16;
        if self.window.minute != minute {
            self.window.minute = minute;
            self.window.topic_changes = 0;
        }
        self.window.topic_changes = self.window.topic_changes.saturating_add(changes.min(u16::MAX as usize) as u16);
        if self.window.topic_changes > self.clients.max_topic_changes_per_minute {
            return Err(self.policy_violation("too many topic changes per minute"));
        }
        Ok(())
    }

    /// Writes what the connection still owes the client (queued messages on a graceful
    /// shutdown, then the close frame), bounded in time, then closes the socket.
    async fn finish(&mut self, reason: CloseReason) {
        self.reason = reason;
        let metrics = self.clients.metrics.clone();
        if reason != CloseReason::Shutdown {
            self.conn.close_outbox(&metrics);
        }
        if reason == CloseReason::IoError {
            return;
        }
        let close = match (self.conn.transport, reason) {
            (Transport::Sse, _) => None,
            (Transport::WebSocket, CloseReason::Shutdown) => Some(ws::close(ws::CLOSE_GOING_AWAY, "server shutting down")),
            (Transport::WebSocket, CloseReason::IdleTimeout) => Some(ws::close(ws::CLOSE_NORMAL, "idle timeout")),
            (Transport::WebSocket, CloseReason::SlowConsumer) => {
                Some(ws::close(ws::CLOSE_TRY_AGAIN_LATER, "slow consumer: outbound queue full"))
            }
            (Transport::WebSocket, CloseReason::TokenExpired) => Some(ws::close(ws::CLOSE_TOKEN_EXPIRED, "token expired")),
            // Client closes and protocol errors already queued their close frame.
            (Transport::WebSocket, _) => None,
        };
        let drained = tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, async {
            if !self.flush_all().await {
                return false;
            }
            self.conn.close_outbox(&metrics);
            if let Some(frame) = close {
                self.replies.push_back(frame);
                if !self.flush_all().await {
                    return false;
                }
            }
            let _ = self.socket.shutdown().await;
            true
        })
        .await;
        match drained {
            Ok(true) => self.linger_apart(),
            Ok(false) => {}
            Err(_) => tracing::debug!(session = %self.conn.session, "close frame not taken in time"),
        }
    }

    /// Leaves the closed socket's read side to a task of its own, on a duplicate of its
    /// descriptor, which [`linger`]s; this connection then ends (unregistered and counted
    /// at once: lingering is the socket's business, not the connection's).
    fn linger_apart(&self) {
        use std::os::fd::AsFd;
        let Ok(fd) = self.socket.tcp().as_fd().try_clone_to_owned() else { return };
        // The duplicate shares the original's non-blocking mode.
        let Ok(stream) = tokio::net::TcpStream::from_std(std::net::TcpStream::from(fd)) else { return };
        tokio::spawn(linger(stream));
    }
}

/// Reads and discards what the client still sends on a closed connection, until it
/// closes its end, for at most [`LINGER_TIME`] and [`LINGER_BYTES`].
async fn linger(stream: tokio::net::TcpStream) {
    let deadline = tokio::time::Instant::now() + LINGER_TIME;
    let mut discarded = 0;
    loop {
        let done = SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            loop {
                match stream.try_read(&mut scratch[..]) {
                    Ok(0) => return true,
                    Ok(n) => {
                        discarded += n;
                        if discarded >= LINGER_BYTES {
                            return true;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                    Err(_) => return true,
                }
            }
        });
        if done || tokio::time::timeout_at(deadline, stream.readable()).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::Admission;
    use crate::conn::queue::Limits;
    use crate::hub::Settings;
    use crate::session::SessionIds;

    /// An idle connection is its task and its `Conn`; these sizes are most of its memory
    /// (see README, "Memory per connection"), so growing them should be a decision.
    #[tokio::test]
    async fn idle_connection_state_stays_small() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = Socket::plain(tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap());
        let metrics = Arc::new(Metrics::new());
        let limits = Limits { max_messages: 1, max_bytes: 1, policy: crate::config::SlowConsumer::DropOldest };
        let hub = Arc::new(Hub::new(Settings { limits, max_topics_per_connection: 1, max_connections_per_uid: 1, fanout_batch: 1 }, metrics.clone(), None, Arc::new(crate::cores::Cores::start(1).unwrap())));
        let auth = Arc::new(ArcSwap::from_pointee(Auth::new(None, Duration::from_secs(1), Vec::new())));
        let clients = Arc::new(Clients {
            hub,
            metrics,
            auth,
            max_message: 1024,
            max_commands_per_second: 1,
            max_topic_changes_per_minute: 1,
            refresh_grace_ms: 1,
        });
        let limits = crate::admission::Limits { max_connections: 1, connect_rate: 0, per_address: 0 };
        let (slot, address) = Arc::new(Admission::new(limits)).reserve("127.0.0.1".parse().unwrap()).ok().unwrap().hand_over();
        let conn = Arc::new(Conn::new(SessionIds::new(0).next(), "u".into(), Transport::WebSocket, None, address));
        let future = serve(stream, conn, clients, slot, Bytes::new(), Vec::new());
        assert!(std::mem::size_of_val(&future) <= 256, "connection future is {} bytes", std::mem::size_of_val(&future));
        // `Arc<Conn>` adds 16 bytes of counts: up to 176 it stays in jemalloc's 192-byte class.
        assert!(std::mem::size_of::<Conn>() <= 176, "Conn is {} bytes", std::mem::size_of::<Conn>());
    }
}
