//! A client connection after its handshake: the handle the hub delivers to, and the task
//! that owns the socket.
//!
//! An idle connection costs its task (the socket, a few words of state) and its `Conn`
//! handle; nothing else. There is no read buffer while idle: when the socket is readable
//! the task reads into a per-thread scratch buffer and keeps only the tail of an
//! incomplete frame. There is no per-connection timer: the sweeper (`sweep.rs`) checks
//! idle deadlines and due pings for every connection at once, and signals the task.

pub mod queue;
pub mod sweep;
pub mod wire;

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use atomic_waker::AtomicWaker;
use bytes::Bytes;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::alloc::sites::Site;
use crate::hub::{Hub, Slot};
use crate::probes;
use crate::session::SessionId;
use crate::telemetry::{ClientError, CloseReason, DropReason};
use queue::{Enqueued, Outbox};
use wire::{Message, Transport};

/// Signal bits a producer sets on a `Conn` before waking its task.
const SIGNAL_WORK: u8 = 1;
const SIGNAL_PING: u8 = 2;
const SIGNAL_CLOSE: u8 = 4;

const NO_REASON: u8 = u8::MAX;

/// How long a closing connection may take to write its last bytes and close frame.
const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// Bytes read per wake-up before the task lets others run.
const READ_BUDGET: usize = 256 * 1024;

/// Milliseconds since the process started; the clock idle deadlines are kept in.
pub fn clock_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// The part of a connection that others see: the hub delivers into its queue, the sweeper
/// reads its last activity, the admin endpoints read it for introspection.
pub struct Conn {
    pub session: SessionId,
    pub uid: Arc<str>,
    pub transport: Transport,
    pub opened_ms: u64,
    last_inbound_ms: AtomicU64,
    signals: AtomicU8,
    close_reason: AtomicU8,
    waker: AtomicWaker,
    outbox: Mutex<Outbox>,
    topics: Mutex<Vec<Arc<str>>>,
}

impl Conn {
    pub fn new(session: SessionId, uid: Arc<str>, transport: Transport) -> Conn {
        let now = clock_ms();
        Conn {
            session,
            uid,
            transport,
            opened_ms: now,
            last_inbound_ms: AtomicU64::new(now),
            signals: AtomicU8::new(0),
            close_reason: AtomicU8::new(NO_REASON),
            waker: AtomicWaker::new(),
            outbox: Mutex::new(Outbox::default()),
            topics: Mutex::new(Vec::new()),
        }
    }

    fn signal(&self, bits: u8) {
        if self.signals.fetch_or(bits, Ordering::AcqRel) & bits != bits {
            self.waker.wake();
        }
    }

