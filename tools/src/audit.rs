//! `memory-audit`: where a live server's memory goes, per connection, from the pid alone.
//!
//! User space is the growth of the server's anonymous memory since just before its first
//! connection (the server keeps a reading from then), split into lines that add up to it: the live
//! bytes of the connection sites (usable sizes, from the site table read straight out of
//! the process's memory), other sites, what jemalloc keeps in thread caches, space lost
//! inside its pages, dirty pages and metadata, and memory outside the heap (stacks). The
//! kernel part is each socket's slab objects, measured as the growth of those caches per
//! new TCP socket on the machine when enough sockets came since the start, with the
//! object-size model beside it, plus the bytes queued in the server's sockets (SO_MEMINFO).

use std::collections::HashMap;
use std::os::unix::fs::FileExt;

use object::{Object, ObjectSymbol};
use std::collections::BTreeMap;
use std::time::Duration;

use pushline_alloc::process::Resident;
use pushline_alloc::socket::{SocketMemory, SocketSlabs};
use pushline_alloc::table::{self, SiteStats};
use pushline_alloc::Site;
use serde::{Deserialize, Serialize};

use crate::target::{is_established, socket_inodes, tcp_table, Admin};

#[derive(Serialize)]
pub struct Audit {
    pub pid: u32,
    pub connections: u64,
    pub process: Resident,
    pub sites: Vec<SiteStats>,
    pub user_space: UserSpace,
    pub kernel: Kernel,
    pub per_connection: PerConnection,
}

/// Growth since the server started, per connection, in bytes. The lines add up to
/// `total`, which is the growth of the process's anonymous memory (RssAnon).
#[derive(Serialize, Default)]
pub struct UserSpace {
    pub since_first_connection_s: f64,
    /// Live bytes of the sites that grow with connections, at their usable (size-class) size.
    pub connection_sites: f64,
    pub by_site: BTreeMap<String, f64>,
    /// Live bytes of every other site.
    pub other_sites: f64,
    /// Freed blocks jemalloc's thread caches keep for reuse.
    pub thread_caches: f64,
    /// Allocated bytes no site was charged for (allocations made before tracking began).
    pub not_charged: f64,
    /// Space inside jemalloc's pages that holds no live block: active - allocated.
    pub slack_in_pages: f64,
    /// Pages jemalloc keeps (dirty, not yet returned) and its metadata: resident - active.
    pub dirty_and_metadata: f64,
    /// Anonymous memory outside jemalloc: thread stacks, libc.
    pub outside_heap: f64,
    pub total: f64,
}

#[derive(Serialize)]
pub struct Kernel {
    pub tcp_sockets: u64,
    pub established: u64,
    /// Slab bytes per TCP socket, measured: the socket caches' growth over the machine's
    /// new TCP sockets (objects of the `TCP` cache) since the first connection. None until
    /// enough sockets came.
    pub socket_struct_bytes_measured: Option<f64>,
    /// Slab bytes per TCP socket, modelled: one object of each socket cache at its size.
    pub socket_struct_bytes_model: Option<u64>,
    /// Why there is no measured figure, when there is none.
    pub not_measured: Option<String>,
    /// TCP sockets the machine gained since the first connection (both ends of a
    /// loopback connection count), and the socket caches' growth in bytes over them.
    pub new_tcp_sockets: i64,
    pub socket_slab_growth: i64,
    pub receive_queue: u64,
    pub send_queue: u64,
    pub forward_alloc: u64,
    /// Sockets whose SO_MEMINFO was read (all, or a sample under --watch).
    pub sockets_read: u64,
    /// Sockets whose SO_MEMINFO could not be read (no permission to take their fds).
    pub unreadable_sockets: u64,
}

#[derive(Serialize)]
pub struct PerConnection {
    pub user_space: f64,
    /// Socket structures (measured where possible, else the model) plus queued bytes.
    pub kernel: f64,
    pub kernel_basis: &'static str,
    pub total: f64,
}

