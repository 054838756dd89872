//! A process's memory as the kernel counts it, from /proc (through `procfs`).

use serde::{Deserialize, Serialize};

/// Resident memory of one process, in bytes.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Resident {
    pub rss: u64,
    /// Anonymous pages: the heap, stacks, and what the allocator holds.
    pub anon: u64,
    /// Pages of mapped files: mostly the executable's code.
    pub file: u64,
}

impl Resident {
    /// `pid`'s resident memory; an error says why it could not be read.
    pub fn of(pid: u32) -> Result<Resident, String> {
        let status = procfs::process::Process::new(pid as i32)
            .and_then(|p| p.status())
            .map_err(|e| format!("cannot read /proc/{pid}/status: {e}"))?;
        let kib = |v: Option<u64>| v.unwrap_or(0) * 1024;
        Ok(Resident { rss: kib(status.vmrss), anon: kib(status.rssanon), file: kib(status.rssfile) })
    }

    /// This process's resident memory; zeros if /proc cannot be read.
    pub fn myself() -> Resident {
        Resident::of(std::process::id()).unwrap_or_default()
    }
}
