//! Finding a server: a pid (whose admin port is found from its listening sockets) or an
//! admin URL; and the HTTP these tools speak to it.

use std::net::SocketAddr;
use std::time::Duration;

use procfs::net::TcpState;
use procfs::process::{FDTarget, Process};

/// Largest answer read from an admin endpoint (a flame graph of a big profile).
const MAX_BODY: u64 = 256 * 1024 * 1024;

/// A running server's admin listener.
pub struct Admin {
    pub addr: SocketAddr,
}

impl Admin {
    /// `target` is a pid, or an address like `http://127.0.0.1:9091` or `127.0.0.1:9091`.
    pub fn find(target: &str) -> Result<Admin, String> {
        if let Ok(pid) = target.parse::<u32>() {
            return Admin::of_pid(pid);
        }
        let addr = target.trim_start_matches("http://").trim_end_matches('/');
        let addr = addr.parse().map_err(|_| format!("`{target}` is neither a pid nor an admin address (host:port)"))?;
        Ok(Admin { addr })
    }

    /// Tries each TCP port the process listens on until one answers as a Pushline admin.
    pub fn of_pid(pid: u32) -> Result<Admin, String> {
        let ports = listening_ports(pid)?;
        for addr in &ports {
            if let Ok((200, body)) = get(*addr, "/debug/objects", Duration::from_secs(2)) {
                if String::from_utf8_lossy(&body).contains("\"connections\"") {
                    return Ok(Admin { addr: *addr });
                }
            }
        }
        Err(format!("pid {pid} listens on {ports:?} but none answers as a Pushline admin listener (/debug/objects)"))
    }

    /// GETs `path`; a non-200 answer is an error carrying the server's message.
    pub fn get(&self, path: &str, timeout: Duration) -> Result<Vec<u8>, String> {
        match get(self.addr, path, timeout) {
            Ok((200, body)) => Ok(body),
            Ok((status, body)) => Err(format!("{path}: HTTP {status}: {}", String::from_utf8_lossy(&body).trim())),
            Err(e) => Err(format!("{path} from {}: {e}", self.addr)),
        }
    }
}

fn process(pid: u32) -> Result<Process, String> {
    Process::new(pid as i32).map_err(|e| format!("pid {pid}: {e}"))
}

/// (fd, socket inode) of each socket a process has open.
pub fn socket_inodes(pid: u32) -> Result<Vec<(i32, u64)>, String> {
    let fds = process(pid)?.fd().map_err(|e| match e {
        procfs::ProcError::PermissionDenied(_) => {
            format!("cannot read /proc/{pid}/fd: permission denied (run as the server's user or root)")
        }
        e => format!("cannot read /proc/{pid}/fd: {e}"),
    })?;
    Ok(fds
        .flatten()
        .filter_map(|fd| match fd.target {
            FDTarget::Socket(inode) => Some((fd.fd, inode)),
            _ => None,
        })
        .collect())
}

/// The IPv4 TCP sockets of the process's network namespace.
pub fn tcp_table(pid: u32) -> Vec<procfs::net::TcpNetEntry> {
    process(pid).and_then(|p| p.tcp().map_err(|e| e.to_string())).unwrap_or_default()
}

pub fn is_established(entry: &procfs::net::TcpNetEntry) -> bool {
    entry.state == TcpState::Established
}

fn listening_ports(pid: u32) -> Result<Vec<SocketAddr>, String> {
    let mine: std::collections::HashSet<u64> = socket_inodes(pid)?.into_iter().map(|(_, i)| i).collect();
    let mut ports: Vec<SocketAddr> = tcp_table(pid)
        .into_iter()
        .filter(|e| e.state == TcpState::Listen && mine.contains(&e.inode))
        .map(|e| if e.local_address.ip().is_unspecified() { SocketAddr::from(([127, 0, 0, 1], e.local_address.port())) } else { e.local_address })
        .collect();
    ports.sort();
    ports.dedup();
    Ok(ports)
}

/// An HTTP GET: (status, body).
pub fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(u16, Vec<u8>), String> {
    let agent = ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .timeout_connect(Some(Duration::from_secs(2)))
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .build(),
    );
    let mut response = agent.get(&format!("http://{addr}{path}")).call().map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body = response.body_mut().with_config().limit(MAX_BODY).read_to_vec().map_err(|e| e.to_string())?;
    Ok((status, body))
}
