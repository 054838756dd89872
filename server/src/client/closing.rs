//! How a connection ends: what it still owes is written (bounded in time), then its close
//! frame, its write side is shut, and what the client still sends is read and discarded
//! ([`linger`]). Whichever way it ends, dropping its [`Closing`] unregisters it and
//! counts why.
//!
//! A closing connection waits on its socket through tokio's reactor, on a task of its own:
//! closes are rare and short, and the driver serves only connections that never wait.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::clock;
use crate::conn::io::Io;
use crate::conn::Conn;
use crate::telemetry::{probes, CloseReason, DropReason};
use crate::pusher;
use crate::wire::{ws, Transport};

use super::{Clients, Serving, SCRATCH};

/// How long a closing connection may take to write its last bytes and close frame.
const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// After its close frame, how long and how many bytes a closing connection reads and
/// discards before closing: closed with unread input, the kernel would answer with a
/// reset, and the client would lose the close frame (and why) before reading it.
const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1024 * 1024;

/// A connection taken out of its driver to be closed.
pub struct Closing {
    conn: Arc<Conn>,
    io: Io,
    clients: Arc<Clients>,
    reason: CloseReason,
}

impl Drop for Closing {
    fn drop(&mut self) {
        let metrics = &self.clients.metrics;
        if self.io.writing().is_some_and(|w| w.accepted_at.is_some()) {
            metrics.dropped(DropReason::ConnectionClosed, 1);
        }
        self.conn.close_outbox(metrics);
        probes::conn_close(self.conn.session.0, self.reason as u8, self.conn.age_ms(clock::now_ms()));
        self.clients.hub.unregister(&self.conn, self.reason);
        self.clients.admission.release(self.conn.address);
    }
}

/// The socket's fd, for the reactor to watch while the connection closes; the socket
/// itself stays in the `Io`, which outlives it.
struct Watched(RawFd);

impl AsRawFd for Watched {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// Ends a connection its driver has let go of: at once after an I/O error, or on a task
/// that writes what it still owes first.
pub fn close(conn: Arc<Conn>, io: Io, clients: Arc<Clients>, reason: CloseReason) {
    let closing = Closing { conn, io, clients, reason };
    if reason != CloseReason::IoError {
        tokio::spawn(closing.finish());
    }
}

/// Ends a connection at once, writing nothing more (its runtime is ending).
pub fn drop_now(conn: Arc<Conn>, io: Io, clients: Arc<Clients>, reason: CloseReason) {
    drop(Closing { conn, io, clients, reason });
}

impl Closing {
    /// Writes what the connection still owes the client (queued messages on a graceful
    /// shutdown, then the close frame), bounded in time, then closes the socket.
    async fn finish(mut self) {
        let reason = self.reason;
        let metrics = self.clients.metrics.clone();
        if reason != CloseReason::Shutdown {
            self.conn.close_outbox(&metrics);
        }
        let close = match (self.conn.transport, reason) {
            (Transport::Sse, _) => None,
            (Transport::WebSocket, CloseReason::Shutdown) => Some(ws::close(ws::CLOSE_GOING_AWAY, "server shutting down")),
            (Transport::WebSocket, CloseReason::IdleTimeout) => Some(ws::close(ws::CLOSE_NORMAL, "idle timeout")),
            (Transport::WebSocket, CloseReason::SlowConsumer) => {
                Some(ws::close(ws::CLOSE_TRY_AGAIN_LATER, "slow consumer: outbound queue full"))
            }
            (Transport::WebSocket, CloseReason::TokenExpired) => Some(ws::close(ws::CLOSE_TOKEN_EXPIRED, "token expired")),
            (Transport::Pusher, CloseReason::Shutdown) => Some(ws::close(pusher::CLOSE_RECONNECT, "server shutting down")),
            (Transport::Pusher, CloseReason::IdleTimeout) => Some(ws::close(pusher::CLOSE_NO_PONG, "idle timeout: no ping or pong in time")),
            (Transport::Pusher, CloseReason::SlowConsumer) => Some(ws::close(pusher::CLOSE_OVER_CAPACITY, "slow consumer: outbound queue full")),
            (Transport::Pusher, CloseReason::Terminated) => Some(ws::close(pusher::CLOSE_TERMINATED, "You got disconnected by the app.")),
            // Client closes and protocol errors already queued their close frame.
            (Transport::WebSocket | Transport::Pusher, _) => None,
        };
        // SAFETY: the fd is the socket's, which `self.io` holds open until after `watched`
        // is dropped below.
        let Ok(watched) = (unsafe { AsyncFd::register_with_interest(Watched(self.io.socket.as_raw_fd()), Interest::WRITABLE) }) else { return };
        let drained = tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, async {
            if !self.flush_all(&watched).await {
                return false;
            }
            self.conn.close_outbox(&metrics);
            if let Some(frame) = close {
                self.io.busy().replies.push_back(frame);
                if !self.flush_all(&watched).await {
                    return false;
                }
            }
            self.io.socket.close_tls();
            if !self.flush_all(&watched).await {
                return false;
            }
            let _ = self.io.socket.tcp().shutdown(std::net::Shutdown::Write);
            true
        })
        .await;
        drop(watched);
        match drained {
            Ok(true) => self.linger_apart(),
            Ok(false) => {}
            Err(_) => tracing::debug!(session = %self.conn.session, "close frame not taken in time"),
        }
    }

    /// Flushes until nothing is left; false if the socket failed.
    async fn flush_all(&mut self, watched: &AsyncFd<Watched>) -> bool {
        loop {
            let mut ready = match watched.writable().await {
                Ok(ready) => ready,
                Err(_) => return false,
            };
            match (Serving { io: &mut self.io, conn: &self.conn, clients: &self.clients }).flush() {
                Ok(true) => return true,
                Ok(false) => ready.clear_ready(),
                Err(_) => return false,
            }
        }
    }

    /// Leaves the closed socket's read side to a task of its own, on a duplicate of its
    /// descriptor, which [`linger`]s; this connection then ends (unregistered and counted
    /// at once: lingering is the socket's business, not the connection's).
    fn linger_apart(&self) {
        // The duplicate shares the original's non-blocking mode.
        let Ok(stream) = self.io.socket.tcp().try_clone() else { return };
        let Ok(stream) = tokio::net::TcpStream::from_std(stream) else { return };
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
