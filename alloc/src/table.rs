//! The site table: per-site counters of live bytes, live allocations and total
//! allocations, in an exported `#[repr(C)]` static whose layout is written down here
//! once. The server updates it; [`parse`] reads its raw bytes, which is how
//! `pushline-tools` reads a live process (through /proc/PID/mem) and how the gdb
//! extension reads a core, without the server's help.
//!
//! Layout (little-endian, `repr(C)`):
//!
//! | offset | field |
//! |---|---|
//! | 0 | `magic: [u8; 8]` = `b"PLSITES1"` |
//! | 8 | `version: u32` = 1 |
//! | 12 | `sites: u32` (rows) |
//! | 16 | `shards: u32` (counter shards per row) |
//! | 20 | `name_len: u32` = 32 |
//! | 24 | `names: [[u8; name_len]; sites]`, NUL-padded |
//! | next multiple of 64 | `counters: [[ShardCounters; shards]; sites]`, 64 bytes each: `live_bytes: i64, live_allocs: i64, total_allocs: u64, total_bytes: u64`, then padding |

use std::sync::atomic::{AtomicI64, AtomicU64};
#[cfg(feature = "allocator")]
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

#[cfg(feature = "allocator")]
use crate::site::Site;
use crate::site::SITES;

pub const MAGIC: [u8; 8] = *b"PLSITES1";
/// Counter shards; a thread writes the shard of its own index, so two threads rarely
/// share a cache line. Sums over the shards are the true values.
pub const SHARDS: usize = 8;
const NAME_LEN: usize = 32;
/// Bytes of the header, which gives the sizes of the rest.
pub const HEADER_LEN: usize = 24;
const COUNTERS_LEN: usize = 64;

/// One site's counters in one shard. A free may land in another shard than its
/// allocation, so one shard's live values can be negative; their sum is not.
#[repr(C, align(64))]
pub struct ShardCounters {
    pub live_bytes: AtomicI64,
    pub live_allocs: AtomicI64,
    pub total_allocs: AtomicU64,
    pub total_bytes: AtomicU64,
}

/// The table outside tools read; see the module documentation for its layout.
#[repr(C)]
pub struct SiteTable {
    pub magic: [u8; 8],
    pub version: u32,
    pub sites: u32,
    pub shards: u32,
    pub name_len: u32,
    pub names: [[u8; NAME_LEN]; SITES],
    pub counters: [[ShardCounters; SHARDS]; SITES],
}

// The layout the tools and the gdb extension compute from the header must be the one
// the compiler chose.
const _: () = assert!(std::mem::offset_of!(SiteTable, names) == HEADER_LEN);
const _: () = assert!(std::mem::offset_of!(SiteTable, counters) == counters_offset(SITES, NAME_LEN));
const _: () = assert!(std::mem::size_of::<ShardCounters>() == COUNTERS_LEN);

/// Where `counters` starts in a table of `sites` rows with names `name_len` long.
pub const fn counters_offset(sites: usize, name_len: usize) -> usize {
    (HEADER_LEN + sites * name_len).div_ceil(64) * 64
}

#[cfg(feature = "allocator")]
const fn name_bytes(name: &str) -> [u8; NAME_LEN] {
    let mut out = [0u8; NAME_LEN];
    let bytes = name.as_bytes();
    let mut i = 0;
    while i < bytes.len() && i < NAME_LEN - 1 {
        out[i] = bytes[i];
        i += 1;
    }
    out
}

#[cfg(feature = "allocator")]
const fn names() -> [[u8; NAME_LEN]; SITES] {
    let mut out = [[0u8; NAME_LEN]; SITES];
    let mut i = 0;
    while i < SITES {
        out[i] = name_bytes(Site::ALL[i].name());
        i += 1;
    }
    out
}

#[cfg(feature = "allocator")]
#[allow(clippy::declare_interior_mutable_const)]
const ZERO: ShardCounters = ShardCounters {
    live_bytes: AtomicI64::new(0),
    live_allocs: AtomicI64::new(0),
    total_allocs: AtomicU64::new(0),
    total_bytes: AtomicU64::new(0),
};

/// The site table; its symbol name is part of the tools' contract. Only a binary with
/// the allocator has it: a reader of the layout (the tools) must not look like a server.
#[cfg(feature = "allocator")]
#[no_mangle]
#[used]
pub static PUSHLINE_ALLOC_SITES: SiteTable = SiteTable {
    magic: MAGIC,
    version: 1,
    sites: SITES as u32,
    shards: SHARDS as u32,
    name_len: NAME_LEN as u32,
    names: names(),
    counters: [const { [ZERO; SHARDS] }; SITES],
};

/// Totals of one site, summed over shards.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SiteStats {
    pub site: String,
    pub live_bytes: i64,
    pub live_allocs: i64,
    pub total_allocs: u64,
    pub total_bytes: u64,
}

