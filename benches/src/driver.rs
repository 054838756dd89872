//! Runs the server under test as a child process and reads what the machine says about
//! it: RSS from /proc, CPU time from /proc/<pid>/stat, kernel socket memory from
//! /proc/net/sockstat, and the server's own metrics.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct ServerProcess {
    child: Child,
    pub client: SocketAddr,
    pub admin: SocketAddr,
}

/// The release `pushline` next to this binary, unless `--server-bin` says otherwise.
pub fn default_server_bin() -> PathBuf {
    let me = std::env::current_exe().unwrap_or_default();
    me.with_file_name("pushline")
}

impl ServerProcess {
    pub fn start(bin: &PathBuf, extra: &[String]) -> Result<ServerProcess, String> {
        let mut child = Command::new(bin)
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--log", "warn,pushline::server=info"])
            .args(extra)
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e} (build it: cargo build --release)", bin.display()))?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        let (client, admin) = loop {
            let line = lines.next().ok_or("server exited before listening")?.map_err(|e| e.to_string())?;
            if let Some(rest) = line.split("listening client=").nth(1) {
                let (c, a) = rest.split_once(" admin=").ok_or("bad listening line")?;
                break (c.trim().parse().map_err(|_| "bad addr")?, a.trim().parse().map_err(|_| "bad addr")?);
            }
        };
        std::thread::spawn(move || lines.map_while(Result::ok).for_each(|l| eprintln!("[server] {l}")));
        Ok(ServerProcess { child, client, admin })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn rss_bytes(&self) -> u64 {
        rss_bytes(self.pid())
    }

    /// CPU time the server has used: (user, system).
    pub fn cpu_time(&self) -> CpuTime {
        cpu_time(self.pid())
    }

    pub async fn metric(&self, series: &str) -> f64 {
        let text = http_get(self.admin, "/metrics").await.unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// Waits until a metric reaches `want`, up to `limit`.
    pub async fn wait_metric(&self, series: &str, want: f64, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        loop {
            let v = self.metric(series).await;
            if v >= want {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("{series} reached {v}, not {want}"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// CPU time in user space and in the kernel (where loopback TCP for both ends is charged).
#[derive(Clone, Copy, Default)]
pub struct CpuTime {
    pub user: Duration,
    pub system: Duration,
}

impl CpuTime {
    pub fn since(self, before: CpuTime) -> CpuTime {
        CpuTime { user: self.user.saturating_sub(before.user), system: self.system.saturating_sub(before.system) }
    }

    pub fn total(self) -> Duration {
        self.user + self.system
    }
}

pub fn cpu_time(pid: u32) -> CpuTime {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at ")".
    let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, r)| r).split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // Clock ticks are USER_HZ, 100 on every Linux ABI Pushline runs on.
    CpuTime { user: Duration::from_millis(ticks(11) * 10), system: Duration::from_millis(ticks(12) * 10) }
}

/// Kernel memory in TCP sockets, machine-wide (the `mem` field of /proc/net/sockstat, in pages).
pub fn tcp_kernel_bytes() -> u64 {
    let text = std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with("TCP:"))
        .and_then(|l| l.split_whitespace().skip_while(|w| *w != "mem").nth(1))
        .and_then(|p| p.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

/// A plain HTTP/1.1 GET, enough for the admin endpoints.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    http(addr, "GET", path, "").await
}

pub async fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    Ok(response.split_once("\r\n\r\n").map_or(String::new(), |(_, b)| b.to_owned()))
}