/// New TCP sockets on the machine since the start below which the slab growth per
/// socket is too noisy to call a measurement.
const MIN_NEW_SOCKETS: u64 = 500;

/// jemalloc's counters as `/debug/memory` gives them.
#[derive(Deserialize, Clone, Copy, Default)]
struct JemallocStats {
    allocated: u64,
    active: u64,
    resident: u64,
    #[serde(default)]
    tcache: u64,
}

/// What the server says of its memory (`/debug/memory`), as far as the audit reads it.
#[derive(Deserialize)]
struct ServerMemory {
    jemalloc: Option<JemallocStats>,
    /// None until the first connection.
    at_start: Option<AtStart>,
}

#[derive(Deserialize)]
struct AtStart {
    time_ms: u64,
    process: Resident,
    jemalloc: Option<JemallocStats>,
    sites: Vec<SiteStats>,
    socket_slabs: Option<SocketSlabs>,
}

/// Audits `pid`. `sample`: read SO_MEMINFO of at most this many sockets (a sample spread
/// over them), so a repeated audit costs the same at any connection count.
pub fn audit(pid: u32, sample: Option<usize>) -> Result<Audit, String> {
    let sites = read_site_table(pid)?;
    let process = Resident::of(pid)?;
    let admin = Admin::of_pid(pid)?;
    let path = if sample.is_some() { "/debug/memory?sockets=sample" } else { "/debug/memory" };
    let server: ServerMemory = serde_json::from_slice(&admin.get(path, Duration::from_secs(30))?)
        .map_err(|e| format!("pid {pid}: /debug/memory is not what this tool reads (a server of another version?): {e}"))?;
    let start = server.at_start.as_ref().ok_or_else(|| format!("pid {pid} has had no connection yet: growth per connection is measured from just before the first"))?;

    let inodes: HashMap<u64, i32> = socket_inodes(pid)?.into_iter().map(|(fd, inode)| (inode, fd)).collect();
    let tcp: Vec<_> = tcp_table(pid).into_iter().filter(|e| inodes.contains_key(&e.inode)).collect();
    let established = tcp.iter().filter(|e| is_established(e)).count() as u64;
    let stride = sample.map_or(1, |n| (tcp.len() / n.max(1)).max(1));
    let (mut buffers, mut unreadable) = (SocketMemory::default(), 0);
    match socket_buffers(pid, tcp.iter().step_by(stride).map(|e| inodes[&e.inode])) {
        Ok(each) => {
            for b in each {
                match b {
                    Some(b) => buffers = buffers.add(b),
                    None => unreadable += 1,
                }
            }
        }
        Err(_) => unreadable = tcp.len().div_ceil(stride) as u64,
    }

    let connections = established;
    let per = |bytes: f64| if connections == 0 { 0.0 } else { bytes / connections as f64 };
    let user_space = user_space(start, server.jemalloc.unwrap_or_default(), &sites, &process, per);
    let kernel = kernel(start, tcp.len() as u64, established, buffers, unreadable);
    let structs = kernel.socket_struct_bytes_measured.or(kernel.socket_struct_bytes_model.map(|b| b as f64)).unwrap_or(0.0);
    let buffered_per_socket = buffers.buffered_per_socket().unwrap_or(0.0);
    let kernel_per_connection = if connections == 0 { 0.0 } else { (structs + buffered_per_socket) * tcp.len() as f64 / connections as f64 };
    let basis = if kernel.socket_struct_bytes_measured.is_some() { "measured" } else { "model" };
    Ok(Audit {
        pid,
        connections,
        process,
        sites,
        per_connection: PerConnection {
            user_space: user_space.total,
            kernel: kernel_per_connection,
            kernel_basis: basis,
            total: user_space.total + kernel_per_connection,
        },
        user_space,
        kernel,
    })
}

