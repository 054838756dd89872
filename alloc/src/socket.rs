//! What the kernel holds for a socket: its queued bytes and buffer accounting, read with
//! `getsockopt(SO_MEMINFO)` and summed over many sockets, and the slab objects that make
//! up its structures (/proc/slabinfo).

use std::os::fd::RawFd;

use serde::{Deserialize, Serialize};

/// `SO_MEMINFO` of one or many sockets (summed), in bytes; `sockets` says how many.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct SocketMemory {
    pub sockets: u64,
    /// Bytes queued for reading.
    pub rmem_alloc: u64,
    pub rcvbuf: u64,
    pub wmem_alloc: u64,
    pub sndbuf: u64,
    /// Memory charged to the socket ahead of use.
    pub fwd_alloc: u64,
    /// Bytes queued for sending, not yet acknowledged.
    pub wmem_queued: u64,
    pub optmem: u64,
    pub backlog: u64,
    pub drops: u64,
}

impl SocketMemory {
    /// `SO_MEMINFO` of the socket `fd`; `None` when `fd` is not a socket (or was closed).
    pub fn of_fd(fd: RawFd) -> Option<SocketMemory> {
        let mut info = [0u32; 9];
        let mut len = std::mem::size_of_val(&info) as libc::socklen_t;
        // SAFETY: `info` is writable for `len` bytes, and getsockopt writes at most `len`.
        // A closed or reused fd only makes the call fail or describe another socket.
        let ok = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_MEMINFO, info.as_mut_ptr().cast(), &mut len) } == 0;
        let [rmem_alloc, rcvbuf, wmem_alloc, sndbuf, fwd_alloc, wmem_queued, optmem, backlog, drops] = info.map(u64::from);
        ok.then_some(SocketMemory { sockets: 1, rmem_alloc, rcvbuf, wmem_alloc, sndbuf, fwd_alloc, wmem_queued, optmem, backlog, drops })
    }

    /// The sum over every socket this process has open.
    pub fn of_this_process() -> SocketMemory {
        let fds = procfs::process::Process::myself().and_then(|p| p.fd());
        let sockets = fds.into_iter().flatten().flatten().filter(|fd| matches!(fd.target, procfs::process::FDTarget::Socket(_)));
        sockets.filter_map(|fd| SocketMemory::of_fd(fd.fd)).fold(SocketMemory::default(), SocketMemory::add)
    }

    /// The sum over at most `at_most` of this process's sockets, taken evenly across its fd
    /// table (sockets take the lowest free fd, so they are dense in it): a cost that does
    /// not grow with connections, for what is polled. `sockets` says how many were read.
    pub fn sample_of_this_process(at_most: usize) -> SocketMemory {
        let table = procfs::process::Process::myself().and_then(|p| p.status()).map_or(1024, |s| s.fdsize as usize);
        let stride = (table / at_most.max(1)).max(1);
        (0..table).step_by(stride).filter_map(|fd| SocketMemory::of_fd(fd as RawFd)).fold(SocketMemory::default(), SocketMemory::add)
    }

    pub fn add(self, o: SocketMemory) -> SocketMemory {
        SocketMemory {
            sockets: self.sockets + o.sockets,
            rmem_alloc: self.rmem_alloc + o.rmem_alloc,
            rcvbuf: self.rcvbuf + o.rcvbuf,
            wmem_alloc: self.wmem_alloc + o.wmem_alloc,
            sndbuf: self.sndbuf + o.sndbuf,
            fwd_alloc: self.fwd_alloc + o.fwd_alloc,
            wmem_queued: self.wmem_queued + o.wmem_queued,
            optmem: self.optmem + o.optmem,
            backlog: self.backlog + o.backlog,
            drops: self.drops + o.drops,
        }
    }

    /// Bytes the kernel holds for these sockets' data: receive and send queues, memory
    /// charged ahead of use, and socket options.
    pub fn buffered(&self) -> u64 {
        self.rmem_alloc + self.wmem_queued + self.fwd_alloc + self.optmem
    }

    /// [`buffered`](Self::buffered) per socket; `None` for no sockets.
    pub fn buffered_per_socket(&self) -> Option<f64> {
        (self.sockets > 0).then(|| self.buffered() as f64 / self.sockets as f64)
    }
}

