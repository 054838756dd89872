//! Per-allocation-site counters: live bytes, live allocations and total allocations for
//! each named part of the server, always on.
//!
//! The site of an allocation is the thread's current site when it is made (set by
//! `Site::enter` or carried by a future with `Site::instrument`, the way
//! `tracing::Instrument` carries a span). The site is written into the allocation
//! itself, in the last byte of jemalloc's size class, which the caller never sees, so a
//! free is credited to the site that allocated, whichever thread frees it. A request
//! that fills its size class exactly has no such byte; it is placed in an arena of its
//! site's own instead (see `Placement`).
//!
//! The counters live in [`PUSHLINE_ALLOC_SITES`], an exported, `#[repr(C)]` table whose
//! layout is documented below, so `pushline-tools` and the gdb extension can read it from
//! a live process or a core file without the server's help.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};

use serde::Serialize;
use tikv_jemalloc_sys as jemalloc;

/// The named parts of the server that allocations are charged to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Site {
    /// Anything not inside a named site: start-up, libraries' own threads.
    Other = 0,
    /// A client connection's task and its socket registration.
    ConnectionTask = 1,
    /// Handshakes and the publish API's HTTP connections.
    Http = 2,
    /// The WebSocket/SSE codec: published messages framed for both transports, and the
    /// per-thread buffers sockets are read into.
    Codec = 3,
    /// Outbound queues of connections.
    OutboundQueue = 4,
    /// Session records (`Conn`) and the uid table.
    Sessions = 5,
    /// The topic index.
    Topics = 6,
    /// Metric handles, histograms and the exposition text.
    Metrics = 7,
    /// The admin listener: debug endpoints, profiles.
    Admin = 8,
    /// The Redis client.
    Redis = 9,
}

pub const SITES: usize = 10;

impl Site {
    pub const ALL: [Site; SITES] = [
        Site::Other,
        Site::ConnectionTask,
        Site::Http,
        Site::Codec,
        Site::OutboundQueue,
        Site::Sessions,
        Site::Topics,
        Site::Metrics,
        Site::Admin,
        Site::Redis,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Site::Other => "other",
            Site::ConnectionTask => "connection_task",
            Site::Http => "http",
            Site::Codec => "codec",
            Site::OutboundQueue => "outbound_queue",
            Site::Sessions => "sessions",
            Site::Topics => "topics",
            Site::Metrics => "metrics",
            Site::Admin => "admin",
            Site::Redis => "redis",
        }
    }

    /// Makes this the current thread's site until the guard drops.
    pub fn enter(self) -> SiteGuard {
        SiteGuard { previous: CURRENT.with(|c| c.replace(self as u8)) }
    }

    /// Runs `f` with this site current.
    pub fn scope<T>(self, f: impl FnOnce() -> T) -> T {
        let _guard = self.enter();
        f()
    }

    /// Makes this the current site whenever `future` is polled.
    pub fn instrument<F: Future>(self, future: F) -> Instrumented<F> {
        Instrumented { site: self, future }
    }
}

pub struct SiteGuard {
    previous: u8,
}

impl Drop for SiteGuard {
    fn drop(&mut self) {
        CURRENT.with(|c| c.set(self.previous));
    }
}

/// A future whose polls run with its site current.
pub struct Instrumented<F> {
    site: Site,
    future: F,
}

impl<F: Future> Future for Instrumented<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // SAFETY: `future` is structurally pinned: it is never moved out of `self`.
        let this = unsafe { self.get_unchecked_mut() };
        let _guard = this.site.enter();
        unsafe { Pin::new_unchecked(&mut this.future) }.poll(cx)
    }
}

thread_local! {
    /// The site allocations on this thread are charged to. Const-initialized and without
    /// a destructor, so the allocator can read it at any time without allocating.
    static CURRENT: Cell<u8> = const { Cell::new(0) };
    static SHARD: Cell<u8> = const { Cell::new(u8::MAX) };
}