fn user_space(start: &AtStart, jemalloc: JemallocStats, sites: &[SiteStats], process: &Resident, per: impl Fn(f64) -> f64) -> UserSpace {
    let grew = |name: &str| {
        let now = sites.iter().find(|s| s.site == name).map_or(0, |s| s.live_bytes);
        let then = start.sites.iter().find(|s| s.site == name).map_or(0, |s| s.live_bytes);
        (now - then) as f64
    };
    let connection_sites = Site::PER_CONNECTION.map(Site::name);
    let by_site: BTreeMap<String, f64> = connection_sites.iter().map(|name| (name.to_string(), per(grew(name)))).collect();
    let all_sites: f64 = sites.iter().map(|s| grew(&s.site)).sum();
    let (j0, j1) = (start.jemalloc.unwrap_or_default(), jemalloc);
    let d = |f: fn(&JemallocStats) -> u64| f(&j1) as f64 - f(&j0) as f64;
    let connection_total: f64 = connection_sites.iter().map(|n| grew(n)).sum();
    UserSpace {
        since_first_connection_s: (now_ms().saturating_sub(start.time_ms)) as f64 / 1000.0,
        connection_sites: per(connection_total),
        by_site,
        other_sites: per(all_sites - connection_total),
        thread_caches: per(d(|j| j.tcache)),
        not_charged: per(d(|j| j.allocated) - d(|j| j.tcache) - all_sites),
        slack_in_pages: per(d(|j| j.active) - d(|j| j.allocated)),
        dirty_and_metadata: per(d(|j| j.resident) - d(|j| j.active)),
        outside_heap: per(process.anon as f64 - start.process.anon as f64 - d(|j| j.resident)),
        total: per(process.anon as f64 - start.process.anon as f64),
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn kernel(start: &AtStart, tcp_sockets: u64, established: u64, buffers: SocketMemory, unreadable: u64) -> Kernel {
    let now = SocketSlabs::read();
    let model = now.as_ref().map(SocketSlabs::bytes_per_socket);
    let (growth, new_sockets) = match (&start.socket_slabs, &now) {
        (Some(a), Some(b)) => (b.object_bytes() as i64 - a.object_bytes() as i64, b.tcp_objects() as i64 - a.tcp_objects() as i64),
        _ => (0, 0),
    };
    let (measured, not_measured) = match (&start.socket_slabs, &now) {
        (None, _) | (_, None) => (None, Some("needs /proc/slabinfo (root), for the server at its start and for this tool".to_owned())),
        _ if new_sockets < MIN_NEW_SOCKETS as i64 => {
            (None, Some(format!("{new_sockets} new TCP sockets on the machine since the first connection; the slab growth per socket is measured from {MIN_NEW_SOCKETS}")))
        }
        _ => (Some(growth as f64 / new_sockets as f64), None),
    };
    Kernel {
        tcp_sockets,
        established,
        socket_struct_bytes_measured: measured,
        socket_struct_bytes_model: model,
        not_measured,
        new_tcp_sockets: new_sockets,
        socket_slab_growth: growth,
        receive_queue: buffers.rmem_alloc,
        send_queue: buffers.wmem_queued,
        forward_alloc: buffers.fwd_alloc,
        sockets_read: buffers.sockets,
        unreadable_sockets: unreadable,
    }
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
    let u = &a.user_space;
    println!("pushline pid {}: {} connections (established TCP)", a.pid, a.connections);
    println!("process       rss {}   anon {}   file {}", kib(a.process.rss as f64), kib(a.process.anon as f64), kib(a.process.file as f64));
    println!();
    println!("{:<18} {:>14} {:>12} {:>14}", "site", "live bytes", "live allocs", "allocs total");
    for s in &a.sites {
        println!("{:<18} {:>14} {:>12} {:>14}", s.site, s.live_bytes, s.live_allocs, s.total_allocs);
    }
    println!();
    println!("user space per connection: anonymous memory grown since just before the first connection ({:.0} s ago) / connections", u.since_first_connection_s);
    let line = |name: &str, v: f64, how: &str| println!("  {name:<34} {v:>8.0} B   {how}");
    line("connection sites (usable size)", u.connection_sites, "measured: site table");
    for (site, v) in &u.by_site {
        println!("    {site:<32} {v:>8.0} B");
    }
    line("other sites", u.other_sites, "measured: site table");
    line("jemalloc thread caches", u.thread_caches, "measured: jemalloc");
    line("allocated, no site charged", u.not_charged, "measured: jemalloc - sites");
    line("slack in pages (active-allocated)", u.slack_in_pages, "measured: jemalloc");
    line("dirty pages, metadata", u.dirty_and_metadata, "measured: jemalloc");
    line("outside the heap (stacks, libc)", u.outside_heap, "measured: RssAnon - jemalloc resident");
    line("= user space", u.total, "measured: RssAnon");
    println!();
    let k = &a.kernel;
    println!("kernel        {} TCP sockets ({} established)", k.tcp_sockets, k.established);
    match (k.socket_struct_bytes_measured, k.socket_struct_bytes_model) {
        (Some(m), model) => println!("  socket structures {m:.0} B per socket, measured (slab growth per new TCP socket); model {}", model.map_or("-".into(), |b| format!("{b} B"))),
        (None, Some(model)) => println!("  socket structures {model} B per socket, model (one object per socket cache); not measured: {}", k.not_measured.as_deref().unwrap_or("")),
        (None, None) => println!("  socket structures unknown: {}", k.not_measured.as_deref().unwrap_or("")),
    }
    println!("  queued over {} sockets read: receive {} B, send {} B, forward-allocated {} B{}", k.sockets_read, k.receive_queue, k.send_queue, k.forward_alloc,
        if k.unreadable_sockets > 0 { format!("; {} sockets unreadable (needs root)", k.unreadable_sockets) } else { String::new() });
    println!();
    let p = &a.per_connection;
    println!("per connection: user space {:.0} B + kernel {:.0} B ({}) = {:.0} B", p.user_space, p.kernel, p.kernel_basis, p.total);
}

/// Sockets a `--watch` line reads SO_MEMINFO from: each line costs the same at any
/// connection count.
const WATCH_SOCKETS: usize = 512;

/// `memory-audit --watch`: one line per `every`, `count` lines or until interrupted.
pub fn watch(pid: u32, every: Duration, count: Option<u64>) -> Result<(), String> {
    println!("{:<8} {:>11} {:>10} {:>10} {:>10}  top growing site", "time", "connections", "user B/c", "kernel B/c", "rss MiB");
    let mut before: Option<Vec<SiteStats>> = None;
    let mut printed = 0;
    loop {
        let a = audit(pid, Some(WATCH_SOCKETS))?;
        let grew = before.as_ref().and_then(|before| {
            a.sites
                .iter()
                .map(|s| (s.site.as_str(), s.live_bytes - before.iter().find(|b| b.site == s.site).map_or(0, |b| b.live_bytes)))
                .max_by_key(|(_, d)| *d)
        });
        let top = match grew {
            Some((site, d)) if d > 0 => format!("{site} +{d} B"),
            Some(_) => "none grew".to_owned(),
            None => "-".to_owned(),
        };
        let secs = now_ms() / 1000 % 86_400;
        println!(
            "{:02}:{:02}:{:02} {:>11} {:>10.0} {:>10.0} {:>10.1}  {top}",
            secs / 3600, secs / 60 % 60, secs % 60,
            a.connections, a.per_connection.user_space, a.per_connection.kernel, a.process.rss as f64 / 1_048_576.0
        );
        before = Some(a.sites);
        printed += 1;
        if count.is_some_and(|c| printed >= c) {
            return Ok(());
        }
        std::thread::sleep(every);
    }
}
