//! jemalloc (through tikv-jemallocator), with every allocation charged to the site that
//! was current when it was made.
//!
//! The site is written into the allocation itself, in the last byte of jemalloc's size
//! class, which the caller never sees, so a free is credited to the site that allocated,
//! whichever thread frees it. A request that fills its size class exactly has no such
//! byte: from a page up it takes the next class, below that it goes to an arena of its
//! site's own (see [`Placement`]).
//!
//! A site is charged the usable size of each allocation (its size class, what the block
//! really takes from jemalloc), not the size asked for, so the table adds up to jemalloc's
//! own `allocated`.
//!
//! Tracking can be switched off once, at start ([`disable_tracking`]); from then on every
//! call goes straight to jemalloc after one relaxed atomic load.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};

use tikv_jemalloc_sys as jemalloc;
use tikv_jemallocator::Jemalloc;

use crate::site::{self, Site, SITES};
use crate::table::{ShardCounters, PUSHLINE_ALLOC_SITES, SHARDS};

thread_local! {
    static SHARD: Cell<u8> = const { Cell::new(u8::MAX) };
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

fn counters(site: u8) -> &'static ShardCounters {
    &PUSHLINE_ALLOC_SITES.counters[(site as usize).min(SITES - 1)][shard()]
}

/// Counts an allocation of `bytes` made at `site`.
fn charge(site: u8, bytes: usize) {
    probe::probe!(pushline, alloc, site as u64, bytes as u64);
    let c = counters(site);
    c.live_bytes.fetch_add(bytes as i64, Ordering::Relaxed);
    c.live_allocs.fetch_add(1, Ordering::Relaxed);
    c.total_allocs.fetch_add(1, Ordering::Relaxed);
    c.total_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
}

/// Counts the free of an allocation of `bytes` made at `site`.
fn credit(site: u8, bytes: usize) {
    let c = counters(site);
    c.live_bytes.fetch_sub(bytes as i64, Ordering::Relaxed);
    c.live_allocs.fetch_sub(1, Ordering::Relaxed);
}

/// The global allocator of the `pushline` binary.
pub struct SiteAllocator;

static TRACKING: AtomicBool = AtomicBool::new(true);

/// Keeps glibc's own malloc to one arena. It still serves what C code allocates
/// (`opendir` in the profiler's thread walk, libc internals), and by default gives each
/// thread that calls it an arena of its own: 64 MiB of address space apiece, which
/// `gcore` writes out as zeros (450 MB of an idle two-core server's 590 MB core, 129 MB
/// without them). What little goes through it needs no arena per thread. Call it before
/// any thread starts.
pub fn one_libc_arena() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets a tunable of glibc's allocator; no other thread runs yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Stops charging allocations to sites, for the life of the process. Call it before the
/// runtime starts: counters of memory allocated before it are left as they were, so
/// the table stops meaning anything and the server reports tracking as off.
pub fn disable_tracking() {
    TRACKING.store(false, Ordering::Relaxed);
}

pub fn tracking_enabled() -> bool {
    TRACKING.load(Ordering::Relaxed)
}

/// x86-64 and aarch64 malloc alignment (`alignof(max_align_t)`): smaller alignments need
/// no flag. The same rule tikv-jemallocator applies, so our flags are its flags.
const MIN_ALIGN: usize = 16;
/// `MALLOCX_ZERO` from jemalloc.h: the memory is zero-filled.
const MALLOCX_ZERO: i32 = 0x40;
/// `MALLOCX_TCACHE_NONE` from jemalloc.h: bypass the thread cache, so the allocation comes
/// from (and returns to) the arena the flags name.
const MALLOCX_TCACHE_NONE: i32 = 1 << 8;

/// `MALLOCX_TCACHE(tc)` from jemalloc.h: use explicit thread cache `tc`.
const fn mallocx_tcache(tc: u32) -> i32 {
    ((tc + 2) << 8) as i32
}

/// `MALLOCX_ARENA(a)` from jemalloc.h.
const fn mallocx_arena(arena: u32) -> i32 {
    ((arena + 1) << 20) as i32
}

/// `MALLOCX_LG_ALIGN(log2 align)` when the alignment needs saying, as tikv-jemallocator
/// computes it for the same layout.
#[inline]
fn flags_for(layout: &Layout) -> i32 {
    if layout.align() <= MIN_ALIGN && layout.align() <= layout.size() {
        0
    } else {
        layout.align().trailing_zeros() as i32
    }
}

