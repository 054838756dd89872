//! A minimal WebSocket client for load: it holds no buffer while idle, so the benchmark
//! process can hold as many connections as the server, and its own memory stays out of
//! the server's figures.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;

/// Set by `--tls`: every client connects over TLS, trusting the certificate the bench made.
static TLS: OnceLock<TlsConnector> = OnceLock::new();

/// Makes a certificate for `localhost` and `*.pushline.localhost` in `dir`, for the server, and
/// has every client trust it. Clients name the server `c<uid>.pushline.localhost`, so each keeps
/// its own session ticket and a reconnect resumes.
pub fn use_tls(dir: &std::path::Path, clients: usize) -> Result<(std::path::PathBuf, std::path::PathBuf), String> {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".into(), "*.pushline.localhost".into()]).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let (cert, key) = (dir.join("bench.pem"), dir.join("bench.key"));
    std::fs::write(&cert, made.cert.pem()).map_err(|e| e.to_string())?;
    std::fs::write(&key, made.signing_key.serialize_pem()).map_err(|e| e.to_string())?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(made.cert.der().clone()).map_err(|e| e.to_string())?;
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::in_memory_sessions(clients.max(256));
    let _ = TLS.set(TlsConnector::from(Arc::new(config)));
    Ok((cert, key))
}

/// Whether clients connect over TLS (`--tls`).
pub fn tls_enabled() -> bool {
    TLS.get().is_some()
}

/// One HTTPS request to the client listener (the publish API under `--tls`); the body of
/// the answer, whatever its status.
pub async fn https(server: SocketAddr, method: &str, path: &str, body: &str) -> Result<String, String> {
    let tls = TLS.get().ok_or("TLS is not set up")?;
    let tcp = TcpStream::connect(server).await.map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    let mut stream = tls.connect(name, tcp).await.map_err(|e| e.to_string())?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut response = Vec::new();
    // A server may close without close_notify after `Connection: close`: what was read stands.
    let _ = stream.read_to_end(&mut response).await;
    let response = String::from_utf8_lossy(&response);
    Ok(response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default())
}

/// A client connection: plain, or TLS when `--tls` was given.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, bytes: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, bytes),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, bytes),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Source address for the i-th connection: 127.0.0.1 .. 127.0.0.`spread`, so one client
/// process is not limited to one address's ~28k ephemeral ports.
pub fn source_ip(i: usize, spread: u8) -> IpAddr {
    source_ip_in(0, i, spread)
}

/// As `source_ip`, in 127.`net`.0.0/24: each client process of a large run takes its own.
pub fn source_ip_in(net: u8, i: usize, spread: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, net, 0, 1 + (i % spread.max(1) as usize) as u8))
}

/// Opens `/ws?uid=...` and reads up to the end of the welcome frame.
pub async fn connect(server: SocketAddr, source: IpAddr, uid: &str) -> io::Result<Stream> {
    connect_with(server, source, uid, None).await
}

/// As `connect`, with the socket's receive buffer set first (a slow client's small window).
pub async fn connect_with(server: SocketAddr, source: IpAddr, uid: &str, receive_buffer: Option<u32>) -> io::Result<Stream> {
    Ok(open(server, source, &format!("uid={uid}"), receive_buffer).await?.stream)
}

/// A WebSocket connection whose welcome has been read.
pub struct Opened {
    pub stream: Stream,
    /// The welcome frame's payload.
    pub welcome: Vec<u8>,
    /// Bytes read past the welcome (what the server sent right after it).
    pub rest: Vec<u8>,
}

