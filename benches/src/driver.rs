//! Runs the servers under test (and, for several nodes, a `redis-server`) as child
//! processes and reads what the machine says about them: RSS from /proc, CPU time from
//! /proc/<pid>/stat, kernel socket memory from /proc/net/sockstat, the servers' own
//! metrics, and Redis's INFO.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct ServerProcess {
    child: Child,
    pub client: SocketAddr,
    pub admin: SocketAddr,
    /// Lines of its log that report a panic.
    pub panics: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// The release `pushline` next to this binary, unless `--server-bin` says otherwise.
pub fn default_server_bin() -> PathBuf {
    let me = std::env::current_exe().unwrap_or_default();
    me.with_file_name("pushline")
}

impl ServerProcess {
    pub fn start(bin: &PathBuf, extra: &[String]) -> Result<ServerProcess, String> {
        let mut command = Command::new(bin);
        command.args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--log", "warn,pushline::server=info"]).args(extra);
        ServerProcess::spawn(command, bin)
    }

    /// The floor server (`floor/`): this binary, in its hidden `floor-server` mode. Its
    /// `admin` address is a port of its own, with no metrics: a broadcast there reaches
    /// this process's connections. `uring`: its broadcasts go through io_uring.
    pub fn start_floor(uring: bool) -> Result<ServerProcess, String> {
        ServerProcess::start_floor_with(uring, &[])
    }

    /// As `start_floor`, with `extra` flags (`--listen`, `--reuse-port`).
    fn start_floor_with(uring: bool, extra: &[String]) -> Result<ServerProcess, String> {
        let me = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut command = Command::new(&me);
        command.arg("floor-server").args(extra);
        if uring {
            command.arg("--uring");
        }
        ServerProcess::spawn(command, &me)
    }

    /// Starts `command` and waits for its `listening client=ADDR admin=ADDR` line.
    fn spawn(mut command: Command, bin: &std::path::Path) -> Result<ServerProcess, String> {
        let mut child = command
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
        let panics = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = panics.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if line.contains("panicked") {
                    seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                eprintln!("[server] {line}");
            }
        });
        Ok(ServerProcess { child, client, admin, panics })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: the process gets no chance to close anything.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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

    /// Every series of metric `name`, whatever its labels, summed.
    pub async fn metric_total(&self, name: &str) -> f64 {
        let text = http_get(self.admin, "/metrics").await.unwrap_or_default();
        text.lines()
            .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with(['{', ' '])))
            .filter_map(|l| l.rsplit(' ').next()?.trim().parse::<f64>().ok())
            .sum()
    }

    /// Waits until a metric reaches `want`, up to `limit`.
    pub async fn wait_metric(&self, series: &str, want: f64, limit: Duration) -> Result<(), String> {
        self.wait_metric_until(series, limit, |v| v >= want).await
    }

    /// Waits until a metric satisfies `ok`, up to `limit`.
    pub async fn wait_metric_until(&self, series: &str, limit: Duration, ok: impl Fn(f64) -> bool) -> Result<(), String> {
        poll_metric(series, limit, ok, || self.metric(series)).await
    }
}

/// K server processes; with K > 1 they are nodes on a `redis-server` started here.
pub struct Nodes {
    pub servers: Vec<ServerProcess>,
    pub redis: Option<RedisProcess>,
}

impl Nodes {
    /// `shared`: every node on one port with SO_REUSEPORT (clients are spread by the
    /// kernel); otherwise each on a port of its own.
    pub fn start(common: &crate::Common, k: usize, shared: bool) -> Result<Nodes, String> {
        let redis = if k > 1 { Some(RedisProcess::start()?) } else { None };
        let port = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?.local_addr().map_err(|e| e.to_string())?.port();
        let mut servers = Vec::with_capacity(k);
        for _ in 0..k {
            let mut args = Vec::new();
            if let Some(redis) = &redis {
                args.extend(["--registry".into(), "redis".into(), "--redis-url".into(), redis.url()]);
            }
            if shared {
                args.extend(["--reuse-port".into(), "--listen".into(), format!("127.0.0.1:{port}")]);
            }
            args.extend(common.server_args.iter().cloned());
            servers.push(ServerProcess::start(&common.server_bin, &args)?);
        }
        Ok(Nodes { servers, redis })
    }