/// Where an allocation's site is kept.
enum Placement {
    /// In the last byte of the size class; `usable` is the class size, `asked` the size
    /// jemalloc is asked for (the layout's, or one more to reach the next class).
    Tag { usable: usize, asked: usize },
    /// A request under a page that fills its size class exactly (cache-padded runtime
    /// structures such as tokio task cells do): growing it for a tag byte would cost a
    /// whole class, and such blocks live as long as connections, so it goes to its site's
    /// own arena instead, and a free asks jemalloc which arena the pointer is in. Small
    /// exact fits are common (a `Vec` growing 8, 16, 32, 64 bytes fills each class), so on a
    /// thread that keeps [`thread_caches`] they go through an explicit thread cache of the
    /// site's own; elsewhere they bypass the thread cache.
    Arena,
}

/// Exact-fit requests of this size or more take the next size class for their tag. They
/// are buffers (hyper's 8 KiB read buffer comes and goes with every request): the arena
/// path, with no thread cache and a slab made and unmade per block, cost ~5 us of a
/// ~50 us push (perf, `pushline-bench unicast`), where the larger class costs at most a
/// quarter more bytes, for a moment.
const GROW_FROM: usize = 4096;

impl Placement {
    /// The bytes the block takes: its size class.
    fn usable(&self, layout: &Layout) -> usize {
        match *self {
            Placement::Tag { usable, .. } => usable,
            Placement::Arena => layout.size(),
        }
    }
}

/// `layout` with `size` bytes: what jemalloc is asked for.
fn asking(layout: &Layout, size: usize) -> Layout {
    // SAFETY: `size` is `layout.size()` or one more, with the layout's (valid) alignment;
    // one more than a size GlobalAlloc was handed does not overflow isize when rounded
    // (sizes that close to isize::MAX cannot be allocated at all).
    unsafe { Layout::from_size_align_unchecked(size, layout.align()) }
}

/// The placement of an allocation of `layout`: a pure function of the layout, so the
/// free (which gets the same layout, by `GlobalAlloc`'s contract) finds the tag where the
/// allocation put it.
#[inline]
fn placement(layout: &Layout, flags: i32) -> Placement {
    // SAFETY: nallocx only computes a size class; it reads and writes no memory.
    // jemalloc documents its result as the usable size of the allocation that the
    // equivalent mallocx (tikv-jemallocator's alloc, with these flags) returns.
    let usable = unsafe { jemalloc::nallocx(layout.size(), flags) };
    if usable > layout.size() {
        Placement::Tag { usable, asked: layout.size() }
    } else if layout.size() >= GROW_FROM {
        let asked = layout.size() + 1;
        // SAFETY: as above.
        Placement::Tag { usable: unsafe { jemalloc::nallocx(asked, flags) }, asked }
    } else {
        Placement::Arena
    }
}

/// Arena index per site (0 until made), and the mib of `arenas.lookup` for frees.
static SITE_ARENAS: [AtomicU32; SITES] = [const { AtomicU32::new(0) }; SITES];
static ARENAS_MADE: std::sync::Once = std::sync::Once::new();
static ARENAS_LOOKUP_MIB: [AtomicUsize; 2] = [const { AtomicUsize::new(0) }; 2];

fn arena_of_site(site: u8) -> u32 {
    ARENAS_MADE.call_once(|| {
        for arena in SITE_ARENAS.iter() {
            let mut index: u32 = 0;
            let mut len = std::mem::size_of::<u32>();
            // SAFETY: "arenas.create" writes an unsigned arena index into `index`, which
            // is valid for `len` bytes. jemalloc allocates its own metadata internally,
            // never through this allocator, so this cannot recurse.
            let ok = unsafe {
                jemalloc::mallctl(c"arenas.create".as_ptr(), (&mut index as *mut u32).cast(), &mut len, std::ptr::null_mut(), 0)
            } == 0;
            arena.store(if ok { index } else { 0 }, Ordering::Relaxed);
        }
        let mut mib = [0usize; 2];
        let mut miblen = 2;
        // SAFETY: fills `mib`, valid for `miblen` entries, with the components of "arenas.lookup".
        if unsafe { jemalloc::mallctlnametomib(c"arenas.lookup".as_ptr(), mib.as_mut_ptr(), &mut miblen) } == 0 {
            ARENAS_LOOKUP_MIB[0].store(mib[0], Ordering::Relaxed);
            ARENAS_LOOKUP_MIB[1].store(mib[1], Ordering::Relaxed);
        }
    });
    SITE_ARENAS[(site as usize).min(SITES - 1)].load(Ordering::Relaxed)
}