/// Counter shards; a thread writes the shard of its own index, so two threads rarely
/// share a cache line. Sums over the shards are the true values.
pub const SHARDS: usize = 8;

/// One site's counters in one shard. A free may land in another shard than its
/// allocation, so one shard's live values can be negative; their sum is not.
#[repr(C, align(64))]
pub struct ShardCounters {
    pub live_bytes: AtomicI64,
    pub live_allocs: AtomicI64,
    pub total_allocs: AtomicU64,
    pub total_bytes: AtomicU64,
}

/// The table outside tools read. Layout (all little-endian, `repr(C)`):
///
/// | offset | field |
/// |---|---|
/// | 0 | `magic: [u8; 8]` = `b"PLSITES1"` |
/// | 8 | `version: u32` = 1 |
/// | 12 | `sites: u32` (number of sites, `SITES`) |
/// | 16 | `shards: u32` (`SHARDS`) |
/// | 20 | `name_len: u32` = 32 |
/// | 24 | `names: [[u8; 32]; sites]`, NUL-padded |
/// | 64-aligned after names | `counters: [[ShardCounters; shards]; sites]`, each 64 bytes: `live_bytes: i64, live_allocs: i64, total_allocs: u64, total_bytes: u64`, then padding |
///
/// `counters_offset` (below) gives the offset of `counters`.
#[repr(C)]
pub struct SiteTable {
    pub magic: [u8; 8],
    pub version: u32,
    pub sites: u32,
    pub shards: u32,
    pub name_len: u32,
    pub names: [[u8; 32]; SITES],
    pub counters: [[ShardCounters; SHARDS]; SITES],
}

const fn name_bytes(name: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    let bytes = name.as_bytes();
    let mut i = 0;
    while i < bytes.len() && i < 31 {
        out[i] = bytes[i];
        i += 1;
    }
    out
}

const fn names() -> [[u8; 32]; SITES] {
    let mut out = [[0u8; 32]; SITES];
    let mut i = 0;
    while i < SITES {
        out[i] = name_bytes(Site::ALL[i].name());
        i += 1;
    }
    out
}

#[allow(clippy::declare_interior_mutable_const)]
const ZERO: ShardCounters = ShardCounters {
    live_bytes: AtomicI64::new(0),
    live_allocs: AtomicI64::new(0),
    total_allocs: AtomicU64::new(0),
    total_bytes: AtomicU64::new(0),
};

/// The site table; its symbol name is part of the tools' contract.
#[no_mangle]
#[used]
pub static PUSHLINE_ALLOC_SITES: SiteTable = SiteTable {
    magic: *b"PLSITES1",
    version: 1,
    sites: SITES as u32,
    shards: SHARDS as u32,
    name_len: 32,
    names: names(),
    counters: [const { [ZERO; SHARDS] }; SITES],
};

/// Offset of `counters` in [`SiteTable`], for readers of the raw bytes.
pub const fn counters_offset() -> usize {
    std::mem::offset_of!(SiteTable, counters)
}

fn shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    SHARD
        .try_with(|s| {
            let mut v = s.get();
            if v == u8::MAX {
                v = (NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS) as u8;
                s.set(v);
            }
            v as usize
        })
        .unwrap_or(0)
}

fn current_site() -> u8 {
    CURRENT.try_with(Cell::get).unwrap_or(0)
}

fn charge(site: u8, bytes: usize) {
    crate::probes::alloc(site, bytes);
    let c = &PUSHLINE_ALLOC_SITES.counters[(site as usize).min(SITES - 1)][shard()];
    c.live_bytes.fetch_add(bytes as i64, Ordering::Relaxed);
    c.live_allocs.fetch_add(1, Ordering::Relaxed);
    c.total_allocs.fetch_add(1, Ordering::Relaxed);
    c.total_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
}

fn credit(site: u8, bytes: usize) {
    let c = &PUSHLINE_ALLOC_SITES.counters[(site as usize).min(SITES - 1)][shard()];
    c.live_bytes.fetch_sub(bytes as i64, Ordering::Relaxed);
    c.live_allocs.fetch_sub(1, Ordering::Relaxed);
}

