//! `memory-audit`: where a live server's memory goes, per connection, from the pid alone:
//! the kernel (socket structures from /proc/slabinfo object sizes, queued bytes from
//! SO_MEMINFO on the server's own sockets), the allocator (the server's site table, read
//! straight out of its memory), and the process (RSS from /proc).

use std::collections::HashMap;
use std::os::unix::fs::FileExt;

use object::{Object, ObjectSymbol};
use pushline_alloc::process::Resident;
use pushline_alloc::socket::{SocketMemory, SocketSlabs};
use pushline_alloc::table::{self, SiteStats};
use pushline_alloc::Site;
use serde::Serialize;

use crate::target::{is_established, socket_inodes, tcp_table};

#[derive(Serialize)]
pub struct Audit {
    pub pid: u32,
    pub connections: u64,
    pub process: Process,
    pub sites: Vec<SiteStats>,
    pub kernel: Kernel,
    pub per_connection: PerConnection,
}

#[derive(Serialize)]
pub struct Process {
    pub rss: u64,
    pub rss_anon: u64,
    pub rss_file: u64,
    /// Bytes the server's code holds, by the site table (requested sizes).
    pub allocated_by_sites: i64,
    /// RSS not accounted for by live allocations: code, stacks, allocator slack and caches.
    pub unaccounted: i64,
}

#[derive(Serialize)]
pub struct Kernel {
    pub tcp_sockets: u64,
    pub established: u64,
    /// Bytes of slab objects per TCP socket (None without read access to /proc/slabinfo).
    pub socket_struct_bytes: Option<u64>,
    pub receive_queue: u64,
    pub send_queue: u64,
    pub forward_alloc: u64,
    /// Sockets whose SO_MEMINFO could not be read (no permission to take their fds).
    pub unreadable_sockets: u64,
}

#[derive(Serialize)]
pub struct PerConnection {
    /// Live bytes of the sites that grow with connections, per connection.
    pub user_space: f64,
    pub by_site: HashMap<String, f64>,
    /// Socket structures plus queued bytes, per connection.
    pub kernel: f64,
    pub total: f64,
}

pub fn audit(pid: u32) -> Result<Audit, String> {
    let sites = read_site_table(pid)?;
    let Resident { rss, anon: rss_anon, file: rss_file } = Resident::of(pid)?;

    let inodes: HashMap<u64, i32> = socket_inodes(pid)?.into_iter().map(|(fd, inode)| (inode, fd)).collect();
    let tcp: Vec<_> = tcp_table(pid).into_iter().filter(|e| inodes.contains_key(&e.inode)).collect();
    let established = tcp.iter().filter(|e| is_established(e)).count();
    let (mut buffers, mut unreadable) = (SocketMemory::default(), 0);
    match socket_buffers(pid, tcp.iter().map(|e| inodes[&e.inode])) {
        Ok(each) => {
            for b in each {
                match b {
                    Some(b) => buffers = buffers.add(b),
                    None => unreadable += 1,
                }
            }
        }
        Err(_) => unreadable = tcp.len() as u64,
    }
    let (receive, send, forward) = (buffers.rmem_alloc, buffers.wmem_queued, buffers.fwd_alloc);
    let socket_struct_bytes = SocketSlabs::read().map(|s| s.bytes_per_socket());

    let connections = established as u64;
    let per = |bytes: f64| if connections == 0 { 0.0 } else { bytes / connections as f64 };
    let wanted = Site::PER_CONNECTION.map(Site::name);
    let by_site: HashMap<String, f64> =
        sites.iter().filter(|s| wanted.contains(&s.site.as_str())).map(|s| (s.site.clone(), per(s.live_bytes as f64))).collect();
    let user_space: f64 = by_site.values().sum();
    let kernel = socket_struct_bytes.unwrap_or(0) as f64 * tcp.len() as f64 + (receive + send + forward) as f64;
    let allocated_by_sites: i64 = sites.iter().map(|s| s.live_bytes).sum();
    Ok(Audit {
        pid,
        connections,
        process: Process { rss, rss_anon, rss_file, allocated_by_sites, unaccounted: rss as i64 - allocated_by_sites },
        sites,
        kernel: Kernel {
            tcp_sockets: tcp.len() as u64,
            established: connections,
            socket_struct_bytes,
            receive_queue: receive,
            send_queue: send,
            forward_alloc: forward,
            unreadable_sockets: unreadable,
        },
        per_connection: PerConnection { user_space, by_site, kernel: per(kernel), total: user_space + per(kernel) },
    })
}

