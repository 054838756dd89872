//! A client connection's socket: plain TCP, or TLS over it. [`Socket`] is registered with
//! tokio's reactor: the handshake's head reader, error answers and the publish API use it
//! as an `AsyncRead` + `AsyncWrite`. Once a connection is served, its socket is
//! [`Socket::detach`]ed into a [`RawSocket`]: read and written without waiting (`read`,
//! `write`, `flush`), with no reactor registration of its own, since its core's driver
//! polls readiness for every connection at once (`client::driver`).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::tls::session::TlsSession;

pub struct Socket {
    tcp: TcpStream,
    /// Boxed: a plain connection pays one pointer for TLS it does not use.
    tls: Option<Box<TlsSession>>,
}

/// Reads once into `buf`. A short read means the socket is drained, so it also clears
/// the socket's readiness, sparing the read that would only say WouldBlock. That is safe:
/// tokio snapshots readiness before the read, and data arriving after it re-arms it.
fn read_once(tcp: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    let outcome = tcp.try_io(tokio::io::Interest::READABLE, || {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the whole call, and
        // the fd is the stream's own, open while `tcp` is borrowed.
        let n = unsafe { libc::recv(tcp.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
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

impl Socket {
    pub fn plain(tcp: TcpStream) -> Socket {
        Socket { tcp, tls: None }
    }

    pub fn tls(tcp: TcpStream, session: Box<TlsSession>) -> Socket {
        Socket { tcp, tls: Some(session) }
    }

    /// Plain TCP: bytes written to the fd reach the client as they are.
    pub fn is_plain(&self) -> bool {
        self.tls.is_none()
    }

    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// The socket without its reactor registration, for its core's driver to poll.
    pub fn detach(self) -> io::Result<RawSocket> {
        Ok(RawSocket { tcp: self.tcp.into_std()?, tls: self.tls })
    }

    /// Reads what has arrived into `into` (decrypted, on TLS); WouldBlock when nothing
    /// has, Ok(0) once the client has closed.
    pub fn read(&mut self, into: &mut [u8]) -> io::Result<usize> {
        match &mut self.tls {
            None => read_once(&self.tcp, into),
            Some(tls) => tls.read(into, |buf| read_once(&self.tcp, buf)),
        }
    }

    /// Writes from `bytes`: how many the socket took (on TLS, all of them, encrypted, or
    /// WouldBlock while earlier ciphertext waits).
    pub fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        match &mut self.tls {
            None => self.tcp.try_write(bytes),
            Some(tls) => tls.write(bytes, |out| self.tcp.try_write(out)),
        }
    }

    /// Sends ciphertext an earlier write left; true when nothing is left.
    pub fn flush(&mut self) -> io::Result<bool> {
        match &mut self.tls {
            None => Ok(true),
            Some(tls) => tls.flush(|out| self.tcp.try_write(out)),
        }
    }

    /// Whether bytes written earlier are still waiting for the socket.
    pub fn has_unsent(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.has_unsent())
    }
}

/// A served connection's socket (see the module documentation). Reads and writes never
/// wait: they say WouldBlock, and the driver calls again once the socket is ready.
pub struct RawSocket {
    tcp: std::net::TcpStream,
    tls: Option<Box<TlsSession>>,
}

/// Reads once into `buf`: WouldBlock when nothing has arrived.
fn recv(tcp: &std::net::TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes, and the fd is open while
    // `tcp` is borrowed.
    let n = unsafe { libc::recv(tcp.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Writes once from `bytes`, without raising SIGPIPE: WouldBlock when the socket is full.
fn send(tcp: &std::net::TcpStream, bytes: &[u8]) -> io::Result<usize> {
    // SAFETY: `bytes` is valid for its length, and the fd is open while `tcp` is borrowed.
    let n = unsafe { libc::send(tcp.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

impl RawSocket {
    /// Plain TCP: bytes written to the fd reach the client as they are.
    pub fn is_plain(&self) -> bool {
        self.tls.is_none()
    }

    pub fn tcp(&self) -> &std::net::TcpStream {
        &self.tcp
    }

    /// Reads what has arrived into `into` (decrypted, on TLS); WouldBlock when nothing
    /// has, Ok(0) once the client has closed.
    pub fn read(&mut self, into: &mut [u8]) -> io::Result<usize> {
        match &mut self.tls {
            None => recv(&self.tcp, into),
            Some(tls) => tls.read(into, |buf| recv(&self.tcp, buf)),
        }
    }

    /// Writes from `bytes`: how many the socket took (on TLS, all of them, encrypted, or
    /// WouldBlock while earlier ciphertext waits).
    pub fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        match &mut self.tls {
            None => send(&self.tcp, bytes),
            Some(tls) => tls.write(bytes, |out| send(&self.tcp, out)),
        }
    }

    /// Sends ciphertext an earlier write left; true when nothing is left.
    pub fn flush(&mut self) -> io::Result<bool> {
        match &mut self.tls {
            None => Ok(true),
            Some(tls) => tls.flush(|out| send(&self.tcp, out)),
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

impl AsRawFd for RawSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.tcp.as_raw_fd()
    }
}

impl AsRawFd for Socket {
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
        if let Some(tls) = &mut this.tls {
            tls.close();
        }
        ready!(Pin::new(&mut *this).poll_flush(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}
