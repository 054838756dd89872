//! A client connection's socket: plain TCP, or TLS over it. On tokio's stream, [`Socket`]
//! is registered with the reactor: the handshake's head reader, error answers and the
//! publish API use it as an `AsyncRead` + `AsyncWrite`. Once a connection is served, its
//! socket is [`Socket::detach`]ed into a [`RawSocket`], the same type on a bare `std`
//! stream: read and written without waiting (`read`, `write`, `flush`), with no reactor
//! registration of its own, since its core's driver polls readiness for every connection
//! at once (`client::driver`).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::tls::session::TlsSession;

/// A socket, plain or with TLS over it, on `T`: tokio's stream while its handshake is
/// read and answered, a bare `std` stream (a [`RawSocket`]) once it is served.
pub struct Socket<T = TcpStream> {
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

    /// Without raising SIGPIPE.
    fn send(&self, bytes: &[u8]) -> io::Result<usize> {
        // SAFETY: `bytes` is valid for its length, and the fd is open while `self` is.
        let n = unsafe { libc::send(self.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), libc::MSG_NOSIGNAL) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
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

impl Socket {
    pub fn plain(tcp: TcpStream) -> Socket {
        Socket { tcp, tls: None }
    }

    pub fn tls(tcp: TcpStream, session: Box<TlsSession>) -> Socket {
        Socket { tcp, tls: Some(session) }
    }

    /// The socket without its reactor registration, for its core's driver to poll.
    pub fn detach(self) -> io::Result<RawSocket> {
        Ok(Socket { tcp: self.tcp.into_std()?, tls: self.tls })
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
        if self.tls.is_none() {
            return Pin::new(&mut self.tcp).poll_read(cx, buf);
        }
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
        if self.tls.is_none() {
            return Pin::new(&mut self.tcp).poll_write(cx, bytes);
        }
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
                return Pin::new(&mut self.tcp).poll_flush(cx);
            }
            ready!(self.tcp.poll_write_ready(cx))?;
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.close_tls();
        ready!(Pin::new(&mut *this).poll_flush(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}
