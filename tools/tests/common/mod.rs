//! Harness for the toolkit's tests: the real `pushline` binary, real WebSocket clients.
#![allow(dead_code)]

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::net::TcpStream;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const WAIT: Duration = Duration::from_secs(20);

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A binary of the workspace, next to this test's `pushline-tools`.
pub fn bin(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_BIN_EXE_pushline-tools")).with_file_name(name);
    assert!(path.exists(), "{} is not built (cargo test --workspace builds it)", path.display());
    path
}

pub struct Server {
    pub child: Child,
    pub client: SocketAddr,
    pub admin: SocketAddr,
}

impl Server {
    pub fn start(env: &[(&str, &str)]) -> Server {
        let mut child = Command::new(bin("pushline"))
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--log", "info"])
            .envs(env.iter().copied())
            .stderr(Stdio::piped())
            .spawn()
            .expect("pushline starts");
        let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
        loop {
            let line = lines.next().expect("server logs its addresses").unwrap();
            if let Some(rest) = line.split("listening client=").nth(1) {
                let (client, admin) = rest.split_once(" admin=").unwrap();
                let (client, admin) = (client.trim().parse().unwrap(), admin.trim().parse().unwrap());
                std::thread::spawn(move || lines.map_while(Result::ok).for_each(|l| eprintln!("[pushline] {l}")));
                return Server { child, client, admin };
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn rss(&self) -> u64 {
        pushline_alloc::process::Resident::of(self.pid()).unwrap().rss
    }

    /// RSS once the allocator has given back the pages it keeps for reuse
    /// (`POST /debug/memory/purge`): what the server's live data costs.
    pub async fn purged_rss(&self) -> u64 {
        let reply = http(self.admin, "POST", "/debug/memory/purge", "").await;
        assert!(reply.contains("jemalloc"), "purge: {reply}");
        self.rss()
    }

    pub async fn connections(&self) -> u64 {
        let objects: serde_json::Value = serde_json::from_str(&http(self.admin, "GET", "/debug/objects", "").await).unwrap();
        objects["connections"].as_u64().unwrap()
    }

    /// Waits until the server counts `n` connections.
    pub async fn wait_connections(&self, n: u64) {
        let deadline = Instant::now() + WAIT;
        while self.connections().await != n {
            assert!(Instant::now() < deadline, "server never reached {n} connections");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Opens `n` WebSocket connections and reads each welcome.
pub async fn open(addr: SocketAddr, n: usize, prefix: &str) -> Vec<Ws> {
    let mut out = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(200) {
        let opened = futures_util::future::join_all(chunk.iter().map(|i| {
            let url = format!("ws://{addr}/ws?uid={prefix}{i}");
            async move {
                let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("connects");
                tokio::time::timeout(WAIT, ws.next()).await.expect("welcome").expect("open").expect("frame");
                ws
            }
        }))
        .await;
        out.extend(opened);
    }
    out
}

/// Keeps clients reading, so what is sent to them is written, not queued.
pub fn drain(clients: Vec<Ws>) -> Vec<tokio::task::JoinHandle<()>> {
    clients.into_iter().map(|mut ws| tokio::spawn(async move { while let Some(Ok(_)) = ws.next().await {} })).collect()
}

/// Broadcasts until the returned task is aborted.
pub fn load(addr: SocketAddr) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let body = format!(r#"{{"data":"{}"}}"#, "x".repeat(400));
            http(addr, "POST", "/v1/broadcast", &body).await;
        }
    })
}

pub async fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let request = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default()
}

/// Runs `pushline-tools` with `args`; returns stdout, failing the test on a non-zero exit.
pub fn tools(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_pushline-tools")).args(args).output().unwrap();
    assert!(out.status.success(), "pushline-tools {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Bytes of live objects in the slab caches a TCP socket takes objects from
/// (machine-wide: other processes' files and sockets move it too).
pub fn slab_bytes() -> u64 {
    pushline_alloc::socket::SocketSlabs::read().expect("/proc/slabinfo (root)").object_bytes()
}

/// Anonymous resident memory of `pid` (RssAnon): what its heap and stacks hold.
pub fn anon(pid: u32) -> u64 {
    pushline_alloc::process::Resident::of(pid).unwrap().anon
}

/// Tests here read other processes' memory and sockets: they need root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { geteuid() }, 0, "these tests read /proc/<pid>/mem, /proc/slabinfo and other processes' sockets: run them as root");
}

extern "C" {
    fn geteuid() -> u32;
}

/// A real `redis-server` on a free loopback port, with no persistence; killed on drop.
pub struct Redis {
    child: Child,
    pub url: String,
}

impl Redis {
    pub fn start() -> Redis {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("redis-server runs; install it with `apt-get install -y redis-server` (scripts/test does this as root)");
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        while !lines.next().expect("redis-server starts").unwrap().contains("Ready to accept connections") {}
        std::thread::spawn(move || lines.for_each(drop));
        Redis { child, url: format!("redis://127.0.0.1:{port}") }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
