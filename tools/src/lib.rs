//! The Pushline toolkit: each module is one command of `pushline-tools`.
//! - [`audit`]: `memory-audit`, per-connection memory of a live server from its pid;
//! - [`flame`]: `flamegraph`, CPU flame graphs, differential ones, and bpftrace's stacks;
//! - [`heap`]: `heap`, live heap snapshots and what grew between two;
//! - [`target`]: finding a server's admin listener from a pid or an address.
//!
//! The gdb extension (`tools/gdb/pushline.py`) reads the same site table from a core.

pub mod audit;
pub mod flame;
pub mod heap;
pub mod target;
