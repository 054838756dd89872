//! The client listener: binding (with SO_REUSEPORT when asked), the open-file limit, an
//! accept loop that survives a full file table, and the one place a new connection is
//! routed: its request head is read here, then `/ws` and `/sse` go to the gateway and
//! everything else to the publish API. Neither knows the other.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use pushline_alloc::Site;
use socket2::{Domain, Protocol, Type};
use tokio::io::unix::AsyncFd;
use tokio::io::AsyncWriteExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::api::Api;
use crate::cores::Cores;
use crate::error::{Error, Kind};
use crate::gateway::Gateway;
use crate::http::{self, ReadHead};
use crate::socket::{Accepted, Socket};
use crate::tls::{session, Tls};
use crate::telemetry::logging::Throttle;
use crate::telemetry::{probes, AcceptError, Metrics, RefuseReason};
use crate::wire::Transport;

/// Pending connections the kernel may hold before accept (capped by net.core.somaxconn).
const BACKLOG: i32 = 65_535;

const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// How long the kernel waits for a new connection's first bytes before accepting it anyway.
const DEFER_ACCEPT_SECS: libc::c_int = 1;

/// The first byte of a TLS connection: a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// One accept-failure warning per second at most, with how many were held back.
static ACCEPT_LOG: Throttle = Throttle::new(Duration::from_secs(1));

/// Binds a listening socket; with `reuse_port`, other processes may bind the same address.
///
/// Connections are accepted once their first bytes have arrived (TCP_DEFER_ACCEPT): every
/// client here speaks first, so its request head, or its TLS ClientHello, is waiting when
/// the connection is accepted, and is read at once, with no wait on the reactor. The kernel
/// holds a silent connection as a small request socket for [`DEFER_ACCEPT_SECS`] (counted
/// in SYN-ACK retransmits: up to about 3 s), then hands it over, to be timed out like any
/// other: a short defer keeps `--handshake-timeout` the bound a client is held to.
pub fn bind(addr: SocketAddr, reuse_port: bool) -> io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    // Inherited by every accepted socket (Linux copies it at accept): no call per connection.
    socket.set_tcp_nodelay(true)?;
    let defer: libc::c_int = DEFER_ACCEPT_SECS;
    // SAFETY: the fd is the socket's own, and the option's value is a c_int of that size.
    let deferred = unsafe {
        libc::setsockopt(socket.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_DEFER_ACCEPT, (&defer as *const libc::c_int).cast(), std::mem::size_of::<libc::c_int>() as libc::socklen_t)
    };
    if deferred != 0 {
        return Err(io::Error::last_os_error());
    }
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// Raises the soft open-file limit to the hard limit; returns the limit now in force.
pub fn raise_nofile_limit() -> io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
}

fn is_file_limit(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM))
}

/// Errors that concern one half-open connection, not the listener.
fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::Interrupted
    )
}

/// Where accepted connections go.
pub struct Router {
    /// The runtimes connections are served on, given one in turn.
    pub cores: Arc<Cores>,
    pub gateway: Gateway,
    pub api: Arc<Api>,
    /// Places for publish API connections, which do not count against
    /// `--max-connections`: `--max-api-connections` of them.
    pub api_connections: Arc<Semaphore>,
    /// Time a new connection has to send its request head.
    pub handshake_timeout: Duration,
    /// Connections being routed (their head read, their handshake answered):
    /// `--max-handshakes` at once.
    pub handshakes: Arc<Semaphore>,
    pub metrics: Arc<Metrics>,
    /// TLS on this listener (`--tls-cert`); None: plain TCP.
    pub tls: Option<Arc<Tls>>,
}

/// A plain HTTP request on the TLS port: answered in plain text, since the client reads no TLS.
const NOT_TLS: &[u8] = b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\nContent-Length: 53\r\n\r\nthis port speaks TLS: use https:// and wss:// here.\r\n";

impl Router {
    /// Reads the request head, then hands the connection to the gateway or the API.
    /// `handshaking` is the connection's place among handshakes in progress, given back
    /// once it is routed: an API connection's life is not a handshake. `core`: the core
    /// whose runtime this runs on, where a client connection stays.
    async fn route(&self, stream: std::net::TcpStream, peer: SocketAddr, handshaking: OwnedSemaphorePermit, core: usize) {
        let deadline = tokio::time::Instant::now() + self.handshake_timeout;
        let (mut stream, mut buf) = match &self.tls {
            None => (Socket::plain(stream), Vec::with_capacity(1024)),
            Some(tls) => match tokio::time::timeout_at(deadline, self.tls_handshake(stream, tls)).await {
                Ok(Some(handshaken)) => handshaken,
                Ok(None) => return,
                Err(_) => return self.metrics.refused(RefuseReason::HandshakeTimeout),
            },
        };
        let (head, used) = match tokio::time::timeout_at(deadline, http::read_head(&mut stream, &mut buf)).await {
            Ok(Ok(ReadHead::Complete(head, used))) => (head, used),
            Ok(Ok(ReadHead::Closed)) | Ok(Err(_)) => return,
            Ok(Ok(ReadHead::Malformed(error))) => return self.refuse(&mut stream, error).await,
            Err(_) => return self.refuse(&mut stream, Error::new(Kind::Timeout, "request head not received in time")).await,
        };
        let transport = match (head.method.as_str(), head.path.as_str()) {
            ("GET", "/ws") => Transport::WebSocket,
            ("GET", "/sse") => Transport::Sse,
            ("GET", path) if path.starts_with("/app/") => Transport::Pusher,
            _ => {
                drop(handshaking);
                let Ok(_place) = self.api_connections.clone().try_acquire_owned() else {
                    let error = Error::new(Kind::Overloaded, "too many publish API connections open; retry, or reuse one");
                    self.metrics.refused(RefuseReason::ApiConnections);
                    return http::respond_error(&mut stream, &error, "").await;
                };
                return self.api.clone().serve(stream, buf).await;
            }
        };
        self.gateway.connect(stream, peer.ip(), head, buf, used, transport, core).await
    }

