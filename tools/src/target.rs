//! Finding a server: a pid (whose admin port is found from its listening sockets) or an
//! admin URL; and the little HTTP these tools speak to it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

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

/// Socket inodes of a process's open file descriptors.
pub fn socket_inodes(pid: u32) -> Result<Vec<(i32, u64)>, String> {
    let dir = format!("/proc/{pid}/fd");
    let entries = std::fs::read_dir(&dir).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => format!("no process {pid}"),
        std::io::ErrorKind::PermissionDenied => format!("cannot read {dir}: permission denied (run as the server's user or root)"),
        _ => format!("cannot read {dir}: {e}"),
    })?;
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let Ok(link) = std::fs::read_link(entry.path()) else { continue };
        let link = link.to_string_lossy();
        let Some(inode) = link.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) else { continue };
        if let (Some(fd), Ok(inode)) = (entry.file_name().to_str().and_then(|f| f.parse().ok()), inode.parse()) {
            out.push((fd, inode));
        }
    }
    Ok(out)
}

/// One line of /proc/<pid>/net/tcp{,6}.
pub struct TcpEntry {
    pub local: SocketAddr,
    pub state: u8,
    pub inode: u64,
}

pub const TCP_ESTABLISHED: u8 = 0x01;
pub const TCP_LISTEN: u8 = 0x0A;

/// The IPv4 TCP sockets of the process's network namespace.
pub fn tcp_table(pid: u32) -> Vec<TcpEntry> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap_or_default();
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (ip, port) = f.get(1)?.split_once(':')?;
            let ip = u32::from_str_radix(ip, 16).ok()?;
            let port = u16::from_str_radix(port, 16).ok()?;
            let local = SocketAddr::from((std::net::Ipv4Addr::from(u32::from_be(ip)), port));
            Some(TcpEntry { local, state: u8::from_str_radix(f.get(3)?, 16).ok()?, inode: f.get(9)?.parse().ok()? })
        })
        .collect()
}

fn listening_ports(pid: u32) -> Result<Vec<SocketAddr>, String> {
    let mine: std::collections::HashSet<u64> = socket_inodes(pid)?.into_iter().map(|(_, i)| i).collect();
    let mut ports: Vec<SocketAddr> = tcp_table(pid)
        .into_iter()
        .filter(|e| e.state == TCP_LISTEN && mine.contains(&e.inode))
        .map(|e| if e.local.ip().is_unspecified() { SocketAddr::from(([127, 0, 0, 1], e.local.port())) } else { e.local })
        .collect();
    ports.sort();
    ports.dedup();
    Ok(ports)
}

/// A plain HTTP/1.1 GET: (status, body).
pub fn get(addr: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<(u16, Vec<u8>)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(timeout))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let split = response.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| std::io::Error::other("no HTTP head"))?;
    let head = String::from_utf8_lossy(&response[..split]).into_owned();
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut body = response.split_off(split + 4);
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        body = dechunk(&body);
    }
    Ok((status, body))
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = data.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&data[..eol]).trim(), 16).unwrap_or(0);
        if size == 0 || data.len() < eol + 2 + size {
            break;
        }
        out.extend_from_slice(&data[eol + 2..eol + 2 + size]);
        data = &data[(eol + 4 + size).min(data.len())..];
    }
    out
}
