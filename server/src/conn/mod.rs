//! A connection: the handle a publisher delivers to, and the record its core's driver
//! serves it from.
//!
//! [`Conn`] holds the connection's bounded outbound queue ([`queue`]), its topics, the
//! time it last heard from the client, the signals (work, ping, close) that wake its
//! core's driver through the core's [`Inbox`], and its socket's side ([`io::Io`]), which
//! only that driver touches (`client`). Delivering takes the queue limits and metrics as
//! arguments: a `Conn` knows nothing of the hub that holds it.

pub mod inbox;
pub mod io;
pub mod queue;
pub mod tracking;

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use compact_str::CompactString;
use pushline_alloc::Site;
use thin_vec::ThinVec;

use crate::auth::Grant;
use crate::clock;
use crate::session::SessionId;
use crate::telemetry::{probes, CloseReason, DropReason, Metrics};
use crate::wire::{Message, Transport};
pub use inbox::Inbox;
use io::Io;
use queue::{Enqueued, Limits, Outbox};
use tracking::{Partial, Popped, Tracking};

/// What producers ask of a connection's driver, as bits set before waking it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Signals(u8);

impl Signals {
    pub const WORK: Signals = Signals(1);
    pub const PING: Signals = Signals(2);
    pub const CLOSE: Signals = Signals(4);
    /// Its token has expired: tell the client to refresh it.
    pub const EXPIRED: Signals = Signals(8);
    /// Topics whose per-subscription token expired were left: tell the client.
    pub const REVOKED: Signals = Signals(16);

    pub fn any(self) -> bool {
        self.0 != 0
    }

    pub fn has(self, other: Signals) -> bool {
        self.0 & other.0 != 0
    }
}

const NO_REASON: u8 = u8::MAX;
/// The key of a connection not yet in its driver's table.
const NO_KEY: u32 = u32::MAX;

/// What the driver is to write next.
pub enum Next {
    Write(Popped),
    /// Nothing; `lent`: the socket is now lent to publishers.
    Nothing { lent: bool },
}

/// Requests of one client served off its core at once (see `Conn::begin_request`).
pub const MAX_IN_FLIGHT: usize = 8;

/// The part of a connection that others see: the hub delivers into its queue, the sweeper
/// reads its last activity, the admin endpoints read it for introspection.
pub struct Conn {
    pub session: SessionId,
    /// Inline up to 24 bytes: most uids cost the record no allocation of their own.
    pub uid: CompactString,
    pub transport: Transport,
    /// A Pusher connection's app, its index in the configured apps; 0 for the others.
    pub app: u16,
    /// Tenths of a second of the process clock when the connection opened (13 years in a
    /// u32).
    opened_ds: u32,
    /// Milliseconds of the process clock, wrapping: only differences under 49 days are read.
    last_inbound_ms: AtomicU32,
    signals: AtomicU8,
    close_reason: AtomicU8,
    /// Requests of its client being served off its core (publishes, presence pages),
    /// at most [`MAX_IN_FLIGHT`]: past it, the driver reads nothing more from it.
    in_flight: AtomicU8,
    /// Its source address's entry in the per-address counts (`Admission`).
    pub address: u32,
    /// Its key in its driver's table, once there.
    key: AtomicU32,
    /// Its core's driver's, told of signals.
    inbox: Arc<Inbox>,
    outbox: Mutex<Outbox>,
    state: Mutex<ClientState>,
    /// The socket's side; taken out when the connection closes.
    io: Mutex<Option<Io>>,
}

/// What the connection's client asked for and was granted, changed by its commands.
#[derive(Default)]
pub struct ClientState {
    /// One pointer while empty (`ThinVec`), as most connections' are.
    pub topics: ThinVec<Arc<str>>,
    /// What its token grants, until when; None in open mode.
    pub grant: Option<Box<Grant>>,
}

/// One connection, as the debug endpoints show it.
#[derive(serde::Serialize)]
pub struct ConnInfo {
    pub uid: String,
    pub session: String,
    pub node: u16,
    pub transport: &'static str,
    pub topics: Vec<String>,
    pub age_ms: u64,
    /// Since the client last sent anything.
    pub idle_ms: u64,
    pub queued_messages: usize,
    pub queued_bytes: usize,
}