/// The `TCP:` line of /proc/net/sockstat: the machine's TCP sockets and the kernel
/// memory they hold (`mem`, in pages). procfs does not parse this file.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct TcpSockstat {
    pub inuse: u64,
    pub orphan: u64,
    pub tw: u64,
    pub alloc: u64,
    pub mem: u64,
}

impl TcpSockstat {
    pub fn read() -> Option<TcpSockstat> {
        let text = std::fs::read_to_string("/proc/net/sockstat").ok()?;
        let line = text.lines().find_map(|l| l.strip_prefix("TCP:"))?;
        let words: Vec<&str> = line.split_whitespace().collect();
        let mut stat = TcpSockstat::default();
        for pair in words.chunks(2) {
            let [key, value] = pair else { continue };
            let value = value.parse().unwrap_or(0);
            match *key {
                "inuse" => stat.inuse = value,
                "orphan" => stat.orphan = value,
                "tw" => stat.tw = value,
                "alloc" => stat.alloc = value,
                "mem" => stat.mem = value,
                _ => {}
            }
        }
        Some(stat)
    }

    /// Kernel memory in TCP sockets, machine-wide, in bytes.
    pub fn mem_bytes(&self) -> u64 {
        self.mem * procfs::page_size()
    }
}

/// Slab caches a TCP socket's kernel state lives in, one object each: the socket, its
/// inode, its file and dentry, its epoll registration, and the security modules' blobs for
/// the inode and file (where an LSM is loaded). A cache the kernel does not have counts 0.
pub const SOCKET_SLABS: [&str; 8] =
    ["TCP", "sock_inode_cache", "filp", "dentry", "eventpoll_epi", "eventpoll_pwq", "lsm_inode_cache", "lsm_file_cache"];

/// One cache of /proc/slabinfo (readable by root only). procfs does not parse this file.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct SlabCache {
    pub active_objs: u64,
    pub num_objs: u64,
    pub objsize: u64,
    pub objperslab: u64,
    pub pagesperslab: u64,
}

/// The caches of [`SOCKET_SLABS`], as /proc/slabinfo has them now.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SocketSlabs(pub Vec<(String, SlabCache)>);

impl SocketSlabs {
    /// `None` without read access to /proc/slabinfo.
    pub fn read() -> Option<SocketSlabs> {
        let text = std::fs::read_to_string("/proc/slabinfo").ok()?;
        let mut found = std::collections::HashMap::new();
        for line in text.lines().skip(2) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let number = |i: usize| f.get(i).and_then(|v| v.parse().ok()).unwrap_or(0);
            if let Some(name) = f.first() {
                let cache = SlabCache { active_objs: number(1), num_objs: number(2), objsize: number(3), objperslab: number(4), pagesperslab: number(5) };
                found.insert(*name, cache);
            }
        }
        Some(SocketSlabs(SOCKET_SLABS.iter().map(|name| (name.to_string(), found.get(name).copied().unwrap_or_default())).collect()))
    }

    /// The model: one object of each cache per socket, at its object size.
    pub fn bytes_per_socket(&self) -> u64 {
        self.0.iter().map(|(_, c)| c.objsize).sum()
    }

    /// Bytes of the objects in use in these caches, machine-wide: what grows by
    /// [`bytes_per_socket`](Self::bytes_per_socket) for each new socket, if the model holds.
    pub fn object_bytes(&self) -> u64 {
        self.0.iter().map(|(_, c)| c.active_objs * c.objsize).sum()
    }

    /// Objects in use in the `TCP` cache: one per IPv4 TCP socket that is not a listener's
    /// request or in TIME_WAIT (those have caches of their own).
    pub fn tcp_objects(&self) -> u64 {
        self.0.iter().find(|(name, _)| name == "TCP").map_or(0, |(_, c)| c.active_objs)
    }

    /// Bytes of whole slabs these caches hold, machine-wide (what the kernel has taken
    /// from the page allocator for them, free objects included).
    pub fn slab_bytes(&self) -> u64 {
        let page = procfs::page_size();
        self.0.iter().map(|(_, c)| c.num_objs.checked_div(c.objperslab).unwrap_or(0) * c.pagesperslab * page).sum()
    }
}
