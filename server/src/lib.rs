//! Pushline: a push server for millions of long-lived, mostly idle connections.
//!
//! Data moves one way through these modules:
//! - [`listener`] accepts TCP connections (SO_REUSEPORT, file-limit backoff);
//! - [`gateway`] reads the first request, authenticates ([`gateway::auth`]) and upgrades
//!   to WebSocket or SSE, or hands the connection to the publish [`api`];
//! - [`hub`] registers connections by session ([`session`]), uid and topic, and fans
//!   messages out to them, paced; [`registry`] is where delivery to other nodes plugs in;
//! - [`conn`] owns each socket: its bounded queue, the wire format, and the sweeper that
//!   enforces idle timeouts and pings for all connections at once;
//! - [`admin`] serves metrics and health on its own runtime; [`telemetry`] names every
//!   metric; [`probes`] are the USDT probes bpftrace attaches to; [`server`] wires it
//!   all and runs the graceful shutdown.
//!
//! jemalloc is the allocator, wrapped by [`alloc::sites`] so every allocation is
//! charged to a named site; those counters, jemalloc's statistics and its heap profiles
//! are what the debug endpoints and tools read.

#[global_allocator]
static ALLOCATOR: alloc::sites::SiteAllocator = alloc::sites::SiteAllocator;

pub mod admin;
pub mod alloc;
pub mod api;
pub mod config;
pub mod conn;
pub mod gateway;
pub mod hub;
pub mod listener;
pub mod probes;
pub mod registry;
pub mod server;
pub mod session;
pub mod telemetry;

pub use config::Config;
pub use server::Server;