impl Conn {
    pub fn new(session: SessionId, uid: CompactString, (transport, app): (Transport, u16), grant: Option<Grant>, address: u32, inbox: Arc<Inbox>) -> Conn {
        let now = clock::now_ms();
        Conn {
            session,
            uid,
            transport,
            app,
            opened_ds: (now / 100) as u32,
            last_inbound_ms: AtomicU32::new(now as u32),
            signals: AtomicU8::new(0),
            close_reason: AtomicU8::new(NO_REASON),
            in_flight: AtomicU8::new(0),
            address,
            key: AtomicU32::new(NO_KEY),
            inbox,
            outbox: Mutex::new(Outbox::default()),
            state: Mutex::new(ClientState { topics: ThinVec::new(), grant: grant.map(Box::new) }),
            io: Mutex::new(None),
        }
    }

    fn signal(&self, signals: Signals) {
        if self.signals.fetch_or(signals.0, Ordering::AcqRel) & signals.0 != signals.0 {
            // Not yet in the driver's table: the driver takes the signals when it puts it
            // there. Once it has, the swap in `take_signals` that follows makes the key
            // seen here.
            let key = self.key.load(Ordering::Acquire);
            if key != NO_KEY {
                self.inbox.wake(key);
            }
        }
    }

    /// A request of its client starts being served off its core.
    pub fn begin_request(&self) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
    }

    /// A request that must be answered before the client's next is read (a subscribe
    /// the application decides: an unsubscribe sent after it must come after it) starts.
    pub fn begin_exclusive_request(&self) {
        self.in_flight.fetch_add(MAX_IN_FLIGHT as u8, Ordering::AcqRel);
    }

    /// A request served off its core is done: `answer` goes to the client (never dropped
    /// for room), which also wakes the driver, in case it stopped reading for it.
    pub fn answer_request(&self, answer: &str, limits: &Limits, metrics: &Metrics) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.answer(answer, limits, metrics);
    }

    /// An exclusive request is done (see [`Conn::begin_exclusive_request`]).
    pub fn answer_exclusive_request(&self, answers: &[&str], limits: &Limits, metrics: &Metrics) {
        self.in_flight.fetch_sub(MAX_IN_FLIGHT as u8, Ordering::AcqRel);
        for answer in answers {
            self.answer(answer, limits, metrics);
        }
    }

    fn answer(&self, answer: &str, limits: &Limits, metrics: &Metrics) {
        let answer = Site::Codec.scope(|| Arc::new(Message::answer(answer)));
        self.deliver(&answer, limits, metrics);
        // Written through a lent socket, the answer wakes no one: the driver may be
        // holding the client's next requests until one is answered.
        self.signal(Signals::WORK);
    }

    /// Whether its client has as many requests being served as it may.
    pub fn requests_full(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) as usize >= MAX_IN_FLIGHT
    }

    /// Takes the signals set since the last call.
    pub fn take_signals(&self) -> Signals {
        Signals(self.signals.swap(0, Ordering::AcqRel))
    }

    /// The driver put the connection in its table under `key`; signals from now on say so.
    pub fn keyed(&self, key: u32) {
        self.key.store(key, Ordering::Release);
    }

    /// The socket's side: only its driver (or, once closed, the task that finishes it)
    /// locks it, and never while holding the outbox.
    pub fn io(&self) -> MutexGuard<'_, Option<Io>> {
        self.io.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn outbox(&self) -> MutexGuard<'_, Outbox> {
        // A panic while holding the lock leaves a consistent queue; keep using it.
        self.outbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn state(&self) -> MutexGuard<'_, ClientState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands `msg` to the connection under `limits`; true if it was written or queued.
    /// When the driver has lent the socket (it owes nothing, the queue is empty), the
    /// message is written here and now, and the driver is not woken. Every message that
    /// does not make it is counted in `metrics` with its reason.
    pub fn deliver(&self, msg: &Arc<Message>, limits: &Limits, metrics: &Metrics) -> bool {
        if msg.terminates {
            self.request_close(CloseReason::Terminated);
            return true;
        }
        // A stream's notice (an `epoch_changed` gap from the append script) is not the
        // Pusher protocol's: a Pusher client has no gap to read.
        if self.transport == Transport::Pusher && msg.is_notice() {
            return true;
        }
        let bytes = msg.bytes(self.transport);
        let size = bytes.len();
        let since_ms = self.since_ms();
        let mut outbox = self.outbox();
        if let Some(fd) = outbox.lent() {
            let sent = send_lent(&outbox, fd, bytes);
            if sent == size as isize {
                drop(outbox);
                self.written(size, msg.accepted_at, metrics);
                return true;
            }
            if sent > 0 {
                Site::OutboundQueue.scope(|| outbox.half_sent(msg, self.transport, sent as usize, since_ms));
                // Counted as queued until the driver takes the rest (`take_back`); counted
                // before the lock is let go, so the driver never counts it off first.
                metrics.queued(1, size as isize - sent as isize);
                drop(outbox);
                self.signal(Signals::WORK);
                return true;
            }
            // The socket is full (or failed): the driver takes it from here, and will see
            // any error itself.
            outbox.take_back();
        }
        let outcome = Site::OutboundQueue.scope(|| outbox.push(msg, self.transport, limits, since_ms));
        if let Enqueued::Queued { dropped, dropped_bytes, .. } = outcome {
            // Under the lock, as above: the driver may pop it the moment the lock is free.
            metrics.queued(1 - dropped as isize, size as isize - dropped_bytes as isize);
        }
        drop(outbox);
        match outcome {
            Enqueued::Queued { dropped, depth, .. } => {
                probes::msg_enqueue(self.session.0, size, depth);
                metrics.dropped(DropReason::QueueFull, dropped);
                self.signal(Signals::WORK);
                true
            }
            Enqueued::Overflow { dropped, dropped_bytes } => {
                metrics.dropped(DropReason::SlowConsumer, dropped);
                // The new message was never counted as queued; the older ones were.
                metrics.queued(-(dropped as isize - 1), -((dropped_bytes - size) as isize));
                self.request_close(CloseReason::SlowConsumer);
                false
            }
            Enqueued::Closed => {
                metrics.dropped(DropReason::ConnectionClosed, 1);
                false
            }
        }
    }

    /// A published message of `bytes` went to the socket whole (by the driver, or by a
    /// publisher): counted, its latency from `accepted_at` recorded, and probed.
    pub fn written(&self, bytes: usize, accepted_at: std::time::Instant, metrics: &Metrics) {
        let latency = accepted_at.elapsed();
        probes::msg_write(self.session.0, bytes, latency.as_nanos() as u64);
        metrics.record_delivery(latency);
    }

    /// The next thing to write (see [`Outbox::pop`]). Queued messages taken out are
    /// counted off the queue gauges, and those the client already had as duplicates.
    /// When there is nothing, and `lend` is the socket's fd, the socket is lent to
    /// publishers in the same step (see [`Outbox::lend`]): `Nothing { lent: true }`.
    pub fn pop(&self, metrics: &Metrics, lend: Option<RawFd>) -> Next {
        let transport = self.transport;
        let since_ms = self.since_ms();
        let mut outbox = self.outbox();
        let popped = Site::OutboundQueue.scope(|| {
            outbox.pop(transport, since_ms, |skipped| {
                metrics.queued(-1, -(skipped.bytes(transport).len() as isize));
                metrics.deduplicated.increment(1);
            })
        });
        let Some(popped) = popped else {
            return Next::Nothing { lent: lend.is_some_and(|fd| outbox.lend(fd)) };
        };
        drop(outbox);
        if let Some(msg) = popped.message.as_ref().filter(|_| popped.queued || popped.replayed) {
            metrics.queued(-1, -(msg.bytes(transport).len() as isize));
        }
        Next::Write(popped)
    }

    /// Takes back the socket the driver lent, with what a publisher left half-sent (counted
    /// off the queue gauges: the driver writes it now).
    pub fn take_back(&self, metrics: &Metrics) -> Option<Partial> {
        let partial = self.outbox().take_back()?;
        metrics.queued(-1, -((partial.bytes.len() - partial.written) as isize));
        Some(partial)
    }

    /// Writes a reply of the driver's own (a pong, a command's answer) while the socket is
    /// lent, under the lock publishers write under, so it cannot land inside one of their
    /// frames and the socket stays lent: no taking it back and lending it again per ping.
    /// Returns the bytes sent, or None if the socket is not lent any more (the driver takes
    /// it back, with whatever a publisher left half-sent). When the socket took less than
    /// all of it, or failed, it goes back to the driver here, which writes the rest or sees
    /// the error.
    pub fn send_while_lent(&self, bytes: &[u8]) -> Option<usize> {
        let mut outbox = self.outbox();
        let fd = outbox.lent()?;
        let sent = send_lent(&outbox, fd, bytes).max(0) as usize;
        if sent < bytes.len() {
            // Nothing is half-sent while the socket is lent: a publisher that leaves a
            // remainder takes the socket from the driver's hands first (`half_sent`).
            let _none = outbox.take_back();
        }
        Some(sent)
    }

    /// Replays what a resume found before anything queued since the connection
    /// registered; it counts as queued until written.
    pub fn resume(&self, tracking: Tracking, metrics: &Metrics) {
        let (messages, bytes) = tracking.replay_left();
        metrics.queued(messages as isize, bytes as isize);
        Site::History.scope(|| self.outbox().resume(tracking));
        self.signal(Signals::WORK);
    }

    /// The `since` of its cursor: wall-clock ms just after the connection opened (the end
    /// of its tenth of a second). Not before: a client whose `since` came before its
    /// history began (a node's start, the first append after a flush) is told its empty
    /// streams are `unknown`, and the start of the second (as it was) fell before a node's
    /// start for clients that came within that second. Nothing is missed by it being
    /// later: a resume reads from `since` less a 5 s margin.
    pub fn since_ms(&self) -> u64 {
        clock::wall_ms_at((self.opened_ds as u64 + 1) * 100)
    }

    /// Whether its queue was stopped: it is closing, or closed.
    pub fn is_closed(&self) -> bool {
        self.outbox().is_closed()
    }

    /// Stops the queue and counts what was left in it.
    pub fn close_outbox(&self, metrics: &Metrics) {
        let (messages, bytes) = self.outbox().close();
        metrics.dropped(DropReason::ConnectionClosed, messages);
        metrics.queued(-(messages as isize), -(bytes as isize));
    }

    /// Asks the driver to close the connection; the first reason given wins.
    pub fn request_close(&self, reason: CloseReason) {
        let _ = self.close_reason.compare_exchange(NO_REASON, reason as u8, Ordering::AcqRel, Ordering::Acquire);
        self.signal(Signals::CLOSE);
    }

    /// Why the connection was asked to close (after a `CLOSE` signal).
    pub fn close_reason(&self) -> Option<CloseReason> {
        CloseReason::from_repr(self.close_reason.load(Ordering::Acquire))
    }

    /// A WebSocket ping, or an SSE keep-alive comment.
    pub fn ping(&self) {
        self.signal(Signals::PING);
    }

    /// Milliseconds since the client last sent anything.
    pub fn silent_ms(&self, now_ms: u64) -> u64 {
        let silent = (now_ms as u32).wrapping_sub(self.last_inbound_ms.load(Ordering::Relaxed));
        // Heard from after `now_ms` was read (the sweeper reads it once per pass, and a pass
        // over a million connections takes milliseconds): not silent, rather than 49 days.
        if silent > u32::MAX / 2 {
            0
        } else {
            silent as u64
        }
    }

    /// Milliseconds since the connection opened.
    pub fn age_ms(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.opened_ds as u64 * 100)
    }

    /// The client just sent something.
    pub fn heard_from(&self, now_ms: u64) {
        self.last_inbound_ms.store(now_ms as u32, Ordering::Relaxed);
    }

    /// Tells the driver the token has expired (it tells the client).
    pub fn token_expired(&self) {
        self.signal(Signals::EXPIRED);
    }

    /// Tells the driver topics were left because their tickets expired (it tells the client).
    pub fn tickets_expired(&self) {
        self.signal(Signals::REVOKED);
    }

    /// Since when (process-clock ms) the queue has been full without being read from.
    pub fn full_since_ms(&self) -> Option<u64> {
        self.outbox().full_since_ms()
    }

    pub fn queued(&self) -> (usize, usize) {
        let q = self.outbox();
        (q.len(), q.bytes())
    }

    pub fn info(&self, now_ms: u64) -> ConnInfo {
        let (queued_messages, queued_bytes) = self.queued();
        ConnInfo {
            uid: self.uid.to_string(),
            session: self.session.to_string(),
            node: self.session.node(),
            transport: self.transport.as_str(),
            topics: self.state().topics.iter().map(|t| t.to_string()).collect(),
            age_ms: self.age_ms(now_ms),
            idle_ms: self.silent_ms(now_ms),
            queued_messages,
            queued_bytes,
        }
    }
}