/// Totals of one site, summed over shards.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct SiteStats {
    pub site: &'static str,
    pub live_bytes: i64,
    pub live_allocs: i64,
    pub total_allocs: u64,
    pub total_bytes: u64,
}

pub fn snapshot() -> [SiteStats; SITES] {
    Site::ALL.map(|site| {
        let mut s = SiteStats { site: site.name(), ..SiteStats::default() };
        for c in &PUSHLINE_ALLOC_SITES.counters[site as usize] {
            s.live_bytes += c.live_bytes.load(Ordering::Relaxed);
            s.live_allocs += c.live_allocs.load(Ordering::Relaxed);
            s.total_allocs += c.total_allocs.load(Ordering::Relaxed);
            s.total_bytes += c.total_bytes.load(Ordering::Relaxed);
        }
        s
    })
}

/// jemalloc (through tikv-jemallocator), with every allocation charged to a site.
pub struct SiteAllocator;

/// x86-64 and aarch64 malloc alignment: smaller alignments need no flag.
const MIN_ALIGN: usize = 16;
const MALLOCX_TCACHE_NONE: i32 = 1 << 8;

const fn mallocx_arena(arena: u32) -> i32 {
    ((arena + 1) << 20) as i32
}

/// Where an allocation's site is kept.
enum Placement {
    /// In the last byte of the size class; `usable` is the class size.
    Tag { usable: usize },
    /// The request fills its size class exactly (cache-padded runtime structures such as
    /// tokio task cells do): growing it for a tag byte would cost a whole class, so it
    /// goes to its site's own arena instead, bypassing the thread cache, and a free
    /// asks jemalloc which arena the pointer is in. Such allocations are rare (about two
    /// per connection, none per message), so the slower path costs little.
    Arena,
}

#[inline]
fn flags_for(layout: &Layout) -> i32 {
    if layout.align() <= MIN_ALIGN && layout.align() <= layout.size() {
        0
    } else {
        layout.align().trailing_zeros() as i32 // MALLOCX_LG_ALIGN, as tikv-jemallocator passes it
    }
}

#[inline]
fn placement(layout: &Layout, flags: i32) -> Placement {
    // SAFETY: nallocx only computes a size class.
    let usable = unsafe { jemalloc::nallocx(layout.size(), flags) };
    if usable > layout.size() {
        Placement::Tag { usable }
    } else {
        Placement::Arena
    }
}

/// Arena index per site (0 until made), and the reverse map for frees.
static SITE_ARENAS: [std::sync::atomic::AtomicU32; SITES] = [const { std::sync::atomic::AtomicU32::new(0) }; SITES];
static ARENAS_MADE: std::sync::Once = std::sync::Once::new();
static ARENAS_LOOKUP_MIB: [AtomicUsize; 2] = [const { AtomicUsize::new(0) }; 2];

fn arena_of_site(site: u8) -> u32 {
    ARENAS_MADE.call_once(|| {
        for arena in SITE_ARENAS.iter() {
            let mut index: u32 = 0;
            let mut len = std::mem::size_of::<u32>();
            // SAFETY: "arenas.create" writes an unsigned arena index into `index`.
            // jemalloc allocates its own metadata internally, never through this allocator.
            let ok = unsafe {
                jemalloc::mallctl(c"arenas.create".as_ptr(), (&mut index as *mut u32).cast(), &mut len, std::ptr::null_mut(), 0)
            } == 0;
            arena.store(if ok { index } else { 0 }, Ordering::Relaxed);
        }
        let mut mib = [0usize; 2];
        let mut miblen = 2;
        // SAFETY: fills `mib` with the two components of "arenas.lookup".
        if unsafe { jemalloc::mallctlnametomib(c"arenas.lookup".as_ptr(), mib.as_mut_ptr(), &mut miblen) } == 0 {
            ARENAS_LOOKUP_MIB[0].store(mib[0], Ordering::Relaxed);
            ARENAS_LOOKUP_MIB[1].store(mib[1], Ordering::Relaxed);
        }
    });
    SITE_ARENAS[(site as usize).min(SITES - 1)].load(Ordering::Relaxed)
}