/// Opens `/ws?{query}` (or the path `query` names, when it starts with `/`) and reads up
/// to the end of the welcome frame.
pub async fn open(server: SocketAddr, source: IpAddr, query: &str, receive_buffer: Option<u32>) -> io::Result<Opened> {
    let socket = TcpSocket::new_v4()?;
    if let Some(size) = receive_buffer {
        socket.set_recv_buffer_size(size)?;
    }
    socket.bind(SocketAddr::new(source, 0))?;
    let tcp = socket.connect(server).await?;
    let mut stream = match TLS.get() {
        None => Stream::Plain(tcp),
        Some(tls) => {
            // A name of its own per client (the certificate covers *.pushline.localhost): its own ticket.
            let name = format!("c{}.pushline.localhost", query.split('&').next().unwrap_or_default().trim_start_matches("uid="));
            let name = rustls::pki_types::ServerName::try_from(name).map_err(io::Error::other)?;
            Stream::Tls(Box::new(tls.connect(name, tcp).await?))
        }
    };
    let target = if query.starts_with('/') { query.to_owned() } else { format!("/ws?{query}") };
    let request = format!(
        "GET {target} HTTP/1.1\r\nHost: {server}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut buf = Vec::with_capacity(512);
    let head_end = loop {
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed during handshake"));
        }
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
    };
    if !buf.starts_with(b"HTTP/1.1 101") {
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let line = head.lines().next().unwrap_or_default().to_owned();
        let retry = head.lines().find_map(|l| l.strip_prefix("Retry-After: ")).and_then(|s| s.trim().parse::<u64>().ok());
        return Err(io::Error::other(Refused { line, retry_after: retry.map(std::time::Duration::from_secs) }));
    }
    let mut rest = buf.split_off(head_end);
    loop {
        if let Some((_, payload, len)) = frame_payload(&rest) {
            let welcome = rest[payload].to_vec();
            rest.drain(..len);
            return Ok(Opened { stream, welcome, rest });
        }
        if stream.read_buf(&mut rest).await? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed before the welcome frame"));
        }
    }
}

/// Opens `/sse?uid={uid}` (plain TCP) and reads up to the end of its welcome event.
pub async fn open_sse(server: SocketAddr, source: IpAddr, uid: &str) -> io::Result<Stream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    let mut tcp = socket.connect(server).await?;
    let request = format!("GET /sse?uid={uid} HTTP/1.1\r\nHost: {server}\r\nAccept: text/event-stream\r\n\r\n");
    tcp.write_all(request.as_bytes()).await?;
    let mut buf = Vec::with_capacity(512);
    loop {
        if tcp.read_buf(&mut buf).await? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed before the welcome event"));
        }
        if !buf.starts_with(b"HTTP/1.1 200") && buf.len() >= 12 {
            let line = String::from_utf8_lossy(&buf).lines().next().unwrap_or_default().to_owned();
            return Err(io::Error::other(Refused { line, retry_after: None }));
        }
        if let Some(at) = buf.windows(14).position(|w| w == b"event: welcome") {
            if buf[at..].windows(2).any(|w| w == b"\n\n") {
                return Ok(Stream::Plain(tcp));
            }
        }
    }
}

/// A handshake the server answered with something else than 101.
#[derive(Debug)]
pub struct Refused {
    pub line: String,
    /// What its `Retry-After` said.
    pub retry_after: Option<std::time::Duration>,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "handshake refused: {}", self.line)
    }
}

impl std::error::Error for Refused {}

/// The first complete server frame in `buf`: (opcode, bytes used).
pub fn frame(buf: &[u8]) -> Option<(u8, usize)> {
    frame_payload(buf).map(|(opcode, _, used)| (opcode, used))
}

/// The first complete server frame in `buf`: (opcode, where its payload is, bytes used).
pub fn frame_payload(buf: &[u8]) -> Option<(u8, std::ops::Range<usize>, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let (len, at) = match buf[1] & 0x7F {
        126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
        127 if buf.len() >= 10 => (u64::from_be_bytes(buf[2..10].try_into().ok()?) as usize, 10),
        126 | 127 => return None,
        n => (n as usize, 2),
    };
    (buf.len() >= at + len).then_some((buf[0] & 0x0F, at..at + len, at + len))
}

/// A masked client text frame.
pub fn text_frame(payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0x81];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    // A zero mask: valid, and it leaves the payload as it is.
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(payload);
    out
}
