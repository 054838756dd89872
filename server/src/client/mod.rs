//! A connected client: how its frames are read and what it is owed is written, one
//! wake-up at a time ([`Serving`]), by the driver of the core it lives on ([`driver`]);
//! how it closes ([`closing`]); and the sweeper that keeps time for every connection at
//! once ([`sweep`]).
//!
//! An idle connection costs its record (`Conn`, with its [`Io`]); nothing else: no task,
//! no reactor registration, no read buffer. When the socket is readable the driver reads
//! into a per-thread scratch buffer and keeps only the tail of an incomplete frame. There
//! is no per-connection timer: the sweeper checks idle deadlines and due pings for every
//! connection at once, and signals the driver.

mod closing;
pub mod commands;
pub mod driver;
pub mod publish;
mod pusher;
pub mod sweep;

use std::cell::RefCell;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use bytes::Bytes;
use pushline_alloc::Site;

use arc_swap::ArcSwap;

use crate::admission::Admission;
use crate::auth::Auth;
use crate::clock;
use crate::config::MAX_CLIENT_FRAME_LIMIT;
use crate::conn::io::{Io, Writing};
use crate::conn::{Conn, Next, Signals};
use crate::hub::Hub;
use crate::telemetry::{probes, ClientError, CloseReason, Metrics};
use crate::wire::{sse, ws, Transport};

/// Bytes read per wake-up before the driver serves other connections.
const READ_BUDGET: usize = 256 * 1024;

/// Replies (pongs, acks, errors) a client may have unsent before the driver stops reading
/// from it: one that sends and never reads is held by TCP flow control, not by memory.
const MAX_PENDING_REPLIES: usize = 32;

/// What every connection shares.
pub struct Clients {
    pub hub: Arc<Hub>,
    /// Where a connection's place among `--max-connections` is given back.
    pub admission: Arc<Admission>,
    pub metrics: Arc<Metrics>,
    /// Who may read what; swapped when keys are reloaded (SIGHUP).
    pub auth: Arc<ArcSwap<Auth>>,
    /// Largest message a client may send.
    pub max_message: usize,
    pub max_commands_per_second: u16,
    pub max_topic_changes_per_minute: u16,
    /// Time a client whose token expired has to refresh it.
    pub refresh_grace_ms: u64,
    pub publishing: publish::Publishing,
    /// Presence topics' members, when `--presence-topics` names some.
    pub presence: Option<Arc<crate::presence::Presence>>,
    /// The connect and subscribe hooks, when either is set.
    pub hooks: Option<Arc<crate::hooks::Hooks>>,
    /// Where events go to the application, when `--webhook-url` is set.
    pub webhooks: Option<Arc<crate::webhooks::Webhooks>>,
    /// The Pusher apps, when `--pusher-app` names some.
    pub pusher: Option<Arc<crate::pusher::Apps>>,
}

thread_local! {
    /// Where every connection on this thread reads into; only the tail of an incomplete
    /// frame is copied out to the connection. Room for the largest frame allowed, its
    /// header, and a read's worth beyond it.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(Site::Codec.scope(|| vec![0; MAX_CLIENT_FRAME_LIMIT + 4 * 1024]));
}

/// A command that could not be carried out: the metric label and what to tell the client.
#[derive(Debug)]
pub struct Refused {
    pub reason: ClientError,
    pub message: String,
}

/// The end of a connection, and why.
pub struct Stop(pub CloseReason);

/// One wake-up of one connection: its record, locked, and what it is served with.
pub struct Serving<'a> {
    pub io: &'a mut Io,
    pub conn: &'a Arc<Conn>,
    pub clients: &'a Clients,
}

/// What a wake-up left.
#[derive(PartialEq, Eq, Debug)]
pub enum Left {
    /// Nothing to do until the socket is ready again or a signal comes.
    Waiting,
    /// Unread input past the read budget: serve it again soon, after others.
    More,
}

