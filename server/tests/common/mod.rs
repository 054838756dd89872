//! Test harness: real servers on free loopback ports, real WebSocket, SSE and HTTP clients.
#![allow(dead_code)]

pub mod app;
pub mod proxy;
pub mod redis;

/// The server binary's allocator, so in-process servers count their sites as it does.
#[global_allocator]
static ALLOCATOR: pushline_alloc::SiteAllocator = pushline_alloc::SiteAllocator;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use pushline::{Config, Server};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Upper bound on any single wait in a test: a safety net, not a synchronization.
pub const WAIT: Duration = Duration::from_secs(10);

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub struct TestServer {
    pub server: Server,
    pub client: SocketAddr,
    pub admin: SocketAddr,
}

/// Starts an in-process server in open mode on free ports, after `tweak` edits its config.
pub async fn start(tweak: impl FnOnce(&mut Config)) -> TestServer {
    let mut config = Config::for_loopback();
    config.log = "warn".into();
    tweak(&mut config);
    let server = Server::start(config).await.expect("server starts");
    TestServer { client: server.client_addr(), admin: server.admin_addr(), server }
}

/// Opens `/ws?{query}` and returns the socket with its welcome frame.
pub async fn ws(addr: SocketAddr, query: &str) -> (Ws, Value) {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws?{query}")).await.expect("ws connects");
    let welcome = next_json(&mut ws).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    (ws, welcome)
}

/// The next text frame as JSON (answers pings on the way, as any client does).
pub async fn next_json(ws: &mut Ws) -> Value {
    next_json_within(ws, WAIT).await
}

/// [`next_json`], for a frame that may take longer than the wait (a partition to outlast).
pub async fn next_json_within(ws: &mut Ws, limit: Duration) -> Value {
    loop {
        let msg = tokio::time::timeout(limit, ws.next()).await.expect("frame within the wait").expect("stream open").expect("frame ok");
        match msg {
            Message::Text(text) => return serde_json::from_str(&text).expect("server sends JSON"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

pub async fn send_json(ws: &mut Ws, value: Value) {
    ws.send(Message::Text(value.to_string().into())).await.expect("send");
}

/// Subscribes and waits for the server's acknowledgement.
pub async fn subscribe(ws: &mut Ws, topics: &[&str]) {
    send_json(ws, serde_json::json!({"type": "subscribe", "topics": topics})).await;
    let ack = next_json(ws).await;
    assert_eq!(ack["type"], "subscribed", "{ack}");
}

/// POSTs JSON text to the client listener; returns status, headers and the JSON body.
pub async fn post_raw(addr: SocketAddr, path: &str, body: impl Into<reqwest::Body>, key: Option<&str>) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut req = reqwest::Client::new().post(format!("http://{addr}{path}")).body(body).header("content-type", "application/json");
    if let Some(key) = key {
        req = req.bearer_auth(key);
    }
    let response = req.send().await.expect("request sent");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.expect("body");
    let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("JSON body ({e}): {text}"));
    (status, headers, json)
}

pub async fn post(addr: SocketAddr, path: &str, body: Value) -> (u16, Value) {
    let (status, _, json) = post_raw(addr, path, body.to_string(), None).await;
    (status, json)
}

pub async fn metrics(admin: SocketAddr) -> String {
    reqwest::get(format!("http://{admin}/metrics")).await.expect("scrape").text().await.expect("text")
}

/// The value of one series, e.g. `pushline_messages_dropped_total{reason="queue_full"}`; 0 if absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .map(|v| v.trim().parse().expect("metric value"))
        .unwrap_or(0.0)
}

/// Scrapes until `series` satisfies `ok`; metrics have no change notification to await.
pub async fn wait_metric(admin: SocketAddr, series: &str, ok: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + WAIT;
    loop {
        let value = metric(&metrics(admin).await, series);
        if ok(value) {
            return value;
        }
        assert!(Instant::now() < deadline, "{series} stayed at {value}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads SSE events from a streaming response: (event, id, data).
pub struct Sse {
    stream: std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buf: String,
}

impl Sse {
    pub async fn open(addr: SocketAddr, query: &str) -> (reqwest::StatusCode, Sse) {
        let response = reqwest::get(format!("http://{addr}/sse?{query}")).await.expect("sse request");
        (response.status(), Sse::from_response(response))
    }

    pub fn from_response(response: reqwest::Response) -> Sse {
        Sse { stream: Box::pin(response.bytes_stream()), buf: String::new() }
    }

    pub async fn next_event(&mut self) -> (String, Option<String>, Value) {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let (mut event, mut id, mut data) = (String::from("message"), None, None);
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event: ") {
                        event = v.to_owned();
                    } else if let Some(v) = line.strip_prefix("id: ") {
                        id = Some(v.to_owned());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data = Some(serde_json::from_str(v).expect("SSE data is JSON"));
                    }
                }
                match data {
                    Some(data) => return (event, id, data),
                    None => continue, // a comment (keep-alive)
                }
            }
            let chunk = tokio::time::timeout(WAIT, self.stream.next()).await.expect("event within the wait").expect("stream open").expect("chunk");
            self.buf.push_str(std::str::from_utf8(&chunk).expect("utf-8"));
        }
    }
}

