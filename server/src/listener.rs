//! The client listener: binding (with SO_REUSEPORT when asked), the open-file limit, and
//! an accept loop that survives a full file table.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::alloc::sites::Site;
use crate::server::Shared;
use crate::telemetry::AcceptError;

/// Pending connections the kernel may hold before accept (capped by net.core.somaxconn).
const BACKLOG: i32 = 65_535;

const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Binds a listening socket; with `reuse_port`, other processes may bind the same address.
pub fn bind(addr: SocketAddr, reuse_port: bool) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// Raises the soft open-file limit to the hard limit; returns the limit now in force.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(io::Error::last_os_error());
        }
        limit = raised;
    }
    Ok(limit.rlim_cur)
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

/// Accepts until `stop` fires, handing each connection to the gateway on a task of its own.
pub async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    let mut backoff = Duration::ZERO;
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                backoff = Duration::ZERO;
                let _ = stream.set_nodelay(true);
                let handshake = Site::Http.instrument(crate::gateway::handle(stream, shared.clone()));
                Site::Http.scope(|| tokio::spawn(handshake));
            }
            Err(e) if is_per_connection(&e) => {}
            Err(e) => {
                let kind = if is_file_limit(&e) { AcceptError::FileLimit } else { AcceptError::Other };
                shared.metrics.accept_error(kind);
                // Log when the backoff starts or grows, not on every retry.
                backoff = (backoff * 2).clamp(Duration::from_millis(5), MAX_BACKOFF);
                if backoff < MAX_BACKOFF {
                    tracing::warn!(error = %e, retry_in = ?backoff, "accept failed; open connections keep being served");
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
            }
        }
    }
}