impl Serving<'_> {
    /// Does everything the connection can do now without waiting: takes its signals,
    /// writes what it owes, reads and handles what arrived.
    pub fn advance(&mut self) -> Result<Left, Stop> {
        let left = loop {
            let signals = self.conn.take_signals();
            if signals.any() {
                self.on_signals(signals)?;
            }
            if self.flush().is_err() {
                return Err(Stop(CloseReason::IoError));
            }
            if self.backed_up() {
                // Backpressure: read again once the client has taken its replies, or its
                // requests served off the core are answered.
                break Left::Waiting;
            }
            if self.io.held_back {
                // Frames that came with the handshake, or that waited for replies to drain.
                self.on_held_bytes()?;
                continue;
            }
            if !self.io.readable {
                break Left::Waiting;
            }
            if self.on_readable()? == Left::More {
                if self.flush().is_err() {
                    return Err(Stop(CloseReason::IoError));
                }
                break Left::More;
            }
        };
        self.io.settle();
        Ok(left)
    }

    fn on_signals(&mut self, signals: Signals) -> Result<(), Stop> {
        if signals.has(Signals::WORK) && self.io.lent {
            // A publisher handed the socket back (it was full), or a resume took it.
            self.reclaim();
        }
        if signals.has(Signals::CLOSE) {
            return Err(Stop(self.conn.close_reason().unwrap_or(CloseReason::Shutdown)));
        }
        if signals.has(Signals::EXPIRED) && self.conn.transport == Transport::WebSocket {
            let grace_ms = self.clients.refresh_grace_ms;
            let notice = serde_json::json!({ "type": "token_expired", "grace_ms": grace_ms }).to_string();
            self.io.busy().replies.push_back(ws::text(&notice));
        }
        if signals.has(Signals::REVOKED) {
            let revoked = self.conn.state().grant.as_deref_mut().map(|g| std::mem::take(&mut g.revoked)).unwrap_or_default();
            if !revoked.is_empty() {
                let notice = serde_json::json!({ "type": "unsubscribed", "topics": revoked, "reason": "subscription token expired" });
                self.io.busy().replies.push_back(ws::text(&notice.to_string()));
            }
        }
        if signals.has(Signals::PING) && self.io.replies() < MAX_PENDING_REPLIES {
            match self.conn.transport {
                Transport::WebSocket => self.reply(ws::Control::new(ws::OP_PING, b"").as_bytes()),
                // Every Pusher client answers the protocol's own ping with `pusher:pong`.
                Transport::Pusher => self.reply(&ws::text(crate::pusher::PING)),
                Transport::Sse => self.reply(sse::KEEPALIVE),
            }
        }
        Ok(())
    }

    /// Writes replies, then queued messages, until done or the socket would block.
    /// Returns true when nothing is left to write, and then lends a plain WebSocket's
    /// socket to publishers (see `conn::queue`). While it is lent, replies go out under the
    /// publishers' lock; anything else takes the socket back first.
    fn flush(&mut self) -> io::Result<bool> {
        if !self.io.socket.flush()? {
            return Ok(false);
        }
        if self.io.lent && !self.reply_while_lent() {
            return Ok(true);
        }
        loop {
            let mut writing = match self.io.busy.as_mut().and_then(|b| b.writing.take()) {
                Some(writing) => writing,
                None => match self.next_writing() {
                    Some(writing) => writing,
                    None => return Ok(true),
                },
            };
            match self.io.socket.write(&writing.bytes[writing.written..]) {
                Ok(0) => {
                    self.io.busy().writing = Some(writing);
                    return Err(io::ErrorKind::WriteZero.into());
                }
                Ok(n) => {
                    writing.written += n;
                    if writing.written < writing.bytes.len() {
                        self.io.busy().writing = Some(writing);
                    } else if let Some(accepted_at) = writing.accepted_at {
                        self.conn.written(writing.bytes.len(), accepted_at, &self.clients.metrics);
                    }
                }
                Err(e) => {
                    // Kept, so a published message cut off by a failure is counted dropped.
                    self.io.busy().writing = Some(writing);
                    return if e.kind() == io::ErrorKind::WouldBlock { Ok(false) } else { Err(e) };
                }
            }
        }
    }

    /// Writes the replies owed while the socket is lent, under the publishers' lock, so
    /// the socket stays lent. True when the socket is the driver's again, with something
    /// left for it to write.
    fn reply_while_lent(&mut self) -> bool {
        let io = &mut *self.io;
        if let Some(busy) = io.busy.as_deref_mut() {
            while let Some(reply) = busy.replies.pop_front() {
                match self.conn.send_while_lent(&reply) {
                    Some(sent) if sent == reply.len() => {}
                    Some(sent) => {
                        // The socket is the driver's again; the rest goes out first.
                        io.lent = false;
                        busy.writing = Some(Writing { bytes: reply, written: sent, accepted_at: None });
                        return true;
                    }
                    None => {
                        busy.replies.push_front(reply);
                        break;
                    }
                }
            }
        }
        if io.replies() == 0 {
            return false;
        }
        self.reclaim();
        true
    }

    /// The next reply, else the next queued message; None when nothing is owed, and then
    /// a plain WebSocket's socket is lent in the same step.
    fn next_writing(&mut self) -> Option<Writing> {
        if let Some(bytes) = self.io.busy.as_mut().and_then(|b| b.replies.pop_front()) {
            return Some(Writing { bytes, written: 0, accepted_at: None });
        }
        let lend = (self.conn.transport.is_websocket() && self.io.socket.is_plain()).then(|| self.io.socket.as_raw_fd());
        match self.conn.pop(&self.clients.metrics, lend) {
            Next::Write(popped) => {
                let accepted_at = popped.message.as_ref().filter(|_| popped.queued).map(|m| m.accepted_at);
                let bytes = match popped.tail {
                    // An SSE event ends with this connection's cursor, so it is copied
                    // whole: one buffer keeps `Writing`, and so every record, small.
                    Some(tail) => Bytes::from([&popped.bytes[..], &tail[..]].concat()),
                    None => popped.bytes,
                };
                Some(Writing { bytes, written: 0, accepted_at })
            }
            Next::Nothing { lent } => {
                self.io.lent = lent;
                None
            }
        }
    }

    /// Whether the client must wait before more of what it sent is read: its replies are
    /// unsent, or as many of its requests as it may have are being served off the core.
    fn backed_up(&self) -> bool {
        self.io.replies() >= MAX_PENDING_REPLIES || self.conn.requests_full()
    }

    /// Sends a reply (a pong, a command's answer) now when nothing is owed ahead of it, as
    /// a heartbeat almost always finds; what the socket does not take waits in `Busy`,
    /// ahead of queued messages, as replies do.
    fn reply(&mut self, bytes: &[u8]) {
        let ahead = self.io.busy.as_ref().is_some_and(|b| b.writing.is_some() || !b.replies.is_empty()) || self.io.socket.has_unsent();
        let sent = match (ahead, self.io.lent) {
            (true, _) => 0,
            (false, true) => match self.conn.send_while_lent(bytes) {
                Some(sent) => {
                    // Short: the socket went back to the driver, for the rest first.
                    self.io.lent = sent == bytes.len();
                    sent
                }
                None => {
                    // A publisher left a message half-sent: it goes first.
                    self.reclaim();
                    0
                }
            },
            // A failure shows in the next write, where it closes the connection.
            (false, false) => self.io.socket.write(bytes).unwrap_or(0),
        };
        if sent == bytes.len() {
            return;
        }
        let rest = Bytes::copy_from_slice(&bytes[sent..]);
        let busy = self.io.busy();
        if sent > 0 {
            busy.writing = Some(Writing { bytes: rest, written: 0, accepted_at: None });
        } else {
            busy.replies.push_back(rest);
        }
    }

    /// Takes back the socket lent to publishers, with what one of them left half-sent.
    fn reclaim(&mut self) {
        self.io.lent = false;
        if let Some(partial) = self.conn.take_back(&self.clients.metrics) {
            let accepted_at = Some(partial.message.accepted_at);
            self.io.busy().writing = Some(Writing { bytes: partial.bytes, written: partial.written, accepted_at });
        }
    }

    /// Reads and handles what arrived, until the socket has no more, the replies back up,
    /// or the read budget is spent (`Left::More`).
    fn on_readable(&mut self) -> Result<Left, Stop> {
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let partial = self.io.take_partial();
            let mut filled = partial.len();
            scratch[..filled].copy_from_slice(&partial);
            drop(partial);
            let mut budget = READ_BUDGET;
            let result = loop {
                let room = scratch.len() - filled;
                match self.io.socket.read(&mut scratch[filled..]) {
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
                        if self.backed_up() {
                            // What is left waits in `partial` until the replies drain.
                            self.io.held_back = filled > 0;
                            break Ok(Left::Waiting);
                        }
                        if n < room && self.io.socket.is_plain() && !self.io.peer_closed {
                            // A short read drained the socket, sparing the read that would
                            // only say WouldBlock: whatever arrives after it raises a new edge.
                            // (TLS may hold decrypted bytes back, and an end-of-file that came
                            // with the bytes raises none: those read on, to WouldBlock or 0.)
                            self.io.readable = false;
                            break Ok(Left::Waiting);
                        }
                        if budget == 0 {
                            break Ok(Left::More);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.io.readable = false;
                        break Ok(Left::Waiting);
                    }
                    Err(_) => break Err(Stop(CloseReason::IoError)),
                }
            };
            if result.is_ok() && filled > 0 {
                self.io.busy().partial = scratch[..filled].into();
            }
            result
        })
    }

    /// Handles bytes already read: those that came with the handshake, or those held
    /// back while replies were backed up.
    fn on_held_bytes(&mut self) -> Result<(), Stop> {
        self.io.held_back = false;
        let mut bytes = self.io.take_partial().into_vec();
        let used = self.on_bytes(&mut bytes)?;
        bytes.drain(..used);
        self.io.held_back = !bytes.is_empty() && self.backed_up();
        if !bytes.is_empty() {
            self.io.busy().partial = bytes.into_boxed_slice();
        }
        Ok(())
    }

    /// Handles every complete frame at the start of `buf`; returns the bytes used.
    fn on_bytes(&mut self, buf: &mut [u8]) -> Result<usize, Stop> {
        if self.conn.transport == Transport::Sse {
            // An SSE client has nothing to say after its request; ignore what it sends.
            return Ok(buf.len());
        }
        // A message arriving in fragments is work in hand: meanwhile what the decoder holds
        // of it lives in `Busy`, and an idle connection holds no decoder.
        let mut decoder = self.io.busy.as_mut().map(|b| std::mem::take(&mut b.decoder)).unwrap_or_default();
        let used = self.decode(&mut decoder, buf);
        if !decoder.is_idle() {
            self.io.busy().decoder = decoder;
        }
        used
    }

    fn decode(&mut self, decoder: &mut ws::Decoder, buf: &mut [u8]) -> Result<usize, Stop> {
        let mut used = 0;
        loop {
            if self.backed_up() {
                return Ok(used);
            }
            match decoder.decode(&mut buf[used..], self.clients.max_message) {
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
        self.io.busy().replies.push_back(ws::close(e.close_code(), e.as_str()));
        Stop(CloseReason::ProtocolError)
    }

    fn on_event(&mut self, event: ws::Event<'_>) -> Result<(), Stop> {
        match event {
            ws::Event::Text(text) => {
                // This second's client events are counted in the window as it handles them.
                self.roll_second();
                let handled = match self.conn.transport {
                    Transport::Pusher => match pusher::handle(&text, self.conn, self.clients, &mut self.io.window) {
                        // pusher-js sends every subscribe at once when it connects: those
                        // count against the topic changes a minute, not the commands a
                        // second.
                        Ok(handled) if handled.topic_changes > 0 => handled,
                        Ok(handled) => {
                            self.count_command()?;
                            handled
                        }
                        Err(close) => {
                            self.io.busy().replies.push_back(ws::close(close.code, close.reason));
                            return Err(Stop(CloseReason::PolicyViolation));
                        }
                    },
                    _ => {
                        self.count_command()?;
                        commands::handle(&text, self.conn, self.clients, &mut self.io.window)
                    }
                };
                self.count_topic_changes(handled.topic_changes)?;
                if !handled.reply.is_empty() {
                    self.reply(&handled.reply);
                }
            }
            ws::Event::Ping(payload) => {
                probes::heartbeat(self.conn.session.0, 1);
                self.reply(ws::Control::new(ws::OP_PONG, payload).as_bytes());
            }
            ws::Event::Pong => probes::heartbeat(self.conn.session.0, 2),
            ws::Event::Binary => {
                self.clients.metrics.client_error(ClientError::BinaryFrame);
                let why = "binary messages are not accepted; send JSON text";
                match self.conn.transport {
                    Transport::Pusher => self.reply(&ws::text(&crate::pusher::error(None, why))),
                    _ => self.reply(&commands::error_reply(why)),
                }
            }
            ws::Event::Close { code } => {
                // Echo the client's code, as RFC 6455 5.5.1 asks.
                self.io.busy().replies.push_back(ws::close(code.unwrap_or(ws::CLOSE_NORMAL), ""));
                return Err(Stop(CloseReason::Client));
            }
        }
        Ok(())
    }

    fn policy_violation(&mut self, why: &str) -> Stop {
        self.clients.metrics.client_error(ClientError::OverLimit);
        self.io.busy().replies.push_back(ws::close(ws::CLOSE_POLICY_VIOLATION, why));
        Stop(CloseReason::PolicyViolation)
    }

    /// Starts the counts of a new second, when this is one.
    fn roll_second(&mut self) {
        let second = (clock::now_ms() / 1000) as u16;
        if self.io.window.second != second {
            self.io.window.second = second;
            self.io.window.commands = 0;
            self.io.window.publishes = 0;
        }
    }

    /// One more command this second, within `--max-commands-per-second`.
    fn count_command(&mut self) -> Result<(), Stop> {
        self.roll_second();
        self.io.window.commands += 1;
        if self.io.window.commands > self.clients.max_commands_per_second {
            return Err(self.policy_violation("too many commands per second"));
        }
        Ok(())
    }

    /// `changes` more topics subscribed or left this minute, within
    /// `--max-topic-changes-per-minute`.
    fn count_topic_changes(&mut self, changes: usize) -> Result<(), Stop> {
        let minute = (clock::now_ms() / 60_000) as u16;
        if self.io.window.minute != minute {
            self.io.window.minute = minute;
            self.io.window.topic_changes = 0;
        }
        self.io.window.topic_changes = self.io.window.topic_changes.saturating_add(changes.min(u16::MAX as usize) as u16);
        if self.io.window.topic_changes > self.clients.max_topic_changes_per_minute {
            return Err(self.policy_violation("too many topic changes per minute"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::io::Io;

    /// An idle connection is its `Conn` record (with its `Io`) and a key in its driver's
    /// table; these sizes are most of its memory (see README, "Memory per connection"), so
    /// growing them should be a decision.
    #[test]
    fn idle_connection_state_stays_small() {
        eprintln!("Conn {} Io {}", std::mem::size_of::<Conn>(), std::mem::size_of::<Io>());
        // `Arc<Conn>` adds 16 bytes of counts: up to 176 it stays in jemalloc's 192-byte class.
        assert!(std::mem::size_of::<Conn>() <= 176, "Conn is {} bytes", std::mem::size_of::<Conn>());
    }
}