/// Opens `/ws?{query}` from a socket with a tiny receive buffer, and returns it once the
/// welcome is read. Such a client that stops reading backs up the server quickly.
pub async fn slow_ws(addr: SocketAddr, query: &str) -> WebSocketStream<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(addr).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}/ws?{query}"), stream).await.expect("ws handshake");
    let welcome = tokio::time::timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap();
    assert!(welcome.to_text().unwrap().contains("welcome"));
    ws
}

/// A `pushline` process started from the built binary, with the addresses it logged.
pub struct Process {
    pub child: std::process::Child,
    pub client: SocketAddr,
    pub admin: SocketAddr,
    /// What it logged up to and including the `listening` line.
    pub startup_log: Vec<String>,
    /// What it logged after that, as it arrives.
    log: std::sync::Arc<(std::sync::Mutex<Vec<String>>, std::sync::Condvar)>,
}

impl Process {
    /// Starts the binary with `args` (plus free loopback ports), with `before_exec` run in
    /// the child before exec (e.g. to lower its file limit).
    pub fn spawn(args: &[&str], before_exec: Option<fn() -> std::io::Result<()>>) -> Process {
        Process::spawn_with_env(args, before_exec, &[])
    }

    pub fn spawn_with_env(args: &[&str], before_exec: Option<fn() -> std::io::Result<()>>, env: &[(&str, &str)]) -> Process {
        use std::io::BufRead;
        use std::os::unix::process::CommandExt;
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_pushline"));
        command
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--log", "info"])
            .args(args)
            .envs(env.iter().copied())
            .stderr(std::process::Stdio::piped());
        if let Some(f) = before_exec {
            // SAFETY: the closure only calls setrlimit, which is async-signal-safe.
            unsafe { command.pre_exec(f) };
        }
        let mut child = KillOnDrop(Some(command.spawn().expect("pushline binary runs")));
        let stderr = child.0.as_mut().unwrap().stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + WAIT;
        let mut startup_log = Vec::new();
        loop {
            let line = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).expect("server logs its addresses");
            startup_log.push(line);
            let line = startup_log.last().unwrap();
            if let (Some(client), Some(admin)) = (address_after(line, "client="), address_after(line, "admin=")) {
                // Its later log is kept for wait_log, and goes to the test's output (shown
                // when a test fails).
                let log = std::sync::Arc::new((std::sync::Mutex::new(Vec::new()), std::sync::Condvar::new()));
                let kept = log.clone();
                std::thread::spawn(move || {
                    for line in rx {
                        eprintln!("[pushline] {line}");
                        kept.0.lock().unwrap().push(line);
                        kept.1.notify_all();
                    }
                });
                return Process { child: child.0.take().unwrap(), client, admin, startup_log, log };
            }
        }
    }

    /// Waits until the process logs a line containing `needle` (within the wait).
    pub fn wait_log(&self, needle: &str) -> String {
        let (lines, arrived) = &*self.log;
        let deadline = Instant::now() + WAIT;
        let mut lines = lines.lock().unwrap();
        loop {
            if let Some(line) = lines.iter().find(|l| l.contains(needle)) {
                return line.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "pushline never logged `{needle}`; it logged: {lines:?}");
            lines = arrived.wait_timeout(lines, left).unwrap().0;
        }
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill on our own child's pid.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, signal) }, 0);
    }

    /// Waits for the process to exit, within the wait.
    pub fn wait(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "pushline did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The socket address written after `key` in a log line (text or JSON).
fn address_after(line: &str, key: &str) -> Option<SocketAddr> {
    let rest = &line[line.find(key)? + key.len()..];
    let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || ".:[]".contains(c))).unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Kills a child that a failed start leaves behind, so a failing test leaves no process.
struct KillOnDrop(Option<std::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn get_json(addr: SocketAddr, path: &str) -> Value {
    let response = reqwest::get(format!("http://{addr}{path}")).await.expect("request");
    assert_eq!(response.status(), 200, "GET {path}");
    response.json().await.expect("JSON")
}

/// A GET's status and JSON body, whatever the status.
pub async fn get_raw(addr: SocketAddr, path: &str) -> (u16, Value) {
    let response = reqwest::get(format!("http://{addr}{path}")).await.expect("request");
    (response.status().as_u16(), response.json().await.expect("JSON"))
}

/// Opens `n` WebSocket connections as uids `{prefix}0..n`, with their welcomes read.
pub async fn many_ws(addr: SocketAddr, n: usize, prefix: &str) -> Vec<Ws> {
    let mut out = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
        let queries: Vec<String> = chunk.iter().map(|i| format!("uid={prefix}{i}")).collect();
        let opened = futures_util::future::join_all(queries.iter().map(|q| ws(addr, q))).await;
        out.extend(opened.into_iter().map(|(ws, _)| ws));
    }
    out
}

