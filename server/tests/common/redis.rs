//! Real `redis-server` processes for the tests: a single server, or a 3-master Redis
//! Cluster built with `redis-cli --cluster create`, each on free loopback ports.

use std::io::BufRead;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use super::WAIT;

const INSTALL: &str = "install it with `apt-get install -y redis-server redis-tools` (scripts/test does this when run as root)";

pub struct RedisServer {
    child: Child,
    pub port: u16,
    dir: PathBuf,
}

/// A loopback port that is free, and (for cluster nodes) whose bus port +10000 is too.
fn free_port(with_bus: bool) -> u16 {
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
        let port = listener.local_addr().unwrap().port();
        if !with_bus {
            return port;
        }
        if port < 55_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

impl RedisServer {
    pub fn start() -> RedisServer {
        RedisServer::start_on(free_port(false), &[])
    }

    /// Starts `redis-server` on `port` with no persistence (a restart comes back empty),
    /// and returns once it says it accepts connections.
    pub fn start_on(port: u16, extra: &[&str]) -> RedisServer {
        let dir = std::env::temp_dir().join(format!("pushline-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut command = Command::new("redis-server");
        command.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]).arg("--dir").arg(&dir).args(extra);
        RedisServer::run(command, port, dir, "Ready to accept connections")
    }

    /// Starts a replica of the server on `master`, and returns once it has the master's data.
    pub fn replica_of(master: u16) -> RedisServer {
        let replica = RedisServer::start_on(free_port(false), &["--replicaof", "127.0.0.1", &master.to_string()]);
        let deadline = Instant::now() + WAIT;
        while !replica.cli(&["info", "replication"]).contains("master_link_status:up") {
            assert!(Instant::now() < deadline, "the replica did not reach its master");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        replica
    }

    /// Starts a Sentinel (`redis-server --sentinel`) watching the master `name` on port
    /// `master`, alone in its quorum, that calls a master down after `down_after_ms`;
    /// returns once it has found the master's replica (the one it can promote).
    pub fn sentinel(name: &str, master: u16, down_after_ms: u64) -> RedisServer {
        let port = free_port(false);
        let dir = std::env::temp_dir().join(format!("pushline-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Sentinel rewrites its configuration file as it learns, so it is one of its own.
        let conf = dir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {dir}\nsentinel monitor {name} 127.0.0.1 {master} 1\n\
                 sentinel down-after-milliseconds {name} {down_after_ms}\nsentinel failover-timeout {name} 10000\n",
                dir = dir.display()
            ),
        )
        .unwrap();
        let mut command = Command::new("redis-server");
        command.arg(&conf).arg("--sentinel");
        RedisServer::run(command, port, dir, "+slave ")
    }

    /// Starts a TLS-only `redis-server` with `extra` settings (certificates, users), and
    /// returns once it accepts connections.
    pub fn start_tls(extra: &[&str]) -> RedisServer {
        let port = free_port(false);
        let dir = std::env::temp_dir().join(format!("pushline-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut command = Command::new("redis-server");
        command.args(["--port", "0", "--tls-port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]).arg("--dir").arg(&dir).args(extra);
        RedisServer::run(command, port, dir, "Ready to accept connections")
    }

    fn run(mut command: Command, port: u16, dir: PathBuf, ready: &str) -> RedisServer {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run redis-server ({e}); {INSTALL}"));
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + WAIT;
        loop {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|_| panic!("redis-server on port {port} did not start"));
            if line.contains(ready) {
                return RedisServer { child, port, dir };
            }
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Runs `redis-cli` against this server and returns what it printed.
    pub fn cli(&self, args: &[&str]) -> String {
        cli(self.port, args)
    }

    /// Saves the dataset now and returns it: the copy a lagging replica holds.
    pub fn snapshot(&self) -> Vec<u8> {
        assert_eq!(self.cli(&["SAVE"]), "OK");
        std::fs::read(self.dir.join("dump.rdb")).expect("SAVE wrote dump.rdb")
    }

    /// Starts `redis-server` on `port` from `snapshot` (what [`RedisServer::snapshot`]
    /// returned): a replica promoted in the master's place, or a restore.
    pub fn start_from(port: u16, snapshot: &[u8]) -> RedisServer {
        let dir = std::env::temp_dir().join(format!("pushline-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("dump.rdb"), snapshot).unwrap();
        RedisServer::start_on(port, &[])
    }

    /// Kills the server where it stands (SIGKILL), for one in a cluster's list.
    pub fn crash(&self) {
        // SAFETY: kill on our own child's pid.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) }, 0);
    }

    /// Kills the server (SIGKILL: nothing saved, clients see the connection drop).
    pub fn kill(mut self) -> u16 {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.port
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run redis-cli ({e}); {INSTALL}"));
    assert!(out.status.success(), "redis-cli {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// How each cluster node runs. A replica may take over however long its master has been gone.
const CLUSTER_NODE: &[&str] = &["--cluster-enabled", "yes", "--cluster-node-timeout", "2000", "--cluster-replica-validity-factor", "0"];

/// Three masters (and, if asked, a replica of each), all slots assigned.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        RedisCluster::start_with_replicas(0)
    }

    /// Three masters with `replicas` replicas each: `nodes[..3]` start as the masters.
    pub fn start_with_replicas(replicas: usize) -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..3 * (1 + replicas)).map(|_| RedisServer::start_on(free_port(true), CLUSTER_NODE)).collect();
        let addrs: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let mut args = vec!["--cluster", "create"];
        args.extend(addrs.iter().map(String::as_str));
        let replicas = replicas.to_string();
        args.extend(["--cluster-replicas", &replicas, "--cluster-yes"]);
        let created = cli(nodes[0].port, &args);
        assert!(created.contains("All 16384 slots covered"), "cluster create: {created}");
        // The masters agree on the slot map by gossip; wait for every one to say so.
        let deadline = Instant::now() + WAIT;
        for node in &nodes {
            while !node.cli(&["cluster", "info"]).contains("cluster_state:ok") {
                assert!(Instant::now() < deadline, "cluster did not reach state ok");
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
        // A replica that has not synced cannot take over.
        for node in &nodes {
            loop {
                let replication = node.cli(&["info", "replication"]);
                if replication.contains("role:master") || replication.contains("master_link_status:up") {
                    break;
                }
                assert!(Instant::now() < deadline, "a replica did not sync with its master");
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
        RedisCluster { nodes }
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// Kills master `node` (SIGKILL) and starts it again on its port and directory: it
    /// comes back with its identity and slots (its nodes.conf) and none of its keys, as a
    /// master without persistence does; returns once the cluster is whole again.
    pub fn restart_empty(&mut self, node: usize) {
        let old = &mut self.nodes[node];
        let _ = old.child.kill();
        let _ = old.child.wait();
        let mut command = Command::new("redis-server");
        command.args(["--port", &old.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]).arg("--dir").arg(&old.dir).args(CLUSTER_NODE);
        let fresh = RedisServer::run(command, old.port, old.dir.clone(), "Ready to accept connections");
        // The directory is the new server's now: not removed with the old one.
        std::mem::forget(std::mem::replace(old, fresh));
        let deadline = Instant::now() + WAIT;
        for node in &self.nodes {
            while !node.cli(&["cluster", "info"]).contains("cluster_state:ok") {
                assert!(Instant::now() < deadline, "the cluster did not take the restarted master back");
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    }

    pub fn id(&self, node: usize) -> String {
        self.nodes[node].cli(&["cluster", "myid"])
    }

    /// The master holding `key`'s slot.
    pub fn owner(&self, key: &str) -> usize {
        let slot: u16 = self.nodes[0].cli(&["cluster", "keyslot", key]).parse().unwrap();
        let table = self.nodes[0].cli(&["cluster", "nodes"]);
        for line in table.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let port: u16 = fields[1].split(['@', ':']).nth(1).unwrap().parse().unwrap();
            let ranges: Vec<(u16, u16)> = fields[8..]
                .iter()
                .filter(|r| !r.starts_with('['))
                .map(|r| match r.split_once('-') {
                    Some((a, b)) => (a.parse().unwrap(), b.parse().unwrap()),
                    None => (r.parse().unwrap(), r.parse().unwrap()),
                })
                .collect();
            if ranges.iter().any(|(a, b)| (*a..=*b).contains(&slot)) {
                return self.nodes.iter().position(|n| n.port == port).unwrap();
            }
        }
        panic!("no master holds slot {slot}: {table}");
    }

    /// Moves `key`'s slot from master `from` to master `to`, keys and all, the way
    /// `redis-cli --cluster reshard` moves each slot: importing, migrating, MIGRATE of
    /// every key, then the new owner told to every master.
    pub fn migrate_slot_of(&self, key: &str, from: usize, to: usize) {
        let slot = self.nodes[0].cli(&["cluster", "keyslot", key]);
        let (from_id, to_id) = (self.id(from), self.id(to));
        let (source, target) = (&self.nodes[from], &self.nodes[to]);
        assert_eq!(target.cli(&["cluster", "setslot", &slot, "importing", &from_id]), "OK");
        assert_eq!(source.cli(&["cluster", "setslot", &slot, "migrating", &to_id]), "OK");
        loop {
            let keys = source.cli(&["cluster", "getkeysinslot", &slot, "100"]);
            if keys.is_empty() {
                break;
            }
            let port = target.port.to_string();
            let mut args = vec!["migrate", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
            args.extend(keys.lines());
            source.cli(&args);
        }
        for node in &self.nodes {
            assert_eq!(node.cli(&["cluster", "setslot", &slot, "node", &to_id]), "OK");
        }
    }
}
