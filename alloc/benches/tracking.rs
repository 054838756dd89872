//! What site tracking costs per allocation: an allocate + free pair with tracking on (on a
//! thread without site caches, and on one that keeps them, as the server's threads do),
//! with it switched off (one atomic load), and straight to jemalloc.
//!
//!     cargo bench -p pushline-alloc --bench tracking
//!
//! Tracking can only be switched off, so the tracked runs come first.

use std::alloc::{GlobalAlloc, Layout};
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use pushline_alloc::{allocator, Site, SiteAllocator};

#[global_allocator]
static ALLOCATOR: SiteAllocator = SiteAllocator;

/// 24 B: a small object; 100 B: a framed message; 4 KiB: a read buffer; 64 B fills its
/// size class exactly, so when tracked it takes the site-arena path (through the thread's
/// site cache where it keeps them).
const SIZES: [usize; 4] = [24, 64, 100, 4096];

fn pairs(c: &mut Criterion, label: &str, allocator: &dyn GlobalAlloc) {
    let mut group = c.benchmark_group(format!("alloc_free/{label}"));
    for size in SIZES {
        let layout = Layout::from_size_align(size, 8).unwrap();
        group.bench_function(format!("{size}B"), |b| {
            b.iter(|| {
                // SAFETY: a non-zero layout, freed with the same layout it was allocated with.
                unsafe {
                    let p = allocator.alloc(black_box(layout));
                    allocator.dealloc(black_box(p), layout);
                }
            })
        });
    }
    group.finish();
}

fn tracked(c: &mut Criterion) {
    let _site = Site::Sessions.enter();
    pairs(c, "tracking_on", &SiteAllocator);
    allocator::thread_caches::start();
    pairs(c, "tracking_on_site_caches", &SiteAllocator);
    allocator::thread_caches::stop();
}

fn switched_off(c: &mut Criterion) {
    allocator::disable_tracking();
    pairs(c, "tracking_off", &SiteAllocator);
    pairs(c, "jemalloc_direct", &tikv_jemallocator::Jemalloc);
}

criterion_group!(benches, tracked, switched_off);
criterion_main!(benches);
