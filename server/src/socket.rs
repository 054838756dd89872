//! A client connection's socket: plain TCP, or TLS over it. While its handshake is read
//! and answered, a [`Socket`] is on an [`Accepted`] stream, an `AsyncRead` + `AsyncWrite`
//! for the head reader, error answers and the publish API, which is registered with the
//! reactor only once a read or write has to wait. Once a connection is served, its socket
//! is [`Socket::detach`]ed into a [`RawSocket`], the same type on a bare `std` stream:
//! read and written without waiting (`read`, `write`, `flush`), with no reactor
//! registration of its own, since its core's driver polls readiness for every connection
//! at once (`client::driver`).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::tls::session::TlsSession;

/// A socket, plain or with TLS over it, on `T`: an [`Accepted`] stream while its handshake
/// is read and answered, a bare `std` stream (a [`RawSocket`]) once it is served.
pub struct Socket<T = Accepted> {
    tcp: T,
    /// Boxed: a plain connection pays one pointer for TLS it does not use.
    tls: Option<Box<TlsSession>>,
}

/// A served connection's socket (see the module documentation). Reads and writes never
/// wait: they say WouldBlock, and the driver calls again once the socket is ready.
pub type RawSocket = Socket<std::net::TcpStream>;

/// One read and one write on a TCP stream, neither waiting: WouldBlock instead.
pub trait Tcp: AsRawFd {
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize>;
    fn send(&self, bytes: &[u8]) -> io::Result<usize>;
}

impl Tcp for TcpStream {
    /// A short read means the socket is drained, so it also clears the socket's
    /// readiness, sparing the read that would only say WouldBlock. That is safe: tokio
    /// snapshots readiness before the read, and data arriving after it re-arms it.
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut got = 0;
        let outcome = self.try_io(tokio::io::Interest::READABLE, || {
            got = recv(self.as_raw_fd(), buf)?;
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

    fn send(&self, bytes: &[u8]) -> io::Result<usize> {
        self.try_write(bytes)
    }
}

impl Tcp for std::net::TcpStream {
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        recv(self.as_raw_fd(), buf)
    }

    fn send(&self, bytes: &[u8]) -> io::Result<usize> {
        send(self.as_raw_fd(), bytes)
    }
}

/// Reads once from `fd` into `buf`.
fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes; the caller's stream keeps
    // `fd` open for the call.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Writes once to `fd` from `bytes`, without raising SIGPIPE.
fn send(fd: RawFd, bytes: &[u8]) -> io::Result<usize> {
    // SAFETY: `bytes` is valid for its length; the caller's stream keeps `fd` open for the call.
    let n = unsafe { libc::send(fd, bytes.as_ptr().cast(), bytes.len(), libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// An accepted connection's stream until it is served: a bare socket, registered with the
/// runtime's reactor the first time a read or write has to wait. A client whose request
/// head has arrived by the time its core reads it (under load, nearly all) is answered and
/// handed to the driver without ever being registered: two `epoll_ctl` calls and a
/// reactor slot saved per connection.
pub enum Accepted {
    Bare(std::net::TcpStream),
    Registered(TcpStream),
    /// Its registration failed, which closed it.
    Lost,
}

impl Accepted {
    /// The stream, registered with the current runtime's reactor.
    fn registered(&mut self) -> io::Result<&TcpStream> {
        if let Accepted::Bare(_) = self {
            let Accepted::Bare(bare) = std::mem::replace(self, Accepted::Lost) else { unreachable!("matched above") };
            *self = Accepted::Registered(pushline_alloc::Site::ConnectionTask.scope(|| TcpStream::from_std(bare))?);
        }
        match self {
            Accepted::Registered(tcp) => Ok(tcp),
            _ => Err(lost()),
        }
    }

    /// The stream registered with the reactor, for what waits on it directly (TLS).
    pub fn into_registered(mut self) -> io::Result<TcpStream> {
        self.registered()?;
        match self {
            Accepted::Registered(tcp) => Ok(tcp),
            _ => Err(lost()),
        }
    }

    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.registered()?.poll_read_ready(cx)
    }

    fn poll_write_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.registered()?.poll_write_ready(cx)
    }

    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Accepted::Bare(tcp) => Poll::Ready(tcp.shutdown(std::net::Shutdown::Write)),
            Accepted::Registered(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Accepted::Lost => Poll::Ready(Err(lost())),
        }
    }
}

fn lost() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "the socket could not be registered with the reactor")
}