    /// K floor servers on one port (SO_REUSEPORT), for `scale`.
    pub fn start_floor(k: usize) -> Result<Nodes, String> {
        let port = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?.local_addr().map_err(|e| e.to_string())?.port();
        let args = ["--reuse-port".to_owned(), "--listen".to_owned(), format!("127.0.0.1:{port}")];
        let servers = (0..k).map(|_| ServerProcess::start_floor_with(false, &args)).collect::<Result<_, _>>()?;
        Ok(Nodes { servers, redis: None })
    }

    /// K floor servers on a `redis-server` started here, each on a port of its own: the
    /// first relays pushes for uids it does not hold to the others (`unicast --nodes K`).
    pub fn start_floor_on_redis(k: usize) -> Result<Nodes, String> {
        let redis = RedisProcess::start()?;
        let on_redis = ["--redis".to_owned(), format!("127.0.0.1:{}", redis.port)];
        let mut others = (1..k).map(|_| ServerProcess::start_floor_with(false, &on_redis)).collect::<Result<Vec<_>, _>>()?;
        let mut args = on_redis.to_vec();
        for other in &others {
            args.extend(["--relay-to".to_owned(), other.client.port().to_string()]);
        }
        let mut servers = vec![ServerProcess::start_floor_with(false, &args)?];
        servers.append(&mut others);
        Ok(Nodes { servers, redis: Some(redis) })
    }

    pub fn rss_bytes(&self) -> u64 {
        self.servers.iter().map(ServerProcess::rss_bytes).sum()
    }

    pub fn cpu_time(&self) -> CpuTime {
        self.servers.iter().map(ServerProcess::cpu_time).fold(CpuTime::default(), |a, b| CpuTime { user: a.user + b.user, system: a.system + b.system })
    }

    /// A metric summed over the nodes.
    pub async fn metric(&self, series: &str) -> f64 {
        let mut sum = 0.0;
        for server in &self.servers {
            sum += server.metric(series).await;
        }
        sum
    }

    /// Every series of metric `name` summed, over the nodes.
    pub async fn metric_total(&self, name: &str) -> f64 {
        let mut sum = 0.0;
        for server in &self.servers {
            sum += server.metric_total(name).await;
        }
        sum
    }

    /// Waits until the summed metric satisfies `ok`, up to `limit`.
    pub async fn wait_metric_until(&self, series: &str, limit: Duration, ok: impl Fn(f64) -> bool) -> Result<(), String> {
        poll_metric(series, limit, ok, || self.metric(series)).await.map_err(|e| format!("{e} (summed over the nodes)"))
    }

    /// Waits until the summed metric reaches `want`, up to `limit`.
    pub async fn wait_metric(&self, series: &str, want: f64, limit: Duration) -> Result<(), String> {
        self.wait_metric_until(series, limit, |v| v >= want).await
    }
}

/// A `redis-server` on a free port with no persistence.
/// redis-server's nice value: a weight of about 87 default processes under CFS.
const REDIS_NICE: i32 = -20;

pub struct RedisProcess {
    child: Child,
    pub port: u16,
}