    fn outbox(&self) -> MutexGuard<'_, Outbox> {
        // A panic while holding the lock leaves a consistent queue; keep using it.
        self.outbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn topics(&self) -> MutexGuard<'_, Vec<Arc<str>>> {
        self.topics.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `msg` for this connection under the queue limits; true if it was queued.
    /// Every message that does not make it is counted with its reason.
    pub fn deliver(&self, msg: &Arc<Message>, hub: &Hub) -> bool {
        let size = msg.bytes(self.transport).len();
        let outcome = Site::OutboundQueue.scope(|| self.outbox().push(msg, self.transport, hub.limits()));
        let metrics = hub.metrics();
        match outcome {
            Enqueued::Queued { dropped, dropped_bytes, depth } => {
                probes::msg_enqueue(self.session.0, size, depth);
                metrics.dropped(DropReason::QueueFull, dropped);
                metrics.queued(1 - dropped as isize, size as isize - dropped_bytes as isize);
                self.signal(SIGNAL_WORK);
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

    fn pop(&self, hub: &Hub) -> Option<Arc<Message>> {
        let msg = self.outbox().pop(self.transport)?;
        hub.metrics().queued(-1, -(msg.bytes(self.transport).len() as isize));
        Some(msg)
    }

    /// Stops the queue and counts what was left in it.
    fn close_outbox(&self, hub: &Hub) {
        let (messages, bytes) = self.outbox().close();
        hub.metrics().dropped(DropReason::ConnectionClosed, messages);
        hub.metrics().queued(-(messages as isize), -(bytes as isize));
    }

    /// Asks the task to close the connection; the first reason given wins.
    pub fn request_close(&self, reason: CloseReason) {
        let _ = self.close_reason.compare_exchange(NO_REASON, reason as u8, Ordering::AcqRel, Ordering::Acquire);
        self.signal(SIGNAL_CLOSE);
    }

    /// A WebSocket ping, or an SSE keep-alive comment.
    pub fn ping(&self) {
        self.signal(SIGNAL_PING);
    }

    pub fn last_inbound_ms(&self) -> u64 {
        self.last_inbound_ms.load(Ordering::Relaxed)
    }

    pub fn queued(&self) -> (usize, usize) {
        let q = self.outbox();
        (q.len(), q.bytes())
    }
}

thread_local! {
    /// Where every connection on this thread reads into; only the tail of an incomplete
    /// frame is copied out to the connection.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(Site::Codec.scope(|| vec![0; 64 * 1024]));
}

/// The largest client frame the scratch buffer can hold whole.
pub const MAX_CLIENT_FRAME: usize = 60 * 1024;

/// `{"type":"pong"}` as a server text frame.
pub(crate) const PONG: &[u8] = b"\x81\x0f{\"type\":\"pong\"}";

/// Reads once into `buf`. A short read means the socket is drained, so it also clears
/// the socket's readiness, sparing the read that would only say WouldBlock. That is safe:
/// tokio snapshots readiness before the read, and data arriving after it re-arms it.
fn read_once(stream: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let mut got = 0;
    let outcome = stream.try_io(tokio::io::Interest::READABLE, || {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the whole call.
        let n = unsafe { libc::recv(stream.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        got = n as usize;
        if got > 0 && got < buf.len() {
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(got)
        }
    });
    match outcome {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && got > 0 => Ok(got),
        other => other,
    }
}

/// A frame partly written to the socket.
struct Writing {
    bytes: Bytes,
    written: usize,
    /// Set for published messages, whose delivery is counted and timed.
    accepted_at: Option<Instant>,
}

enum Event {
    Signals(u8),
    Readable,
    Writable,
    Failed,
}

/// The end of a connection's task, and why.
struct Stop(CloseReason);

/// Owns the socket of one connection. Dropping it unregisters the connection and counts
/// why it closed, whichever way the task ended.
struct Task {
    stream: TcpStream,
    conn: Arc<Conn>,
    hub: Arc<Hub>,
    /// Inbound bytes of a frame not yet complete; empty (unallocated) between frames.
    partial: Vec<u8>,
    /// A fragmented message being reassembled; empty (unallocated) otherwise.
    fragments: Vec<u8>,
    in_fragmented_message: bool,
    /// Replies (pongs, acks, errors) written before queued messages.
    replies: VecDeque<Bytes>,
    writing: Option<Writing>,
    reason: CloseReason,
    _slot: Slot,
}

impl Drop for Task {
    fn drop(&mut self) {
        if self.writing.as_ref().is_some_and(|w| w.accepted_at.is_some()) {
            self.hub.metrics().dropped(DropReason::ConnectionClosed, 1);
        }
        self.conn.close_outbox(&self.hub);
        probes::conn_close(self.conn.session.0, self.reason as u8, clock_ms().saturating_sub(self.conn.opened_ms));
        self.hub.unregister(&self.conn, self.reason);
    }
}

/// Serves a registered connection until it closes. `first` is the welcome frame,
/// `early` any bytes the client sent right after its handshake.
///
/// Not an `async fn`: one would keep its arguments in the future beside the `Task`
/// they are moved into, for the connection's whole life.
pub fn serve(
    stream: TcpStream,
    conn: Arc<Conn>,
    hub: Arc<Hub>,
    slot: Slot,
    first: Bytes,
    early: Vec<u8>,
) -> impl std::future::Future<Output = ()> + Send {
    let mut task = Task {
        stream,
        conn,
        hub,
        partial: early,
        fragments: Vec::new(),
        in_fragmented_message: false,
        replies: VecDeque::new(),
        writing: Some(Writing { bytes: first, written: 0, accepted_at: None }),
        reason: CloseReason::IoError,
        _slot: slot,
    };
    // An `async move` block that uses `task` in place: an `async fn` taking the task (or
    // these arguments) would hold a second copy of it in the future for its whole life.
    async move {
        // Frames that arrived with the handshake are handled as if just read.
        let reason = match task.on_early_bytes() {
            Ok(()) => task.run().await,
            Err(Stop(reason)) => reason,
        };
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
            let event = poll_fn(|cx| self.poll_event(cx)).await;
            let step = match event {
                Event::Signals(bits) => self.on_signals(bits),
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
        self.conn.waker.register(cx.waker());
        let bits = self.conn.signals.swap(0, Ordering::AcqRel);
        if bits != 0 {
            return Poll::Ready(Event::Signals(bits));
        }
        if self.writing.is_some() {
            if let Poll::Ready(r) = self.stream.poll_write_ready(cx) {
                return Poll::Ready(if r.is_ok() { Event::Writable } else { Event::Failed });
            }
        }
        match self.stream.poll_read_ready(cx) {
            Poll::Ready(Ok(())) => Poll::Ready(Event::Readable),
            Poll::Ready(Err(_)) => Poll::Ready(Event::Failed),
            Poll::Pending => Poll::Pending,
        }
    }

    fn on_signals(&mut self, bits: u8) -> Result<(), Stop> {
        if bits & SIGNAL_CLOSE != 0 {
            let reason = CloseReason::from_u8(self.conn.close_reason.load(Ordering::Acquire));
            return Err(Stop(reason.unwrap_or(CloseReason::Shutdown)));
        }
        if bits & SIGNAL_PING != 0 {
            self.replies.push_back(match self.conn.transport {
                Transport::WebSocket => wire::ws_frame(wire::OP_PING, b""),
                Transport::Sse => Bytes::from_static(wire::SSE_KEEPALIVE),
            });
        }
        Ok(())
    }

    /// Writes replies, then queued messages, until done or the socket would block.
    /// Returns true when nothing is left to write.
    fn flush(&mut self) -> io::Result<bool> {
        loop {
            let writing = match &mut self.writing {
                Some(w) => w,
                None => {
                    let next = if let Some(bytes) = self.replies.pop_front() {
                        Writing { bytes, written: 0, accepted_at: None }
                    } else if let Some(msg) = self.conn.pop(&self.hub) {
                        Writing { bytes: msg.bytes(self.conn.transport).clone(), written: 0, accepted_at: Some(msg.accepted_at) }
                    } else {
                        return Ok(true);
                    };
                    self.writing.insert(next)
                }
            };
            match self.stream.try_write(&writing.bytes[writing.written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    writing.written += n;
                    if writing.written == writing.bytes.len() {
                        if let Some(accepted_at) = writing.accepted_at {
                            let latency = accepted_at.elapsed();
                            probes::msg_write(self.conn.session.0, writing.bytes.len(), latency.as_nanos() as u64);
                            let metrics = self.hub.metrics();
                            metrics.delivered.increment(1);
                            metrics.delivery_latency.record(latency.as_secs_f64());
                        }
                        self.writing = None;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
    }

    /// Flushes until nothing is left; false if the socket failed.
    async fn flush_all(&mut self) -> bool {
        loop {
            match self.flush() {
                Ok(true) => return true,
                Ok(false) => {
                    if self.stream.writable().await.is_err() {
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
            self.partial = Vec::new();
            let mut budget = READ_BUDGET;
            let result = loop {
                match read_once(&self.stream, &mut scratch[filled..]) {
                    Ok(0) => break Err(Stop(CloseReason::Client)),
                    Ok(n) => {
                        self.conn.last_inbound_ms.store(clock_ms(), Ordering::Relaxed);
                        filled += n;
                        let used = match self.on_bytes(&mut scratch[..filled]) {
                            Ok(used) => used,
                            Err(stop) => break Err(stop),
                        };
                        scratch.copy_within(used..filled, 0);
                        filled -= used;
                        budget = budget.saturating_sub(n);
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
                self.partial = scratch[..filled].to_vec();
            }
            result
        })
    }

    /// Handles bytes that arrived together with the handshake.
    fn on_early_bytes(&mut self) -> Result<(), Stop> {
        if self.partial.is_empty() {
            return Ok(());
        }
        let mut bytes = std::mem::take(&mut self.partial);
        let used = self.on_bytes(&mut bytes)?;
        bytes.drain(..used);
        self.partial = bytes;
        Ok(())
    }

    /// Handles every complete frame at the start of `buf`; returns the bytes used.
    fn on_bytes(&mut self, buf: &mut [u8]) -> Result<usize, Stop> {
        if self.conn.transport == Transport::Sse {
            // An SSE client has nothing to say after its request; ignore what it sends.
            return Ok(buf.len());
        }
        let max = self.hub.config().max_client_frame_bytes;
        let mut used = 0;
        loop {
            match wire::decode_client_frame(&mut buf[used..], max) {
                Ok(Some(head)) => {
                    let payload = (used + head.payload.start)..(used + head.payload.end);
                    used += head.len;
                    self.on_frame(head.fin, head.opcode, &buf[payload])?;
                }
                Ok(None) => return Ok(used),
                Err(e) => return Err(self.protocol_error(e)),
            }
        }
    }

    fn protocol_error(&mut self, e: wire::ProtocolError) -> Stop {
        tracing::debug!(session = %self.conn.session, error = e.as_str(), "closing on protocol error");
        self.replies.push_back(wire::ws_close(e.close_code(), e.as_str()));
        Stop(CloseReason::ProtocolError)
    }

    fn on_frame(&mut self, fin: bool, opcode: u8, payload: &[u8]) -> Result<(), Stop> {
        match opcode {
            wire::OP_PING => {
                probes::heartbeat(self.conn.session.0, 1);
                self.replies.push_back(wire::ws_frame(wire::OP_PONG, payload));
                Ok(())
            }
            wire::OP_PONG => {
                probes::heartbeat(self.conn.session.0, 2);
                Ok(())
            }
            wire::OP_CLOSE => {
                // Echo the client's code, as RFC 6455 5.5.1 asks.
                let code = match payload {
                    [a, b, ..] => u16::from_be_bytes([*a, *b]),
                    _ => wire::CLOSE_NORMAL,
                };
                self.replies.push_back(wire::ws_close(code, ""));
                Err(Stop(CloseReason::Client))
            }
            wire::OP_CONTINUATION => {
                if !self.in_fragmented_message {
                    return Err(self.protocol_error(wire::ProtocolError::UnexpectedContinuation));
                }
                if self.fragments.len() + payload.len() > self.hub.config().max_client_frame_bytes {
                    return Err(self.protocol_error(wire::ProtocolError::TooBig));
                }
                self.fragments.extend_from_slice(payload);
                if fin {
                    self.in_fragmented_message = false;
                    let message = std::mem::take(&mut self.fragments);
                    self.on_text(&message)?;
                }
                Ok(())
            }
            wire::OP_TEXT | wire::OP_BINARY => {
                if self.in_fragmented_message {
                    return Err(self.protocol_error(wire::ProtocolError::UnexpectedContinuation));
                }
                if opcode == wire::OP_BINARY {
                    self.hub.metrics().client_error(ClientError::BinaryFrame);
                    self.reply_error("binary frames are not accepted; send JSON text");
                    // Its continuations are still read, then discarded.
                    self.in_fragmented_message = !fin;
                    return Ok(());
                }
                if fin {
                    self.on_text(payload)
                } else {
                    self.in_fragmented_message = true;
                    self.fragments.extend_from_slice(payload);
                    Ok(())
                }
            }
            _ => Err(self.protocol_error(wire::ProtocolError::UnknownOpcode(opcode))),
        }
    }

    fn on_text(&mut self, text: &[u8]) -> Result<(), Stop> {
        #[derive(Deserialize)]
        struct ClientFrame<'a> {
            #[serde(rename = "type", borrow)]
            kind: std::borrow::Cow<'a, str>,
            #[serde(default)]
            topics: Vec<String>,
        }
        // The heartbeat, every 270 s from every client: answered without parsing.
        if text == br#"{"type":"ping"}"# {
            probes::heartbeat(self.conn.session.0, 0);
            self.replies.push_back(Bytes::from_static(PONG));
            return Ok(());
        }
        if std::str::from_utf8(text).is_err() {
            return Err(self.protocol_error(wire::ProtocolError::InvalidUtf8));
        }
        let frame: ClientFrame = match serde_json::from_slice(text) {
            Ok(frame) => frame,
            Err(e) => {
                self.hub.metrics().client_error(ClientError::BadJson);
                self.reply_error(&format!("bad JSON: {e}"));
                return Ok(());
            }
        };
        match &*frame.kind {
            "ping" => {
                probes::heartbeat(self.conn.session.0, 0);
                self.replies.push_back(Bytes::from_static(PONG));
            }
            "subscribe" => match self.hub.subscribe(&self.conn, &frame.topics) {
                Ok(()) => self.reply_topics("subscribed", &frame.topics),
                Err(e) => {
                    self.hub.metrics().client_error(ClientError::TooManyTopics);
                    self.reply_error(&e);
                }
            },
            "unsubscribe" => {
                self.hub.unsubscribe(&self.conn, &frame.topics);
                self.reply_topics("unsubscribed", &frame.topics);
            }
            other => {
                self.hub.metrics().client_error(ClientError::UnknownType);
                self.reply_error(&format!("unknown type `{other}`; expected ping, subscribe or unsubscribe"));
            }
        }
        Ok(())
    }

    fn reply_topics(&mut self, kind: &str, topics: &[String]) {
        let json = serde_json::json!({ "type": kind, "topics": topics });
        self.replies.push_back(wire::ws_text(&json.to_string()));
    }

    fn reply_error(&mut self, error: &str) {
        let json = serde_json::json!({ "type": "error", "error": error });
        self.replies.push_back(wire::ws_text(&json.to_string()));
    }

    /// Writes what the connection still owes the client (queued messages on a graceful
    /// shutdown, then the close frame), bounded in time, then closes the socket.
    async fn finish(&mut self, reason: CloseReason) {
        self.reason = reason;
        if reason != CloseReason::Shutdown {
            self.conn.close_outbox(&self.hub);
        }
        if reason == CloseReason::IoError {
            return;
        }
        let close = match (self.conn.transport, reason) {
            (Transport::Sse, _) => None,
            (Transport::WebSocket, CloseReason::Shutdown) => Some(wire::ws_close(wire::CLOSE_GOING_AWAY, "server shutting down")),
            (Transport::WebSocket, CloseReason::IdleTimeout) => Some(wire::ws_close(wire::CLOSE_NORMAL, "idle timeout")),
            (Transport::WebSocket, CloseReason::SlowConsumer) => {
                Some(wire::ws_close(wire::CLOSE_TRY_AGAIN_LATER, "slow consumer: outbound queue full"))
            }
            // Client closes and protocol errors already queued their close frame.
            (Transport::WebSocket, _) => None,
        };
        let drained = tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, async {
            if !self.flush_all().await {
                return;
            }
            self.conn.close_outbox(&self.hub);
            if let Some(frame) = close {
                self.replies.push_back(frame);
                if !self.flush_all().await {
                    return;
                }
            }
            let _ = self.stream.shutdown().await;
        })
        .await;
        if drained.is_err() {
            tracing::debug!(session = %self.conn.session, "close frame not taken in time");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An idle connection is its task and its `Conn`; these sizes are most of its memory
    /// (see README, "Memory per connection"), so growing them should be a decision.
    #[tokio::test]
    async fn idle_connection_state_stays_small() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let hub = Arc::new(Hub::new(crate::Config::for_loopback(), 0, Arc::new(crate::telemetry::Metrics::new()), None));
        let slot = hub.reserve().ok().unwrap();
        let conn = Arc::new(Conn::new(hub.session_ids.next(), "u".into(), Transport::WebSocket));
        let future = serve(stream, conn, hub, slot, Bytes::new(), Vec::new());
        assert!(std::mem::size_of_val(&future) <= 256, "connection future is {} bytes", std::mem::size_of_val(&future));
        assert!(std::mem::size_of::<Conn>() <= 160, "Conn is {} bytes", std::mem::size_of::<Conn>());
    }
}
