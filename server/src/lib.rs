//! Pushline: a push server for millions of long-lived, mostly idle connections.
//!
//! Data moves one way through these modules, top to bottom:
//! - [`server`] builds every part, hands each what it needs, and runs [`shutdown`];
//! - [`listener`] accepts TCP connections (SO_REUSEPORT, file-limit backoff), reads
//!   each one's request head ([`http`]) and routes it: `/ws` and `/sse` to the
//!   [`gateway`], everything else to the publish [`api`];
//! - [`gateway`] authenticates ([`auth`]), takes a place ([`admission`]), asks the
//!   application when configured to ([`hooks`]), registers the connection with the
//!   [`hub`], replays what a returning client missed ([`history`]) and answers the
//!   handshake;
//! - [`api`] checks a publish and hands it to the [`registry`], which gives it its place
//!   in its stream ([`history`]) and delivers it through the [`hub`] here and over Redis
//!   ([`redis_link`]) to other nodes;
//! - [`client`] owns each connected socket, on the [`cores`] runtime it was given: reads client frames, writes what the
//!   connection is owed, closes; [`client::sweep`] keeps time for all of them;
//! - [`hub`] knows who is connected and fans messages out to their [`conn`] handles,
//!   whose bounded queues the client tasks drain;
//! - [`wire`] frames bytes (the WebSocket codec, SSE, published messages), with no I/O.
//!
//! The Pusher Channels protocol is a second adapter over the same core: its shared parts
//! are [`pusher`] (apps, channels as topics, socket ids, frames, signatures); the gateway
//! takes its connections at `/app/{key}`, `client` reads its frames, `api` serves its
//! signed HTTP API.
//!
//! Beside the flow: [`webhooks`] tell the application of topics occupied and vacated,
//! members and client publishes, over the same HTTP client as the hooks
//! ([`application`]); [`admin`] serves metrics, profiles and introspection on its own
//! runtime; [`telemetry`] names every metric and probe; [`config`], [`error`], topic
//! [`rights`], [`session`] ids and the [`clock`] are at the bottom. Memory accounting lives in the
//! `pushline-alloc` crate; the binary installs its allocator.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod admin;
pub mod application;
pub mod auth;
pub mod admission;
pub mod api;
pub mod client;
pub mod clock;
pub mod config;
pub mod conn;
pub mod cores;
pub mod error;
pub mod gateway;
pub mod history;
pub mod hooks;
pub mod presence;
pub mod pusher;
pub mod http;
pub mod hub;
pub mod listener;
pub mod redis_link;
pub mod registry;
pub mod rights;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod socket;
pub mod telemetry;
pub mod tls;
pub mod webhooks;
pub mod wire;

pub use admin::SYMBOLIZE;
pub use config::Config;
pub use server::Server;