impl RedisProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn start() -> Result<RedisProcess, String> {
        let port = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?.local_addr().map_err(|e| e.to_string())?.port();
        RedisProcess::start_on(port)
    }

    /// Kills the server (nothing is persisted) and starts an empty one on the same port.
    pub fn restart(&mut self) -> Result<(), String> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        *self = RedisProcess::start_on(self.port)?;
        Ok(())
    }

    fn start_on(port: u16) -> Result<RedisProcess, String> {
        let mut child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start redis-server ({e}); install it: apt-get install -y redis-server"))?;
        let mut lines = BufReader::new(child.stdout.take().ok_or("no stdout")?).lines();
        loop {
            let line = lines.next().ok_or("redis-server exited before it was ready")?.map_err(|e| e.to_string())?;
            if line.contains("Ready to accept connections") {
                break;
            }
        }
        std::thread::spawn(move || lines.for_each(drop));
        // A deployment gives Redis a core of its own. Here it shares two with every node
        // and client process, and at its fair share (1/121 of the CPU in a 1M scale run)
        // it answers past the nodes' command timeout and their liveness keys lapse: give
        // it the weight of a crowd of them.
        // SAFETY: setpriority reads nothing through pointers.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, child.id(), REDIS_NICE) } != 0 {
            eprintln!("note: could not raise redis-server's CPU priority (nice {REDIS_NICE}: {}); at scale it may starve", std::io::Error::last_os_error());
        }
        Ok(RedisProcess { child, port })
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `INFO all`, as `field -> value` for the numeric fields, with each
    /// `cmdstat_<command>`'s `calls` as `calls_<command>`.
    pub async fn info(&self) -> Result<std::collections::HashMap<String, f64>, String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.map_err(|e| e.to_string())?;
        stream.write_all(b"*2\r\n$4\r\nINFO\r\n$3\r\nall\r\n*1\r\n$4\r\nQUIT\r\n").await.map_err(|e| e.to_string())?;
        let mut text = String::new();
        stream.read_to_string(&mut text).await.map_err(|e| e.to_string())?;
        let mut out = std::collections::HashMap::new();
        for line in text.lines() {
            let Some((key, value)) = line.split_once(':') else { continue };
            if let Some(command) = key.strip_prefix("cmdstat_") {
                let calls = value.split(',').find_map(|kv| kv.strip_prefix("calls=")).and_then(|v| v.parse().ok());
                out.insert(format!("calls_{command}"), calls.unwrap_or(0.0));
            } else if let Ok(v) = value.trim().parse::<f64>() {
                out.insert(key.to_string(), v);
            }
        }
        Ok(out)
    }
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads a metric with `read` until `ok` holds for it; metrics have no change
/// notification to await.
async fn poll_metric<F: std::future::Future<Output = f64>>(
    series: &str,
    limit: Duration,
    ok: impl Fn(f64) -> bool,
    read: impl Fn() -> F,
) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    loop {
        let v = read().await;
        if ok(v) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{series} stayed at {v} for {limit:?}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn rss_bytes(pid: u32) -> u64 {
    pushline_alloc::process::Resident::of(pid).map_or(0, |r| r.rss)
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
    let Ok(stat) = procfs::process::Process::new(pid as i32).and_then(|p| p.stat()) else { return CpuTime::default() };
    let ticks = procfs::ticks_per_second().max(1);
    let of = |t: u64| Duration::from_micros(t * 1_000_000 / ticks);
    CpuTime { user: of(stat.utime), system: of(stat.stime) }
}

/// Kernel memory in TCP sockets, machine-wide.
pub fn tcp_kernel_bytes() -> u64 {
    pushline_alloc::socket::TcpSockstat::read().map_or(0, |s| s.mem_bytes())
}

/// A GET to the admin listener, enough for its endpoints.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<String, String> {
    http(addr, "GET", path, "").await
}

/// One HTTP request; the body of the answer, whatever its status.
pub async fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> Result<String, String> {
    if path.starts_with("/v1/") && crate::client::tls_enabled() {
        return crate::client::https(addr, method, path, body).await;
    }
    let (url, method, body) = (format!("http://{addr}{path}"), method.to_owned(), body.to_owned());
    let request = move || {
        let agent =
            ureq::Agent::new_with_config(ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(60))).build());
        let mut response = if method == "GET" {
            agent.get(&url).call()
        } else {
            agent.post(&url).content_type("application/json").send(body.as_bytes())
        }
        .map_err(|e| e.to_string())?;
        response.body_mut().with_config().limit(64 << 20).read_to_string().map_err(|e| e.to_string())
    };
    tokio::task::spawn_blocking(request).await.map_err(|e| e.to_string())?
}