/// Sends on the socket `fd` lent to publishers, without blocking or raising SIGPIPE.
/// `_held` is the outbox whose lock the caller holds, which is what makes `fd` safe to use.
fn send_lent(_held: &Outbox, fd: RawFd, bytes: &[u8]) -> isize {
    // SAFETY: `bytes` is valid for its length. While the socket is lent the driver neither
    // writes to it nor closes it: it takes it back under the outbox lock first, and the
    // outbox is closed, under that lock, before the fd is.
    unsafe { libc::send(fd, bytes.as_ptr().cast(), bytes.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SlowConsumer;
    use crate::session::SessionIds;
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    /// A frame heard after the sweeper read its clock is not 49 days of silence.
    #[test]
    fn heard_after_the_sweeper_read_the_clock_is_not_silent() {
        let conn = Conn::new(SessionIds::new(0).next(), "u".into(), (Transport::WebSocket, 0), None, 0, Arc::default());
        let now = clock::now_ms() + 10_000;
        conn.heard_from(now - 250);
        assert_eq!(conn.silent_ms(now), 250);
        conn.heard_from(now + 3);
        assert_eq!(conn.silent_ms(now), 0);
    }

    /// A reply written while the socket is lent keeps it lent, so the next publish is still
    /// written directly, after the reply; a socket too full for a reply goes back to the
    /// driver, and what is published next waits in the queue.
    #[test]
    fn a_reply_while_lent_keeps_the_order_and_a_full_socket_goes_back_to_the_driver() {
        let (ours, mut client) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let metrics = Metrics::new();
        let limits = Limits { max_messages: 8, max_bytes: 1 << 20, policy: SlowConsumer::DropOldest };
        let conn = Conn::new(SessionIds::new(0).next(), "u".into(), (Transport::WebSocket, 0), None, 0, Arc::default());
        assert!(matches!(conn.pop(&metrics, Some(ours.as_raw_fd())), Next::Nothing { lent: true }));

        let pong = crate::wire::ws::text(r#"{"type":"pong"}"#);
        assert_eq!(conn.send_while_lent(&pong), Some(pong.len()));
        let msg = Arc::new(Message::new(1, None, "1", None, std::time::Instant::now()));
        assert!(conn.deliver(&msg, &limits, &metrics));
        assert_eq!(conn.queued(), (0, 0), "still lent: written, not queued");
        let frame = msg.bytes(Transport::WebSocket);
        let mut got = vec![0u8; pong.len() + frame.len()];
        client.read_exact(&mut got).unwrap();
        assert_eq!(&got[..pong.len()], &pong[..]);
        assert_eq!(&got[pong.len()..], &frame[..]);

        // Fill the socket until it takes nothing more.
        let mut filler = &ours;
        while filler.write(&[0u8; 65536]).is_ok() {}
        assert_eq!(conn.send_while_lent(&pong), Some(0));
        assert_eq!(conn.send_while_lent(&pong), None, "the socket is the driver's again");
        assert!(conn.deliver(&msg, &limits, &metrics));
        assert_eq!(conn.queued().0, 1, "queued for the driver, behind the reply it now owes");
    }
}
