//! The floor: the smallest server that does what `fanout` and `heartbeat` ask of Pushline,
//! so their figures can be read as a distance from what this machine allows.
//!
//! One thread, one epoll loop (mio). It answers WebSocket handshakes (with a welcome
//! frame, as Pushline does), answers `POST /v1/broadcast` by writing one prepared frame
//! of Pushline's size to every socket in a tight loop (non-blocking `write`, nothing
//! else: a frame the kernel does not take is dropped and counted), and answers each ping
//! frame with a static pong in the same readiness event that read it. No parsing beyond
//! what framing needs, no queue, no allocation per message.
//!
//! For `unicast`, it also answers `POST /v1/push` (`{"uids":[..],"data":..}`) and
//! `POST /v1/batch` (a JSON array of `{"push":{..}}`) on keep-alive connections: the body
//! parsed with serde_json (borrowing `data`), each uid looked up in a map filled at the
//! handshake (`/ws?uid=`), one frame written to each, one answer written. What any push
//! server must do for a push, and nothing more: no history, no ids kept, no limits.
//!
//! With `uring`, the broadcast's sends go through io_uring instead, `URING_BATCH` per
//! system call: the issue's experiment of what batching system calls would save a fan-out.
//!
//! For `scale`, many floor processes share one port (`--listen ADDR --reuse-port`), and
//! each also listens on a port of its own (its `admin` address), where a broadcast reaches
//! that process's connections only. Its listeners are set as Pushline's are: TCP_NODELAY
//! for what they accept, and TCP_DEFER_ACCEPT, so a connection is accepted with its
//! request head already there.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};

use base64::Engine;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};

use relay::{Relay, Relayed};

mod relay;

const LISTENER: Token = Token(usize::MAX);
/// The process's own port (see the module documentation).
const CONTROL: Token = Token(usize::MAX - 1);
const WEBSOCKET_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// What Pushline sends for a 100-byte broadcast (`{"data":"x" * 98}`), byte for byte in
/// length: the same bytes on the wire.
const MESSAGE: &str = concat!(
    r#"{"type":"message","id":"7531284878357168128","topic":null,"data":""#,
    "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
    r#""}"#
);

enum State {
    /// Reading a request head (and, for the API, its body).
    Request,
    WebSocket,
}

struct Conn {
    stream: TcpStream,
    state: State,
    buf: Vec<u8>,
    /// The uid given at the handshake (WebSocket connections).
    uid: Option<String>,
}

#[derive(serde::Deserialize)]
struct Push<'a> {
    uids: Vec<&'a str>,
    #[serde(borrow)]
    data: &'a serde_json::value::RawValue,
}

#[derive(serde::Deserialize)]
enum Item<'a> {
    #[serde(rename = "push", borrow)]
    Push(Push<'a>),
}

/// A push's result: its id, the connections here it reached, and whether it went to
/// Redis for the other nodes.
struct Pushed {
    id: u64,
    delivered: usize,
    relayed: bool,
}