    async fn refuse(&self, stream: &mut Socket, error: Error) {
        self.metrics.refused(error.kind.refuse_reason());
        http::respond_error(stream, &error, "").await
    }

    /// The TLS handshake of a new connection, and any request bytes that came with its
    /// last flight; None when it failed (answered and counted).
    async fn tls_handshake(&self, stream: std::net::TcpStream, tls: &Tls) -> Option<(Socket, Vec<u8>)> {
        let Ok(mut stream) = Accepted::from(stream).into_registered() else { return None };
        let mut first = [0u8; 1];
        match stream.peek(&mut first).await {
            Ok(1) if first[0] == TLS_HANDSHAKE_RECORD => {}
            Ok(1) => {
                self.metrics.refused(RefuseReason::NotTls);
                let _ = stream.write_all(NOT_TLS).await;
                let _ = stream.shutdown().await;
                return None;
            }
            _ => return None,
        }
        match Site::Tls.instrument(session::handshake(&stream, tls.config())).await {
            Ok(handshaken) => {
                probes::tls_handshake(handshaken.took.as_nanos() as u64, handshaken.resumed);
                self.metrics.tls_handshake(handshaken.resumed);
                Some((Socket::tls(stream, handshaken.session), handshaken.plaintext))
            }
            Err(error) => {
                tracing::debug!(error = %error.message, "TLS handshake failed");
                self.metrics.refused(RefuseReason::TlsHandshake);
                None
            }
        }
    }
}

/// The client listener, watched by the reactor. Accepted sockets are not registered with
/// it: each is read first, and waited on only if its request head has not arrived
/// ([`crate::socket::Accepted`]).
pub type Listener = AsyncFd<mio::net::TcpListener>;

/// `listener`, to be watched by the current runtime's reactor.
pub fn watch(listener: std::net::TcpListener) -> io::Result<Listener> {
    // SAFETY: the listener owns its fd and is moved into the AsyncFd, which keeps it, open
    // and the same, until it is dropped.
    unsafe { AsyncFd::register(mio::net::TcpListener::from_std(listener)) }.map_err(io::Error::from)
}

/// The next connection, as a bare non-blocking socket (accept4 sets O_NONBLOCK).
async fn accept(listener: &Listener) -> io::Result<(std::net::TcpStream, SocketAddr)> {
    loop {
        let mut ready = listener.readable().await?;
        if let Ok(accepted) = ready.try_io(|listener| listener.get_ref().accept()) {
            return accepted.map(|(stream, peer)| (stream.into(), peer));
        }
    }
}

/// Accepts until `stop` fires, routing each connection on a task of its own, on the next
/// core's runtime, where its whole life is spent.
pub async fn accept_loop(listener: Listener, router: Arc<Router>, stop: CancellationToken) {
    let mut backoff = Duration::ZERO;
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = accept(&listener) => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                pushline_alloc::baseline::record_once();
                backoff = Duration::ZERO;
                let Ok(handshaking) = router.handshakes.clone().try_acquire_owned() else {
                    router.metrics.refused(RefuseReason::Handshakes);
                    let error = Error::new(Kind::Overloaded, "too many handshakes in progress; retry");
                    tokio::spawn(async move { http::respond_error(&mut Socket::plain(stream), &error, "").await });
                    continue;
                };
                let core = router.cores.next();
                let runtime = router.cores.handle(core).clone();
                let router = router.clone();
                let handshake = Site::Http.instrument(async move { router.route(stream, peer, handshaking, core).await });
                Site::Http.scope(|| runtime.spawn(handshake));
            }
            Err(e) if is_per_connection(&e) => {}
            Err(e) => {
                let kind = if is_file_limit(&e) { AcceptError::FileLimit } else { AcceptError::Other };
                router.metrics.accept_error(kind);
                backoff = (backoff * 2).clamp(Duration::from_millis(5), MAX_BACKOFF);
                if let Some(held_back) = ACCEPT_LOG.allow() {
                    let kind = <&str>::from(kind);
                    tracing::warn!(error = %e, kind, held_back, retry_in = ?backoff, "accept failed; open connections keep being served");
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
            }
        }
    }
}