/// A WebSocket client that speaks raw frames, for sending what a well-behaved client
/// library never would.
pub struct RawWs {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl RawWs {
    /// Opens `/ws?{query}` and reads the welcome frame.
    pub async fn open(addr: SocketAddr, query: &str) -> RawWs {
        let mut raw = RawWs::handshake(addr, &format!("GET /ws?{query} HTTP/1.1\r\nHost: x\r\n")).await;
        let (opcode, welcome) = raw.next_frame().await.expect("welcome frame");
        assert_eq!(opcode, 1);
        assert!(String::from_utf8_lossy(&welcome).contains("welcome"));
        raw
    }

    /// Sends `request_line_and_headers` (ending in CRLF, without the upgrade headers,
    /// which are added) and expects 101.
    pub async fn handshake(addr: SocketAddr, request_line_and_headers: &str) -> RawWs {
        let (status, raw) = RawWs::try_handshake(addr, request_line_and_headers).await;
        assert_eq!(status, 101, "handshake refused");
        raw
    }

    /// Sends a handshake; returns the status and the connection.
    pub async fn try_handshake(addr: SocketAddr, request_line_and_headers: &str) -> (u16, RawWs) {
        RawWs::try_handshake_on(TcpStream::connect(addr).await.unwrap(), request_line_and_headers).await
    }

    /// A handshake on a socket the caller set up; expects 101.
    pub async fn handshake_on(stream: TcpStream, request_line_and_headers: &str) -> RawWs {
        let (status, raw) = RawWs::try_handshake_on(stream, request_line_and_headers).await;
        assert_eq!(status, 101, "handshake refused");
        raw
    }

    pub async fn try_handshake_on(mut stream: TcpStream, request_line_and_headers: &str) -> (u16, RawWs) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let request = format!(
            "{request_line_and_headers}Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let end = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(WAIT, stream.read(&mut chunk)).await.expect("response in time").unwrap();
            assert!(n > 0, "closed before a response: {}", String::from_utf8_lossy(&buf));
            buf.extend_from_slice(&chunk[..n]);
        };
        let status = String::from_utf8_lossy(&buf[..end]).split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let rest = buf.split_off(end);
        (status, RawWs { stream, buf: rest })
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        self.stream.write_all(bytes).await.unwrap();
    }

    /// The next server frame (opcode, payload); None when the server closed the socket.
    pub async fn next_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        use tokio::io::AsyncReadExt;
        loop {
            if self.buf.len() >= 2 {
                let (opcode, len) = (self.buf[0] & 0x0F, (self.buf[1] & 0x7F) as usize);
                let (len, at) = match len {
                    126 if self.buf.len() >= 4 => (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4),
                    127 if self.buf.len() >= 10 => (u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize, 10),
                    126 | 127 => (usize::MAX, 0),
                    n => (n, 2),
                };
                if len != usize::MAX && self.buf.len() >= at + len {
                    let payload = self.buf[at..at + len].to_vec();
                    self.buf.drain(..at + len);
                    return Some((opcode, payload));
                }
            }
            let mut chunk = [0u8; 65536];
            let n = tokio::time::timeout(WAIT, self.stream.read(&mut chunk)).await.expect("a frame within the wait").unwrap_or(0);
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads frames until a close frame; returns its code (None if it had none) after
    /// checking the server then closes the socket.
    pub async fn expect_close(&mut self) -> Option<u16> {
        loop {
            match self.next_frame().await {
                Some((0x8, payload)) => {
                    let code = (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                    assert!(self.next_frame().await.is_none(), "the server closes the socket after its close frame");
                    return code;
                }
                Some(_) => continue,
                None => panic!("the socket closed without a close frame"),
            }
        }
    }
}

/// The responses of one connection, parsed with httparse as they arrive: each one's
/// status, headers and body, until `n` are whole or the connection ends.
pub async fn responses(stream: &mut tokio::net::TcpStream, n: usize) -> Vec<(u16, Vec<(String, String)>, String)> {
    use tokio::io::AsyncReadExt;
    let (mut read, mut answered) = (Vec::new(), Vec::new());
    while answered.len() < n {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        if let Ok(httparse::Status::Complete(head)) = response.parse(&read) {
            let fields: Vec<(String, String)> =
                response.headers.iter().map(|h| (h.name.to_ascii_lowercase(), String::from_utf8_lossy(h.value).into_owned())).collect();
            let length: usize = fields.iter().find(|(k, _)| k == "content-length").map_or(0, |(_, v)| v.parse().unwrap());
            if response.code == Some(100) {
                read.drain(..head);
                continue;
            }
            if read.len() >= head + length {
                answered.push((response.code.unwrap(), fields, String::from_utf8_lossy(&read[head..head + length]).into_owned()));
                read.drain(..head + length);
                continue;
            }
        }
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout(std::time::Duration::from_secs(10), stream.read(&mut chunk)).await.expect("an answer within 10 s") {
            Ok(0) | Err(_) => break,
            Ok(got) => read.extend_from_slice(&chunk[..got]),
        }
    }
    answered
}

pub fn header<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}