/// The site whose arena holds `ptr` (an `Arena`-placed allocation).
fn site_of_arena_pointer(ptr: *mut u8) -> u8 {
    let mib = [ARENAS_LOOKUP_MIB[0].load(Ordering::Relaxed), ARENAS_LOOKUP_MIB[1].load(Ordering::Relaxed)];
    let mut arena: u32 = 0;
    let mut len = std::mem::size_of::<u32>();
    let mut p = ptr.cast::<std::ffi::c_void>();
    // SAFETY: "arenas.lookup" reads a pointer and writes the unsigned index of its arena.
    let ok = unsafe {
        jemalloc::mallctlbymib(mib.as_ptr(), 2, (&mut arena as *mut u32).cast(), &mut len, (&mut p as *mut *mut std::ffi::c_void).cast(), std::mem::size_of::<*mut u8>())
    } == 0;
    if !ok {
        return Site::Other as u8;
    }
    SITE_ARENAS.iter().position(|a| a.load(Ordering::Relaxed) == arena).map_or(Site::Other as u8, |i| i as u8)
}

impl SiteAllocator {
    #[inline]
    unsafe fn alloc_for(site: u8, layout: Layout, zero: bool) -> *mut u8 {
        let flags = flags_for(&layout);
        let ptr = match placement(&layout, flags) {
            Placement::Tag { usable } => {
                let ptr = if zero {
                    tikv_jemallocator::Jemalloc.alloc_zeroed(layout)
                } else {
                    tikv_jemallocator::Jemalloc.alloc(layout)
                };
                if !ptr.is_null() {
                    ptr.add(usable - 1).write(site);
                }
                ptr
            }
            Placement::Arena => {
                let flags = flags | mallocx_arena(arena_of_site(site)) | MALLOCX_TCACHE_NONE | if zero { 0x40 } else { 0 };
                jemalloc::mallocx(layout.size(), flags).cast()
            }
        };
        if !ptr.is_null() {
            charge(site, layout.size());
        }
        ptr
    }

    #[inline]
    unsafe fn site_of(ptr: *mut u8, layout: &Layout) -> u8 {
        match placement(layout, flags_for(layout)) {
            Placement::Tag { usable } => ptr.add(usable - 1).read(),
            Placement::Arena => site_of_arena_pointer(ptr),
        }
    }
}

unsafe impl GlobalAlloc for SiteAllocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Self::alloc_for(current_site(), layout, false)
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        Self::alloc_for(current_site(), layout, true)
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let flags = flags_for(&layout);
        match placement(&layout, flags) {
            Placement::Tag { usable } => {
                credit(ptr.add(usable - 1).read(), layout.size());
                tikv_jemallocator::Jemalloc.dealloc(ptr, layout);
            }
            Placement::Arena => {
                credit(site_of_arena_pointer(ptr), layout.size());
                jemalloc::sdallocx(ptr.cast(), layout.size(), flags | MALLOCX_TCACHE_NONE);
            }
        }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // The memory keeps the site of whoever allocated it first.
        let site = Self::site_of(ptr, &layout);
        let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
        let old_flags = flags_for(&layout);
        if let (Placement::Tag { .. }, Placement::Tag { usable }) =
            (placement(&layout, old_flags), placement(&new_layout, flags_for(&new_layout)))
        {
            let new = tikv_jemallocator::Jemalloc.realloc(ptr, layout, new_size);
            if !new.is_null() {
                new.add(usable - 1).write(site);
                credit(site, layout.size());
                charge(site, new_size);
            }
            return new;
        }
        let new = Self::alloc_for(site, new_layout, false);
        if !new.is_null() {
            std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
            self.dealloc(ptr, layout);
        }
        new
    }
}