/// This process's table, summed over shards.
#[cfg(feature = "allocator")]
pub fn snapshot() -> Vec<SiteStats> {
    Site::ALL
        .iter()
        .map(|site| {
            let mut s = SiteStats { site: site.name().to_owned(), ..SiteStats::default() };
            for c in &PUSHLINE_ALLOC_SITES.counters[*site as usize] {
                s.live_bytes += c.live_bytes.load(Ordering::Relaxed);
                s.live_allocs += c.live_allocs.load(Ordering::Relaxed);
                s.total_allocs += c.total_allocs.load(Ordering::Relaxed);
                s.total_bytes += c.total_bytes.load(Ordering::Relaxed);
            }
            s
        })
        .collect()
}

/// The sizes a table's header gives: (sites, shards, name length).
fn header(bytes: &[u8]) -> Result<(usize, usize, usize), String> {
    if bytes.get(..8) != Some(&MAGIC[..]) {
        return Err("site table has the wrong magic (not PLSITES1): a different Pushline version?".into());
    }
    let u32_at = |at: usize| -> Result<usize, String> {
        let b = bytes.get(at..at + 4).ok_or("site table header is cut short")?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let (sites, shards, name_len) = (u32_at(12)?, u32_at(16)?, u32_at(20)?);
    if sites > 256 || shards > 256 || name_len > 256 {
        return Err(format!("site table header is implausible: {sites} sites, {shards} shards, names of {name_len} bytes"));
    }
    Ok((sites, shards, name_len))
}

/// The whole table's length, from its first [`HEADER_LEN`] bytes: how much a reader of
/// another process's memory must read.
pub fn len_from_header(bytes: &[u8]) -> Result<usize, String> {
    let (sites, shards, name_len) = header(bytes)?;
    Ok(counters_offset(sites, name_len) + sites * shards * COUNTERS_LEN)
}

/// Decodes a table's raw bytes (another process's, or a core's), by the sizes its own
/// header gives, so a reader of another build still reads it right.
pub fn parse(bytes: &[u8]) -> Result<Vec<SiteStats>, String> {
    let (sites, shards, name_len) = header(bytes)?;
    let offset = counters_offset(sites, name_len);
    let needed = len_from_header(bytes)?;
    if bytes.len() < needed {
        return Err(format!("site table is {} bytes; its header says {needed}", bytes.len()));
    }
    let i64_at = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[at..at + 8]);
        i64::from_le_bytes(b)
    };
    Ok((0..sites)
        .map(|site| {
            let name = &bytes[HEADER_LEN + site * name_len..HEADER_LEN + (site + 1) * name_len];
            let name = &name[..name.iter().position(|b| *b == 0).unwrap_or(name.len())];
            let mut row = SiteStats { site: String::from_utf8_lossy(name).into_owned(), ..SiteStats::default() };
            for shard in 0..shards {
                let at = offset + (site * shards + shard) * COUNTERS_LEN;
                row.live_bytes += i64_at(at);
                row.live_allocs += i64_at(at + 8);
                row.total_allocs += i64_at(at + 16) as u64;
                row.total_bytes += i64_at(at + 24) as u64;
            }
            row
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    /// The table as an outside reader sees it. The copy races with no one: these tests
    /// are the only code that charges sites in this process (no global allocator here).
    #[cfg(feature = "allocator")]
    fn raw_bytes() -> Vec<u8> {
        let table: *const SiteTable = &PUSHLINE_ALLOC_SITES;
        // SAFETY: the table is a live static of this size.
        unsafe { std::slice::from_raw_parts(table.cast::<u8>(), std::mem::size_of::<SiteTable>()) }.to_vec()
    }

    #[cfg(feature = "allocator")]
    #[test]
    fn parse_reads_what_the_static_holds() {
        let [a, b, ..] = &PUSHLINE_ALLOC_SITES.counters[Site::Topics as usize];
        a.live_bytes.fetch_add(120, Ordering::Relaxed);
        b.live_bytes.fetch_sub(20, Ordering::Relaxed);
        a.live_allocs.fetch_add(1, Ordering::Relaxed);
        b.total_allocs.fetch_add(2, Ordering::Relaxed);
        a.total_bytes.fetch_add(120, Ordering::Relaxed);
        let rows = parse(&raw_bytes()).unwrap();
        assert_eq!(rows.len(), SITES);
        let names: Vec<&str> = rows.iter().map(|r| r.site.as_str()).collect();
        assert_eq!(names, Site::ALL.map(Site::name));
        let topics = &rows[Site::Topics as usize];
        assert_eq!((topics.live_bytes, topics.live_allocs, topics.total_allocs, topics.total_bytes), (100, 1, 2, 120));
    }

    #[test]
    fn parse_refuses_what_is_not_a_table() {
        assert!(parse(b"not a table").unwrap_err().contains("magic"));
        let mut cut = MAGIC.to_vec();
        for field in [1u32, SITES as u32, SHARDS as u32, NAME_LEN as u32] {
            cut.extend_from_slice(&field.to_le_bytes());
        }
        cut.resize(200, 0);
        assert!(parse(&cut).unwrap_err().contains("header says"));
    }
}