/// Explicit jemalloc thread caches, one per site, on threads that keep them: a cache
/// holds blocks of its site's arena only (it is filled from that arena, and a free goes to
/// the cache of the site whose arena the block is in), so exact-fit blocks get the thread
/// cache's speed without mixing arenas. Without one, each such allocation and free took an
/// arena lock and often made or unmade a slab: ~4.6 us of a ~41 us keep-alive push
/// (`pushline-bench unicast`, perf), where a push makes about twenty allocations.
///
/// jemalloc does not trim explicit caches as it trims a thread's own: each holds at most
/// its bins' slots (a few hundred small blocks per size class in use) until the thread
/// lets them go with [`thread_caches::stop`]. Only the server's long-lived threads keep them.
pub mod thread_caches {
    use super::*;

    /// Per site: the cache's index plus one; 0 for none made yet. `kept` is false on
    /// threads that keep none (their exact fits bypass the thread cache).
    struct Caches {
        kept: Cell<bool>,
        ids: [Cell<u32>; SITES],
    }

    thread_local! {
        // Const-initialised, with no destructor: reading it from inside the allocator
        // never allocates or registers anything.
        static CACHES: Caches = const { Caches { kept: Cell::new(false), ids: [const { Cell::new(0) }; SITES] } };
    }

    /// From now on, exact-fit allocations on this thread use site caches.
    pub fn start() {
        let _ = CACHES.try_with(|c| c.kept.set(true));
    }

    /// Flushes this thread's site caches back to their arenas and stops using them: call
    /// it before the thread ends (a cache left behind keeps its blocks for good).
    pub fn stop() {
        let _ = CACHES.try_with(|c| {
            c.kept.set(false);
            for id in &c.ids {
                let kept = id.replace(0);
                if kept != 0 {
                    let mut index = kept - 1;
                    // SAFETY: "tcache.destroy" reads an unsigned cache index, made by
                    // "tcache.create" on this thread and used by no other.
                    unsafe {
                        jemalloc::mallctl(c"tcache.destroy".as_ptr(), std::ptr::null_mut(), std::ptr::null_mut(), (&mut index as *mut u32).cast(), std::mem::size_of::<u32>());
                    }
                }
            }
        });
    }

    /// The thread-cache flag for an exact-fit block of `site`: its cache on a thread that
    /// keeps them (made on first use), else none.
    pub(super) fn flag(site: u8) -> i32 {
        CACHES
            .try_with(|c| {
                if !c.kept.get() {
                    return MALLOCX_TCACHE_NONE;
                }
                let id = &c.ids[(site as usize).min(SITES - 1)];
                if id.get() == 0 {
                    let mut index: u32 = 0;
                    let mut len = std::mem::size_of::<u32>();
                    // SAFETY: "tcache.create" writes an unsigned cache index into `index`,
                    // valid for `len` bytes; jemalloc makes it from its own metadata, never
                    // through this allocator.
                    let made = unsafe {
                        jemalloc::mallctl(c"tcache.create".as_ptr(), (&mut index as *mut u32).cast(), &mut len, std::ptr::null_mut(), 0)
                    } == 0;
                    if !made {
                        return MALLOCX_TCACHE_NONE;
                    }
                    id.set(index + 1);
                }
                mallocx_tcache(id.get() - 1)
            })
            .unwrap_or(MALLOCX_TCACHE_NONE)
    }
}