impl From<std::net::TcpStream> for Accepted {
    fn from(tcp: std::net::TcpStream) -> Accepted {
        Accepted::Bare(tcp)
    }
}

impl AsRawFd for Accepted {
    /// -1 once lost: every call on it fails with EBADF.
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Accepted::Bare(tcp) => tcp.as_raw_fd(),
            Accepted::Registered(tcp) => tcp.as_raw_fd(),
            Accepted::Lost => -1,
        }
    }
}

impl Tcp for Accepted {
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Accepted::Registered(tcp) => tcp.recv(buf),
            _ => recv(self.as_raw_fd(), buf),
        }
    }

    fn send(&self, bytes: &[u8]) -> io::Result<usize> {
        match self {
            Accepted::Registered(tcp) => tcp.send(bytes),
            _ => send(self.as_raw_fd(), bytes),
        }
    }
}

impl Socket {
    pub fn plain(tcp: impl Into<Accepted>) -> Socket {
        Socket { tcp: tcp.into(), tls: None }
    }

    pub fn tls(tcp: TcpStream, session: Box<TlsSession>) -> Socket {
        Socket { tcp: Accepted::Registered(tcp), tls: Some(session) }
    }

    /// The socket without any reactor registration, for its core's driver to poll.
    pub fn detach(self) -> io::Result<RawSocket> {
        let tcp = match self.tcp {
            Accepted::Bare(tcp) => tcp,
            Accepted::Registered(tcp) => tcp.into_std()?,
            Accepted::Lost => return Err(lost()),
        };
        Ok(Socket { tcp, tls: self.tls })
    }
}

impl<T: Tcp> Socket<T> {
    /// Plain TCP: bytes written to the fd reach the client as they are.
    pub fn is_plain(&self) -> bool {
        self.tls.is_none()
    }

    pub fn tcp(&self) -> &T {
        &self.tcp
    }

    /// Reads what has arrived into `into` (decrypted, on TLS); WouldBlock when nothing
    /// has, Ok(0) once the client has closed.
    pub fn read(&mut self, into: &mut [u8]) -> io::Result<usize> {
        match &mut self.tls {
            None => self.tcp.recv(into),
            Some(tls) => tls.read(into, |buf| self.tcp.recv(buf)),
        }
    }

    /// Writes from `bytes`: how many the socket took (on TLS, all of them, encrypted, or
    /// WouldBlock while earlier ciphertext waits).
    pub fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        match &mut self.tls {
            None => self.tcp.send(bytes),
            Some(tls) => tls.write(bytes, |out| self.tcp.send(out)),
        }
    }

    /// Sends ciphertext an earlier write left; true when nothing is left.
    pub fn flush(&mut self) -> io::Result<bool> {
        match &mut self.tls {
            None => Ok(true),
            Some(tls) => tls.flush(|out| self.tcp.send(out)),
        }
    }

    /// Whether bytes written earlier are still waiting for the socket.
    pub fn has_unsent(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.has_unsent())
    }

    /// Queues TLS close_notify (a no-op on plain TCP): what `flush` sends next ends the
    /// TLS session, before the TCP write side is shut.
    pub fn close_tls(&mut self) {
        if let Some(tls) = &mut self.tls {
            tls.close();
        }
    }
}

impl<T: AsRawFd> AsRawFd for Socket<T> {
    fn as_raw_fd(&self) -> RawFd {
        self.tcp.as_raw_fd()
    }
}

impl AsyncRead for Socket {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            match self.read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => ready!(self.tcp.poll_read_ready(cx))?,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bytes: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            match self.write(bytes) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => ready!(self.tcp.poll_write_ready(cx))?,
                other => return Poll::Ready(other),
            }
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if self.flush()? {
                return Poll::Ready(Ok(()));
            }
            ready!(self.tcp.poll_write_ready(cx))?;
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.close_tls();
        ready!(Pin::new(&mut *this).poll_flush(cx))?;
        this.tcp.poll_shutdown(cx)
    }
}