/// Writes a message frame with `data` to `conn`; whether the kernel took all of it.
fn write_message(conn: &mut Conn, id: u64, data: &[u8], frame: &mut Vec<u8>) -> bool {
    let mut payload = format!(r#"{{"type":"message","id":"{id}","topic":null,"data":"#).into_bytes();
    payload.extend_from_slice(data);
    payload.push(b'}');
    frame.clear();
    text_frame_into(&payload, frame);
    matches!(conn.stream.write(frame), Ok(n) if n == frame.len())
}

/// Each push of a `/v1/push` or `/v1/batch` body, written to the connections of its uids
/// here; with `relayed`, a uid with none here is added to it, for the other nodes.
fn push_all<'a>(
    conns: &mut HashMap<usize, Conn>,
    uids: &HashMap<String, usize>,
    path: &str,
    body: &'a [u8],
    next_id: &mut u64,
    mut relayed: Option<&mut Vec<Relayed<'a>>>,
) -> Result<Vec<Pushed>, String> {
    let pushes = if path == "/v1/batch" {
        serde_json::from_slice::<Vec<Item>>(body).map(|items| items.into_iter().map(|Item::Push(push)| push).collect())
    } else {
        serde_json::from_slice::<Push>(body).map(|push| vec![push])
    }
    .map_err(|e| format!(r#"{{"error":"{e}"}}"#))?;
    let mut frame = Vec::with_capacity(256);
    let mut results = Vec::with_capacity(pushes.len());
    for push in pushes {
        *next_id += 1;
        let mut pushed = Pushed { id: *next_id, delivered: 0, relayed: false };
        for uid in push.uids {
            match (uids.get(uid).and_then(|token| conns.get_mut(token)), relayed.as_deref_mut()) {
                (Some(conn), _) => pushed.delivered += write_message(conn, pushed.id, push.data.get().as_bytes(), &mut frame) as usize,
                (None, Some(relayed)) => {
                    relayed.push(Relayed { id: pushed.id, uid, data: push.data.get() });
                    pushed.relayed = true;
                }
                (None, None) => {}
            }
        }
        results.push(pushed);
    }
    Ok(results)
}

/// The answer to pushes, kept alive: `nodes` is how many other nodes heard the relayed ones.
fn answer(results: &[Pushed], batch: bool, nodes: i64) -> String {
    let result = |p: &Pushed| match p.relayed {
        true => format!(r#"{{"id":"{}","delivered":{},"nodes":{nodes}}}"#, p.id, p.delivered),
        false => format!(r#"{{"id":"{}","delivered":{}}}"#, p.id, p.delivered),
    };
    let json = match batch {
        true => format!(r#"{{"results":[{}]}}"#, results.iter().map(result).collect::<Vec<_>>().join(",")),
        false => results.first().map(result).unwrap_or_default(),
    };
    ok(&json)
}

fn ok(json: &str) -> String {
    format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{json}", json.len())
}

/// Sends per io_uring submission (and the ring's size).
pub const URING_BATCH: usize = 256;

/// Writes `frame` to every socket in `fds` through `ring`, `URING_BATCH` sends per
/// system call, each non-blocking as the plain loop's `write`. Returns (delivered, dropped).
fn broadcast_uring(ring: &mut io_uring::IoUring, fds: &[RawFd], frame: &[u8]) -> io::Result<(usize, usize)> {
    let (mut delivered, mut dropped) = (0, 0);
    for batch in fds.chunks(URING_BATCH) {
        for fd in batch {
            let send = io_uring::opcode::Send::new(io_uring::types::Fd(*fd), frame.as_ptr(), frame.len() as u32)
                .flags(libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
                .build();
            // SAFETY: `frame` outlives the submission: every entry is completed (waited
            // for below) before this function returns.
            unsafe { ring.submission().push(&send) }.map_err(|_| io::Error::other("io_uring submission queue full"))?;
        }
        ring.submit_and_wait(batch.len())?;
        for done in ring.completion() {
            if done.result() == frame.len() as i32 {
                delivered += 1;
            } else {
                dropped += 1;
            }
        }
    }
    Ok((delivered, dropped))
}

/// An unmasked server text frame.
fn text_frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 4);
    text_frame_into(payload, &mut out);
    out
}

fn text_frame_into(payload: &[u8], out: &mut Vec<u8>) {
    out.push(0x81);
    if payload.len() < 126 {
        out.push(payload.len() as u8);
    } else {
        out.push(126);
        out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    }
    out.extend_from_slice(payload);
}

/// Serves until killed; prints `floor listening client=ADDR` once it listens.
/// Binds as Pushline does (see the module documentation).
fn bind(addr: SocketAddr, reuse_port: bool) -> io::Result<TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(reuse_port)?;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    let defer: libc::c_int = 1;
    // SAFETY: the fd is the socket's own, and the value is a c_int of the size given.
    let set = unsafe {
        libc::setsockopt(socket.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_DEFER_ACCEPT, (&defer as *const libc::c_int).cast(), std::mem::size_of::<libc::c_int>() as libc::socklen_t)
    };
    if set != 0 {
        return Err(io::Error::last_os_error());
    }
    socket.bind(&addr.into())?;
    socket.listen(65_535)?;
    Ok(TcpListener::from_std(socket.into()))
}

/// Serves on `listen` (with SO_REUSEPORT if `reuse_port`) and on a port of its own.
/// Serves until killed. `redis`: a node on the Redis there ([`relay`]), which relays pushes
/// for uids not here to the nodes whose client ports `relay_to` names, and delivers here
/// what other nodes relay.
pub fn serve(listen: SocketAddr, reuse_port: bool, uring: bool, redis: Option<SocketAddr>, relay_to: &[u16]) -> io::Result<()> {
    let mut poll = Poll::new()?;
    let mut listener = bind(listen, reuse_port)?;
    let mut control = bind(SocketAddr::from(([127, 0, 0, 1], 0)), false)?;
    poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
    poll.registry().register(&mut control, CONTROL, Interest::READABLE)?;
    // Each relayed request waits for Redis with its connection's token, whether it was a
    // batch, and its results.
    let mut relay: Option<Relay<(usize, bool, Vec<Pushed>)>> =
        redis.map(|addr| Relay::connect(addr, listener.local_addr()?.port(), relay_to, poll.registry())).transpose()?;
    eprintln!("floor listening client={} admin={}", listener.local_addr()?, control.local_addr()?);
    let broadcast = text_frame(MESSAGE.as_bytes());
    let pong = text_frame(br#"{"type":"pong"}"#);
    let welcome = text_frame(br#"{"type":"welcome","uid":"floor","session":"1"}"#);
    let mut conns: HashMap<usize, Conn> = HashMap::new();
    let mut uids: HashMap<String, usize> = HashMap::new();
    let mut next_id = 0u64;
    let mut next = 0usize;
    let mut events = Events::with_capacity(1024);
    let mut chunk = vec![0u8; 64 * 1024];
    let mut ring = if uring { Some(io_uring::IoUring::new(URING_BATCH as u32)?) } else { None };
    loop {
        poll.poll(&mut events, None)?;
        for event in events.iter() {
            if event.token() == LISTENER || event.token() == CONTROL {
                let listener = if event.token() == LISTENER { &listener } else { &control };
                loop {
                    match listener.accept() {
                        Ok((mut stream, _)) => {
                            poll.registry().register(&mut stream, Token(next), Interest::READABLE)?;
                            conns.insert(next, Conn { stream, state: State::Request, buf: Vec::new(), uid: None });
                            next += 1;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(_) => break,
                    }
                }
                continue;
            }
            if event.token() == relay::PUBLISHER {
                for ((token, batch, results), nodes) in relay.as_mut().map(Relay::answered).transpose()?.unwrap_or_default() {
                    if let Some(conn) = conns.get_mut(&token) {
                        let _ = conn.stream.write_all(answer(&results, batch, nodes).as_bytes());
                    }
                }
                continue;
            }
            if event.token() == relay::SUBSCRIBER {
                let mut frame = Vec::with_capacity(256);
                if let Some(relay) = relay.as_mut() {
                    relay.heard(|id, uid, data| {
                        if let Some(conn) = uids.get(uid).and_then(|token| conns.get_mut(token)) {
                            write_message(conn, id, data, &mut frame);
                        }
                    })?;
                }
                continue;
            }
            let token = event.token().0;
            let Some(conn) = conns.get_mut(&token) else { continue };
            let mut closed = false;
            loop {
                match conn.stream.read(&mut chunk) {
                    Ok(0) => {
                        closed = true;
                        break;
                    }
                    Ok(n) => conn.buf.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => {
                        closed = true;
                        break;
                    }
                }
            }
            let mut broadcast_now = false;
            let mut pushed = Vec::new();
            match conn.state {
                State::WebSocket => {
                    // Client frames are masked: 2 header bytes, the length's extension, 4 mask bytes.
                    let mut at = 0;
                    while conn.buf.len() >= at + 2 {
                        let (opcode, short) = (conn.buf[at] & 0x0F, (conn.buf[at + 1] & 0x7F) as usize);
                        let (len, header) = match short {
                            126 if conn.buf.len() >= at + 4 => (u16::from_be_bytes([conn.buf[at + 2], conn.buf[at + 3]]) as usize, 8),
                            126 | 127 => break,
                            n => (n, 6),
                        };
                        if conn.buf.len() < at + header + len {
                            break;
                        }
                        at += header + len;
                        match opcode {
                            0x8 => closed = true,
                            _ => {
                                let _ = conn.stream.write(&pong);
                            }
                        }
                    }
                    conn.buf.drain(..at);
                }
                // Pipelined pushes are answered in order; anything else ends the loop.
                State::Request => {
                    while let Some(head_end) = conn.buf.windows(4).position(|w| w == b"\r\n\r\n").map(|at| at + 4) {
                        let head = String::from_utf8_lossy(&conn.buf[..head_end]).into_owned();
                        if head.starts_with("GET /ws") {
                            let key = head.lines().find_map(|l| l.strip_prefix("Sec-WebSocket-Key: ").or_else(|| l.strip_prefix("sec-websocket-key: "))).unwrap_or("").trim();
                            let accept = base64::engine::general_purpose::STANDARD.encode(sha1_smol::Sha1::from(format!("{key}{WEBSOCKET_GUID}")).digest().bytes());
                            let mut reply = format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n").into_bytes();
                            reply.extend_from_slice(&welcome);
                            let _ = conn.stream.write_all(&reply);
                            conn.state = State::WebSocket;
                            conn.buf.drain(..head_end);
                            let uid = head.split_once("uid=").map(|(_, rest)| rest.split(['&', ' ']).next().unwrap_or_default().to_owned());
                            if let Some(uid) = uid {
                                uids.insert(uid.clone(), token);
                                conn.uid = Some(uid);
                            }
                            break;
                        }
                        let length = head
                            .lines()
                            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap_or(0)))
                            .unwrap_or(0);
                        if conn.buf.len() < head_end + length {
                            break;
                        }
                        let path = head.split(' ').nth(1).unwrap_or_default();
                        if head.starts_with("POST ") && matches!(path, "/v1/push" | "/v1/batch") {
                            // Kept alive: the next request may follow in this buffer.
                            let body: Vec<u8> = conn.buf.drain(..head_end + length).skip(head_end).collect();
                            pushed.push((path.to_owned(), body));
                            continue;
                        }
                        broadcast_now = head.starts_with("POST /v1/broadcast");
                        if !broadcast_now {
                            let _ = conn.stream.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                            closed = true;
                        }
                        break;
                    }
                }
            }
            for (path, body) in pushed {
                let batch = path == "/v1/batch";
                let mut relayed = Vec::new();
                let relaying = relay.as_ref().is_some_and(Relay::has_peers);
                let reply = match push_all(&mut conns, &uids, &path, &body, &mut next_id, relaying.then_some(&mut relayed)) {
                    Err(error) => ok(&error),
                    Ok(results) => match relay.as_mut() {
                        Some(relay) if !relayed.is_empty() => {
                            relay.publish(&relayed, (token, batch, results))?;
                            continue;
                        }
                        _ => answer(&results, batch, 0),
                    },
                };
                if let Some(conn) = conns.get_mut(&token) {
                    let _ = conn.stream.write_all(reply.as_bytes());
                }
            }
            if broadcast_now {
                let (mut delivered, mut dropped) = (0usize, 0usize);
                if let Some(ring) = ring.as_mut() {
                    let fds: Vec<RawFd> = conns.values().filter(|c| matches!(c.state, State::WebSocket)).map(|c| c.stream.as_raw_fd()).collect();
                    (delivered, dropped) = broadcast_uring(ring, &fds, &broadcast)?;
                } else {
                    for other in conns.values_mut().filter(|c| matches!(c.state, State::WebSocket)) {
                        match other.stream.write(&broadcast) {
                            Ok(n) if n == broadcast.len() => delivered += 1,
                            _ => dropped += 1,
                        }
                    }
                }
                let body = format!(r#"{{"delivered":{delivered},"dropped":{dropped}}}"#);
                let reply = format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
                if let Some(conn) = conns.get_mut(&token) {
                    let _ = conn.stream.write_all(reply.as_bytes());
                }
                closed = true;
            }
            if closed {
                if let Some(mut conn) = conns.remove(&token) {
                    let _ = poll.registry().deregister(&mut conn.stream);
                    if let Some(uid) = conn.uid.take().filter(|uid| uids.get(uid) == Some(&token)) {
                        uids.remove(&uid);
                    }
                }
            }
        }
    }
}