/// The site whose arena holds `ptr` (an `Arena`-placed allocation).
fn site_of_arena_pointer(ptr: *mut u8) -> u8 {
    let mib = [ARENAS_LOOKUP_MIB[0].load(Ordering::Relaxed), ARENAS_LOOKUP_MIB[1].load(Ordering::Relaxed)];
    let mut arena: u32 = 0;
    let mut len = std::mem::size_of::<u32>();
    let mut p = ptr.cast::<std::ffi::c_void>();
    // SAFETY: "arenas.lookup" reads the pointer-sized value at `p` and writes the unsigned
    // index of the arena holding that pointer into `arena` (valid for `len` bytes); it
    // fails, harmlessly, for a pointer jemalloc does not know.
    let ok = unsafe {
        jemalloc::mallctlbymib(
            mib.as_ptr(),
            2,
            (&mut arena as *mut u32).cast(),
            &mut len,
            (&mut p as *mut *mut std::ffi::c_void).cast(),
            std::mem::size_of::<*mut u8>(),
        )
    } == 0;
    if !ok {
        return Site::Other as u8;
    }
    SITE_ARENAS.iter().position(|a| a.load(Ordering::Relaxed) == arena).map_or(Site::Other as u8, |i| i as u8)
}

impl SiteAllocator {
    /// # Safety
    /// `layout` has a non-zero size (`GlobalAlloc::alloc`'s contract).
    #[inline]
    unsafe fn alloc_for(site: u8, layout: Layout, zero: bool) -> *mut u8 {
        let flags = flags_for(&layout);
        let placed = placement(&layout, flags);
        let ptr = match placed {
            Placement::Tag { usable, asked } => {
                let asked = asking(&layout, asked);
                // SAFETY: the caller's contract is ours (`asked` is no smaller than `layout`).
                let ptr = unsafe { if zero { Jemalloc.alloc_zeroed(asked) } else { Jemalloc.alloc(asked) } };
                if !ptr.is_null() {
                    // SAFETY: jemalloc returned `usable` bytes (nallocx's promise), and
                    // `usable - 1 >= layout.size()`: the byte is ours, past what the caller uses.
                    unsafe { ptr.add(usable - 1).write(site) };
                }
                ptr
            }
            Placement::Arena => {
                let flags = flags | mallocx_arena(arena_of_site(site)) | thread_caches::flag(site) | if zero { MALLOCX_ZERO } else { 0 };
                // SAFETY: a non-zero size, and flags jemalloc defines.
                unsafe { jemalloc::mallocx(layout.size(), flags) }.cast()
            }
        };
        if !ptr.is_null() {
            charge(site, placed.usable(&layout));
        }
        ptr
    }

    /// # Safety
    /// `ptr` was allocated by this allocator with `layout`, while tracking was on.
    #[inline]
    unsafe fn site_of(ptr: *mut u8, layout: &Layout) -> u8 {
        match placement(layout, flags_for(layout)) {
            // SAFETY: the same layout gives the same placement, and the allocation wrote
            // its site at `usable - 1`, inside the block.
            Placement::Tag { usable, .. } => unsafe { ptr.add(usable - 1).read() },
            Placement::Arena => site_of_arena_pointer(ptr),
        }
    }
}

