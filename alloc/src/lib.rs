//! `pushline-alloc`: where a Pushline server's memory goes, and the one definition of
//! every format the server and its tools share to say so.
//!
//! - [`site`]: the named allocation sites and the thread's current one;
//! - [`table`]: the exported site table (`PUSHLINE_ALLOC_SITES`), its layout and
//!   [`table::parse`], which `pushline-tools` and the gdb extension follow;
//! - [`allocator`] (feature `allocator`): [`SiteAllocator`], jemalloc charging every
//!   allocation to a site, with an off switch;
//! - [`jemalloc`] (feature `allocator`): statistics and sampled heap profiles;
//! - [`baseline`] (feature `allocator`): memory just before the first connection;
//! - [`process`] and [`socket`]: what the kernel holds for a process: resident memory,
//!   and the buffers of each socket (SO_MEMINFO);
//! - [`flame`]: folded stacks rendered as flame graphs;
//! - [`symbolize`] (feature `symbolize`): heap profiles named from the binary on disk.
//!
//! The server binary declares `#[global_allocator]`; nothing else here is global.
#![deny(unsafe_op_in_unsafe_fn)]

#[cfg(feature = "allocator")]
pub mod allocator;
#[cfg(feature = "allocator")]
pub mod baseline;
pub mod flame;
#[cfg(feature = "allocator")]
pub mod jemalloc;
pub mod process;
pub mod site;
pub mod socket;
#[cfg(feature = "symbolize")]
pub mod symbolize;
pub mod table;

#[cfg(feature = "allocator")]
pub use allocator::SiteAllocator;
pub use site::Site;
