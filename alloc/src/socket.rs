//! What the kernel holds for a socket: its queued bytes and buffer accounting, read with
//! `getsockopt(SO_MEMINFO)`, and summed over many sockets.

use std::os::fd::RawFd;

use serde::Serialize;

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
}

/// The `TCP:` line of /proc/net/sockstat: the machine's TCP sockets and the kernel
/// memory they hold (`mem`, in pages). procfs does not parse this file.
#[derive(Clone, Copy, Debug, Default, Serialize)]
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