// SAFETY: every path returns memory from jemalloc for the layout asked (or null), and
// frees through jemalloc with the layout the block was allocated with. An allocation made
// while tracking was on and freed after it was switched off goes back through
// `Jemalloc.dealloc`, which frees an arena-placed block correctly too: jemalloc finds a
// block's arena from the pointer, whatever the flags.
unsafe impl GlobalAlloc for SiteAllocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !tracking_enabled() {
            // SAFETY: the caller's contract is ours.
            return unsafe { Jemalloc.alloc(layout) };
        }
        // SAFETY: the caller's contract is ours.
        unsafe { Self::alloc_for(site::current(), layout, false) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !tracking_enabled() {
            // SAFETY: the caller's contract is ours.
            return unsafe { Jemalloc.alloc_zeroed(layout) };
        }
        // SAFETY: the caller's contract is ours.
        unsafe { Self::alloc_for(site::current(), layout, true) }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if !tracking_enabled() {
            // SAFETY: the caller's contract is ours.
            return unsafe { Jemalloc.dealloc(ptr, layout) };
        }
        let flags = flags_for(&layout);
        match placement(&layout, flags) {
            Placement::Tag { usable, asked } => {
                // SAFETY: the allocation (same layout, same placement) wrote its site
                // there; the block is still ours until the dealloc below.
                credit(unsafe { ptr.add(usable - 1).read() }, usable);
                // SAFETY: the caller's contract is ours; the block was allocated as `asked`.
                unsafe { Jemalloc.dealloc(ptr, asking(&layout, asked)) };
            }
            Placement::Arena => {
                let site = site_of_arena_pointer(ptr);
                credit(site, layout.size());
                // SAFETY: `ptr` came from mallocx with this size and alignment; sdallocx
                // takes the size it was allocated with. The cache it goes to holds only
                // blocks of the arena it is in.
                unsafe { jemalloc::sdallocx(ptr.cast(), layout.size(), flags | thread_caches::flag(site)) };
            }
        }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !tracking_enabled() {
            // SAFETY: the caller's contract is ours.
            return unsafe { Jemalloc.realloc(ptr, layout, new_size) };
        }
        // The memory keeps the site of whoever allocated it first.
        // SAFETY: `ptr` was allocated here with `layout` (the caller's contract).
        let site = unsafe { Self::site_of(ptr, &layout) };
        // SAFETY: `GlobalAlloc::realloc` promises `new_size`, rounded up to `align`, does not overflow.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        if let (Placement::Tag { usable: old, asked: old_asked }, Placement::Tag { usable, asked }) =
            (placement(&layout, flags_for(&layout)), placement(&new_layout, flags_for(&new_layout)))
        {
            // SAFETY: the caller's contract is ours (the block was allocated as
            // `old_asked`); rallocx gives it the size class of `asked`, whose usable size
            // nallocx computed.
            let new = unsafe { Jemalloc.realloc(ptr, asking(&layout, old_asked), asked) };
            if !new.is_null() {
                // SAFETY: `usable - 1 >= new_size`: inside the new block, past the caller's bytes.
                unsafe { new.add(usable - 1).write(site) };
                credit(site, old);
                charge(site, usable);
            }
            return new;
        }
        // SAFETY: a non-zero size (realloc's contract).
        let new = unsafe { Self::alloc_for(site, new_layout, false) };
        if !new.is_null() {
            // SAFETY: both blocks are live and distinct; the copy stays within the smaller.
            unsafe {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
        }
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(site: Site) -> (i64, i64) {
        let stats = crate::table::snapshot().into_iter().find(|s| s.site == site.name()).expect("every site has a row");
        (stats.live_bytes, stats.live_allocs)
    }

    /// Called directly (this test binary's own allocator is the system's), on a site no
    /// other test of this crate charges (the table's test writes to `Topics`).
    #[test]
    fn every_exact_fit_is_charged_and_credited_back_at_its_site() {
        let site = Site::Admin;
        let before = live(site);
        // Under a page, exact fit: its site's arena. A page or more: the next class, tagged.
        for (size, charged) in [(384, 384), (8192, 10240), (4096, 5120), (100, 112)] {
            let layout = Layout::from_size_align(size, 8).expect("a valid layout");
            // SAFETY: a non-zero size; freed below with the same layout.
            let ptr = unsafe { SiteAllocator::alloc_for(site as u8, layout, true) };
            assert!(!ptr.is_null());
            // SAFETY: `size` bytes were allocated, zeroed.
            assert!(unsafe { std::slice::from_raw_parts(ptr, size) }.iter().all(|b| *b == 0));
            assert_eq!(live(site), (before.0 + charged, before.1 + 1), "{size} bytes");
            // SAFETY: the block is live and `size` bytes long.
            unsafe { ptr.write_bytes(0xAB, size) };
            // SAFETY: allocated above with `layout`.
            unsafe { SiteAllocator.dealloc(ptr, layout) };
            assert_eq!(live(site), before, "{size} bytes freed");
        }
        // A grown block keeps its site through a realloc within the tagged classes.
        let layout = Layout::from_size_align(8192, 8).expect("a valid layout");
        // SAFETY: as above.
        let ptr = unsafe { SiteAllocator::alloc_for(site as u8, layout, false) };
        // SAFETY: allocated above with `layout`; 16384 is a valid new size.
        let grown = unsafe { SiteAllocator.realloc(ptr, layout, 16384) };
        assert!(!grown.is_null());
        assert_eq!(live(site), (before.0 + 20480, before.1 + 1));
        // SAFETY: the block now has 16384 bytes of this layout's alignment.
        unsafe { SiteAllocator.dealloc(grown, Layout::from_size_align(16384, 8).expect("a valid layout")) };
        assert_eq!(live(site), before);
    }
}
