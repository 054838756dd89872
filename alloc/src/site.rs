//! Allocation sites: the named parts of the server that memory is charged to, and the
//! thread's current site, set by a guard or carried by a future.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// The named parts of the server that allocations are charged to. The numbers are the
/// rows of the exported site table; the tools read them by name, not by number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Site {
    /// Anything not inside a named site: start-up, libraries' own threads.
    Other = 0,
    /// A client connection's task and its socket registration.
    ConnectionTask = 1,
    /// Handshakes and the publish API's HTTP connections.
    Http = 2,
    /// The WebSocket/SSE codec: published messages framed for both transports, and the
    /// per-thread buffers sockets are read into.
    Codec = 3,
    /// Outbound queues of connections.
    OutboundQueue = 4,
    /// Session records (`Conn`) and the uid table.
    Sessions = 5,
    /// The topic index.
    Topics = 6,
    /// Metric handles, histograms and the exposition text.
    Metrics = 7,
    /// The admin listener: debug endpoints, profiles.
    Admin = 8,
    /// The Redis client.
    Redis = 9,
    /// Message history kept for resuming clients (memory registry), and idempotency records.
    History = 10,
    /// TLS: each connection's session state and keys, handshakes, and the per-thread
    /// buffers records are decrypted and encrypted in.
    Tls = 11,
    /// The always-on CPU profiler: its stack table and per-minute counts.
    Profiler = 12,
}

pub const SITES: usize = 13;

impl Site {
    pub const ALL: [Site; SITES] = [
        Site::Other,
        Site::ConnectionTask,
        Site::Http,
        Site::Codec,
        Site::OutboundQueue,
        Site::Sessions,
        Site::Topics,
        Site::Metrics,
        Site::Admin,
        Site::Redis,
        Site::History,
        Site::Tls,
        Site::Profiler,
    ];

    /// Sites whose memory grows with the number of connections: what an idle connection
    /// costs in user space.
    pub const PER_CONNECTION: [Site; 5] = [Site::ConnectionTask, Site::Sessions, Site::OutboundQueue, Site::Topics, Site::Tls];

    pub const fn name(self) -> &'static str {
        match self {
            Site::Other => "other",
            Site::ConnectionTask => "connection_task",
            Site::Http => "http",
            Site::Codec => "codec",
            Site::OutboundQueue => "outbound_queue",
            Site::Sessions => "sessions",
            Site::Topics => "topics",
            Site::Metrics => "metrics",
            Site::Admin => "admin",
            Site::Redis => "redis",
            Site::History => "history",
            Site::Tls => "tls",
            Site::Profiler => "profiler",
        }
    }

    /// Makes this the current thread's site until the guard drops.
    pub fn enter(self) -> SiteGuard {
        SiteGuard { previous: CURRENT.with(|c| c.replace(self as u8)) }
    }

    /// Runs `f` with this site current.
    pub fn scope<T>(self, f: impl FnOnce() -> T) -> T {
        let _guard = self.enter();
        f()
    }

    /// Makes this the current site whenever `future` is polled.
    pub fn instrument<F: Future>(self, future: F) -> Instrumented<F> {
        Instrumented { site: self, future }
    }
}

pub struct SiteGuard {
    previous: u8,
}

impl Drop for SiteGuard {
    fn drop(&mut self) {
        CURRENT.with(|c| c.set(self.previous));
    }
}

pin_project_lite::pin_project! {
    /// A future whose polls run with its site current.
    pub struct Instrumented<F> {
        site: Site,
        #[pin]
        future: F,
    }
}

impl<F: Future> Future for Instrumented<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let _guard = this.site.enter();
        this.future.poll(cx)
    }
}

thread_local! {
    /// The site allocations on this thread are charged to. Const-initialized and without
    /// a destructor, so the allocator can read it at any time without allocating.
    static CURRENT: Cell<u8> = const { Cell::new(0) };
}

/// The current thread's site, as its table row; `Other` while the thread is being torn down.
pub fn current() -> u8 {
    CURRENT.try_with(Cell::get).unwrap_or(Site::Other as u8)
}
