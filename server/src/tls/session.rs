//! One TLS connection, on rustls' unbuffered API: the handshake, run with buffers of its
//! own that are freed when it ends; then decryption in place in the reader's buffer and
//! encryption into a per-thread buffer. What a connection keeps between reads is rustls'
//! state and, only while they are not empty, the ciphertext of an incomplete record and
//! ciphertext the socket has not taken yet.

use std::cell::RefCell;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pushline_alloc::Site;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, InsufficientSizeError, UnbufferedStatus};
use rustls::{HandshakeKind, ServerConfig};
use tokio::net::TcpStream;

use crate::error::{Error, Kind};

/// Largest TLS record: 16 KiB of plaintext, the record header, and what an AEAD adds.
const MAX_RECORD: usize = 16 * 1024 + 5 + 256;

thread_local! {
    /// Where a connection's ciphertext is read into and decrypted in place (one per
    /// thread, so charged to the codec with the other per-thread buffers).
    static INCOMING: RefCell<Vec<u8>> = RefCell::new(Site::Codec.scope(|| vec![0; 2 * MAX_RECORD]));
    /// Where a connection's plaintext is encrypted to before the socket takes it.
    static OUTGOING: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

pub struct TlsSession {
    conn: UnbufferedServerConnection,
    /// Ciphertext read that is not yet a whole record; unallocated almost always.
    incoming: Vec<u8>,
    /// Ciphertext the socket has not taken yet; unallocated once it has.
    outgoing: Vec<u8>,
    /// Plaintext decrypted beyond the reader's room; unallocated almost always.
    plaintext: Vec<u8>,
    /// The client sent close_notify, or closed.
    closed: bool,
    /// This side queued close_notify.
    closing: bool,
}

/// A completed handshake.
pub struct Handshaken {
    pub session: Box<TlsSession>,
    /// Application data that came with the handshake's last flight (the request head, often).
    pub plaintext: Vec<u8>,
    pub resumed: bool,
    pub took: Duration,
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Appends what `encode` writes to `out`, growing it as rustls asks.
fn append<E>(out: &mut Vec<u8>, mut encode: impl FnMut(&mut [u8]) -> Result<usize, E>, size: impl Fn(&E) -> Option<InsufficientSizeError>) -> Result<(), E> {
    let at = out.len();
    out.resize(at + 512, 0);
    let written = match encode(&mut out[at..]) {
        Ok(n) => n,
        Err(e) => match size(&e) {
            Some(InsufficientSizeError { required_size }) => {
                out.resize(at + required_size, 0);
                encode(&mut out[at..])?
            }
            None => return Err(e),
        },
    };
    out.truncate(at + written);
    Ok(())
}

fn encode_size(e: &EncodeError) -> Option<InsufficientSizeError> {
    match e {
        EncodeError::InsufficientSize(size) => Some(*size),
        _ => None,
    }
}

fn encrypt_size(e: &EncryptError) -> Option<InsufficientSizeError> {
    match e {
        EncryptError::InsufficientSize(size) => Some(*size),
        _ => None,
    }
}

/// Where the state machine stopped.
#[derive(Debug, PartialEq, Eq)]
enum Stopped {
    /// It needs more ciphertext to go on with the handshake.
    Handshaking,
    /// Handshake done; every whole record in the buffer was taken.
    Traffic,
    /// The client closed the session.
    Closed,
}

/// Runs the state machine over `buf[..*len]`: decrypted application data goes to
/// `plain`, records to send (handshake, alerts, key updates, tickets) to `outgoing`;
/// what it consumed is removed from the front of `buf`.
fn pump(
    conn: &mut UnbufferedServerConnection,
    buf: &mut [u8],
    len: &mut usize,
    outgoing: &mut Vec<u8>,
    plain: &mut dyn FnMut(&[u8]),
) -> io::Result<Stopped> {
    loop {
        let UnbufferedStatus { mut discard, state } = conn.process_tls_records(&mut buf[..*len]);
        let stopped = match state.map_err(tls_error)? {
            ConnectionState::ReadTraffic(mut records) => {
                while let Some(record) = records.next_record() {
                    let record = record.map_err(tls_error)?;
                    discard += record.discard;
                    plain(record.payload);
                }
                None
            }
            ConnectionState::EncodeTlsData(mut data) => {
                append(outgoing, |out| data.encode(out), encode_size).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                None
            }
            // Queued in `outgoing`, which goes out in order before anything else.
            ConnectionState::TransmitTlsData(data) => {
                data.done();
                None
            }
            ConnectionState::BlockedHandshake => Some(Stopped::Handshaking),
            ConnectionState::WriteTraffic(_) => Some(Stopped::Traffic),
            ConnectionState::PeerClosed | ConnectionState::Closed => Some(Stopped::Closed),
            // 0-RTT is off (max_early_data_size is 0): a client that sends it is refused.
            ConnectionState::ReadEarlyData(_) => return Err(io::Error::new(io::ErrorKind::InvalidData, "TLS early data is not accepted")),
            _ => return Err(io::Error::new(io::ErrorKind::InvalidData, "TLS state this server does not handle")),
        };
        if discard > 0 {
            buf.copy_within(discard..*len, 0);
            *len -= discard;
        }
        if let Some(stopped) = stopped {
            return Ok(stopped);
        }
    }
}

/// Writes `bytes` whole; for the handshake, which owns the connection until it ends.
async fn send_all(tcp: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        tcp.writable().await?;
        match tcp.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Runs the server side of a handshake on `tcp`.
pub async fn handshake(tcp: &TcpStream, config: Arc<ServerConfig>) -> Result<Handshaken, Error> {
    let started = Instant::now();
    let failed = |e: io::Error| Error::new(Kind::BadRequest, format!("TLS handshake failed: {e}"));
    let mut conn = UnbufferedServerConnection::new(config).map_err(|e| Error::new(Kind::Internal, format!("TLS: {e}")))?;
    let (mut buf, mut len) = (vec![0u8; MAX_RECORD], 0);
    let (mut outgoing, mut plaintext) = (Vec::new(), Vec::new());
    loop {
        let stopped = pump(&mut conn, &mut buf, &mut len, &mut outgoing, &mut |p| plaintext.extend_from_slice(p)).map_err(failed)?;
        if !outgoing.is_empty() {
            send_all(tcp, &outgoing).await.map_err(failed)?;
            outgoing.clear();
        }
        match stopped {
            Stopped::Traffic => break,
            Stopped::Closed => return Err(failed(io::ErrorKind::UnexpectedEof.into())),
            Stopped::Handshaking => {
                if len == buf.len() {
                    return Err(failed(io::Error::new(io::ErrorKind::InvalidData, "a handshake record larger than TLS allows")));
                }
                tcp.readable().await.map_err(failed)?;
                match tcp.try_read(&mut buf[len..]) {
                    Ok(0) => return Err(failed(io::ErrorKind::UnexpectedEof.into())),
                    Ok(n) => len += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(failed(e)),
                }
            }
        }
    }
    let resumed = conn.handshake_kind() == Some(HandshakeKind::Resumed);
    let session = TlsSession { conn, incoming: buf[..len].to_vec(), outgoing: Vec::new(), plaintext: Vec::new(), closed: false, closing: false };
    Ok(Handshaken { session: Box::new(session), plaintext, resumed, took: started.elapsed() })
}

impl TlsSession {
    /// Reads and decrypts what the socket has, into `into`; `read` takes ciphertext from the
    /// socket (WouldBlock when it has none). Ok(0) once the client has closed.
    pub fn read(&mut self, into: &mut [u8], mut read: impl FnMut(&mut [u8]) -> io::Result<usize>) -> io::Result<usize> {
        if !self.plaintext.is_empty() {
            let n = self.plaintext.len().min(into.len());
            into[..n].copy_from_slice(&self.plaintext[..n]);
            self.plaintext.drain(..n);
            if self.plaintext.is_empty() {
                self.plaintext = Vec::new();
            }
            return Ok(n);
        }
        let _site = Site::Tls.enter();
        INCOMING.with(|buf| {
            let mut buf = buf.borrow_mut();
            let mut len = self.incoming.len();
            buf[..len].copy_from_slice(&self.incoming);
            let mut produced = 0;
            let result = loop {
                if self.closed {
                    break Ok(produced);
                }
                let got = match read(&mut buf[len..]) {
                    Ok(0) => {
                        self.closed = true;
                        break Ok(produced);
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock && produced > 0 => break Ok(produced),
                    Err(e) => break Err(e),
                };
                len += got;
                let (into, overflow) = (&mut *into, &mut self.plaintext);
                let mut sink = |p: &[u8]| {
                    let n = p.len().min(into.len() - produced);
                    into[produced..produced + n].copy_from_slice(&p[..n]);
                    produced += n;
                    overflow.extend_from_slice(&p[n..]);
                };
                match pump(&mut self.conn, &mut buf, &mut len, &mut self.outgoing, &mut sink) {
                    Ok(Stopped::Closed) => self.closed = true,
                    Ok(_) => {}
                    Err(e) => break Err(e),
                }
                if produced > 0 {
                    break Ok(produced);
                }
            };
            // Keep only an incomplete record's bytes, and no allocation without them.
            self.incoming = if len == 0 { Vec::new() } else { buf[..len].to_vec() };
            result
        })
    }

    /// Encrypts all of `plain` and hands it to `write`; what the socket does not take now
    /// is kept and goes first next time. Ok(plain.len()), or WouldBlock while older
    /// ciphertext is still waiting.
    pub fn write(&mut self, plain: &[u8], mut write: impl FnMut(&[u8]) -> io::Result<usize>) -> io::Result<usize> {
        if !self.flush(&mut write)? {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        OUTGOING.with(|out| {
            let mut out = out.borrow_mut();
            out.clear();
            let codec = Site::Codec.enter();
            loop {
                let UnbufferedStatus { state, .. } = self.conn.process_tls_records(&mut []);
                match state.map_err(tls_error)? {
                    ConnectionState::WriteTraffic(mut traffic) => {
                        append(&mut out, |buf| traffic.encrypt(plain, buf), encrypt_size).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                        break;
                    }
                    ConnectionState::EncodeTlsData(mut data) => {
                        append(&mut out, |buf| data.encode(buf), encode_size).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    }
                    ConnectionState::TransmitTlsData(data) => data.done(),
                    _ => return Err(io::Error::new(io::ErrorKind::BrokenPipe, "the TLS session is closed")),
                }
            }
            drop(codec);
            let sent = match write(&out) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => return Err(e),
            };
            Site::Tls.scope(|| self.outgoing.extend_from_slice(&out[sent..]));
            Ok(plain.len())
        })
    }

    /// Sends ciphertext kept from earlier writes; true when none is left.
    pub fn flush(&mut self, mut write: impl FnMut(&[u8]) -> io::Result<usize>) -> io::Result<bool> {
        while !self.outgoing.is_empty() {
            match write(&self.outgoing) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.outgoing.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        self.outgoing = Vec::new();
        Ok(true)
    }

    pub fn has_unsent(&self) -> bool {
        !self.outgoing.is_empty()
    }

    /// Queues close_notify, once; [`TlsSession::flush`] sends it.
    pub fn close(&mut self) {
        if std::mem::replace(&mut self.closing, true) {
            return;
        }
        let UnbufferedStatus { state, .. } = self.conn.process_tls_records(&mut []);
        if let Ok(ConnectionState::WriteTraffic(mut traffic)) = state {
            let _ = append(&mut self.outgoing, |buf| traffic.queue_close_notify(buf), encrypt_size);
        }
    }
}