/// Reads `PUSHLINE_ALLOC_SITES` out of the live process: the symbol's address from the
/// executable's symbol table, the load address from /proc/<pid>/maps, the bytes from
/// /proc/<pid>/mem, decoded by `pushline_alloc::table::parse` (the layout's one reader).
pub fn read_site_table(pid: u32) -> Result<Vec<SiteStats>, String> {
    let exe = format!("/proc/{pid}/exe");
    let data = std::fs::read(&exe).map_err(|e| match e.kind() {
        std::io::ErrorKind::PermissionDenied => format!("cannot read {exe}: permission denied (run as root or the server's user)"),
        std::io::ErrorKind::NotFound => format!("no process {pid}"),
        _ => format!("cannot read {exe}: {e}"),
    })?;
    let file = object::File::parse(&*data).map_err(|e| format!("{exe} is not an ELF file: {e}"))?;
    let symbol = file
        .symbols()
        .find(|s| s.name() == Ok("PUSHLINE_ALLOC_SITES"))
        .ok_or_else(|| format!("pid {pid} is not a Pushline server, or was built without the site table (no PUSHLINE_ALLOC_SITES symbol in {exe})"))?;
    let address = load_base(pid, &file)? + symbol.address();
    let mem = std::fs::File::open(format!("/proc/{pid}/mem"))
        .map_err(|e| format!("cannot open /proc/{pid}/mem: {e} (needs ptrace permission: root, or the same user with kernel.yama.ptrace_scope=0)"))?;
    let read = |len: usize| {
        let mut bytes = vec![0u8; len];
        mem.read_exact_at(&mut bytes, address).map(|_| bytes).map_err(|e| format!("cannot read the site table at {address:#x} in pid {pid}: {e}"))
    };
    let len = table::len_from_header(&read(table::HEADER_LEN)?)?;
    let sites = table::parse(&read(len)?)?;
    if sites.iter().all(|s| s.total_allocs == 0) {
        return Err(format!(
            "pid {pid} is not a Pushline server: it has the site table, but its allocator never counted an allocation (its global allocator is not pushline_alloc::SiteAllocator, or --alloc-tracking=false)"
        ));
    }
    Ok(sites)
}

/// Where the executable is mapped: for a position-independent binary, the start of its
/// first mapping minus that mapping's file offset, adjusted by the ELF's first load address.
fn load_base(pid: u32, file: &object::File) -> Result<u64, String> {
    if file.kind() != object::ObjectKind::Dynamic {
        return Ok(0);
    }
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).map_err(|e| format!("pid {pid}: {e}"))?;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).map_err(|e| format!("pid {pid}: {e}"))?;
    for line in maps.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() >= 6 && std::path::Path::new(f[5]) == exe {
            let start = u64::from_str_radix(f[0].split('-').next().unwrap_or("0"), 16).unwrap_or(0);
            let offset = u64::from_str_radix(f[2], 16).unwrap_or(0);
            return Ok(start - offset);
        }
    }
    Err(format!("pid {pid}: its executable is not in /proc/{pid}/maps"))
}

/// SO_MEMINFO of each of the process's sockets, through fds duplicated with pidfd_getfd.
fn socket_buffers(pid: u32, fds: impl Iterator<Item = i32>) -> Result<Vec<Option<SocketMemory>>, String> {
    // SAFETY: pidfd_open takes two integers and returns a new fd or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) } as i32;
    if pidfd < 0 {
        return Err(format!("pidfd_open({pid}): {}", std::io::Error::last_os_error()));
    }
    let out = fds
        .map(|fd| {
            // SAFETY: pidfd_getfd takes integers and returns a new fd of ours, or -1.
            let local = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd, fd, 0) } as i32;
            if local < 0 {
                return None;
            }
            let memory = SocketMemory::of_fd(local);
            // SAFETY: `local` is an fd this function opened and nothing else holds.
            unsafe { libc::close(local) };
            memory
        })
        .collect();
    // SAFETY: `pidfd` was opened above and is closed once.
    unsafe { libc::close(pidfd) };
    Ok(out)
}

pub fn print(a: &Audit) {
    let kib = |b: f64| format!("{:.1} KiB", b / 1024.0);
    println!("pushline pid {}: {} connections (established TCP)", a.pid, a.connections);
    println!();
    println!("process       rss {}   anon {}   file {}", kib(a.process.rss as f64), kib(a.process.rss_anon as f64), kib(a.process.rss_file as f64));
    println!("              allocated by sites {}   not accounted (code, stacks, allocator slack) {}", kib(a.process.allocated_by_sites as f64), kib(a.process.unaccounted as f64));
    println!();
    println!("{:<18} {:>14} {:>12} {:>14} {:>12}", "site", "live bytes", "live allocs", "allocs total", "per conn");
    for s in &a.sites {
        let per = a.per_connection.by_site.get(&s.site).map_or(String::new(), |v| format!("{v:.0} B"));
        println!("{:<18} {:>14} {:>12} {:>14} {:>12}", s.site, s.live_bytes, s.live_allocs, s.total_allocs, per);
    }
    println!();
    let k = &a.kernel;
    let structs = k.socket_struct_bytes.map_or("unknown (needs /proc/slabinfo: root)".to_owned(), |b| format!("{b} B per socket"));
    println!("kernel        {} TCP sockets ({} established); socket structures {structs}", k.tcp_sockets, k.established);
    println!("              queued: receive {} B, send {} B, forward-allocated {} B{}", k.receive_queue, k.send_queue, k.forward_alloc,
        if k.unreadable_sockets > 0 { format!("; {} sockets unreadable (needs root)", k.unreadable_sockets) } else { String::new() });
    println!();
    let p = &a.per_connection;
    println!("per connection: user space {:.0} B + kernel {:.0} B = {:.0} B", p.user_space, p.kernel, p.total);
}
