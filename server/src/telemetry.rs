//! Metric names, their handles, and log set-up. Every metric the server exports is
//! defined here, once.
//!
//! Each server owns its own Prometheus recorder (no global recorder), so two servers in
//! one process (as in tests) count separately. Handles are registered once at start;
//! the hot path only touches atomics.

use std::sync::atomic::{AtomicUsize, Ordering};

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use crate::alloc::sites::{Site, SITES};
use crate::conn::wire::Transport;

pub const CONNECTIONS: &str = "pushline_connections";
pub const CONNECTIONS_OPENED: &str = "pushline_connections_opened_total";
pub const CONNECTIONS_CLOSED: &str = "pushline_connections_closed_total";
pub const CONNECTIONS_REFUSED: &str = "pushline_connections_refused_total";
pub const ACCEPT_ERRORS: &str = "pushline_accept_errors_total";
pub const MESSAGES_PUBLISHED: &str = "pushline_messages_published_total";
pub const MESSAGES_DELIVERED: &str = "pushline_messages_delivered_total";
pub const MESSAGES_DROPPED: &str = "pushline_messages_dropped_total";
pub const DELIVERY_LATENCY: &str = "pushline_delivery_latency_seconds";
pub const OUTBOUND_QUEUED_BYTES: &str = "pushline_outbound_queued_bytes";
pub const OUTBOUND_QUEUED_MESSAGES: &str = "pushline_outbound_queued_messages";
pub const CLIENT_ERRORS: &str = "pushline_client_errors_total";
pub const API_REQUESTS: &str = "pushline_api_requests_total";
pub const JEMALLOC_BYTES: &str = "pushline_jemalloc_bytes";
pub const JEMALLOC_FRAGMENTATION: &str = "pushline_jemalloc_fragmentation_ratio";
pub const ALLOC_SITE_LIVE_BYTES: &str = "pushline_alloc_site_live_bytes";
pub const ALLOC_SITE_LIVE_ALLOCATIONS: &str = "pushline_alloc_site_live_allocations";
pub const ALLOC_SITE_ALLOCATIONS: &str = "pushline_alloc_site_allocations_total";
pub const TOKIO_WORKERS: &str = "pushline_tokio_workers";
pub const TOKIO_ALIVE_TASKS: &str = "pushline_tokio_alive_tasks";
pub const TOKIO_GLOBAL_QUEUE_DEPTH: &str = "pushline_tokio_global_queue_depth";
pub const REDIS_COMMAND_SECONDS: &str = "pushline_redis_command_seconds";
pub const REDIS_ERRORS: &str = "pushline_redis_errors_total";
pub const REDIS_RECONNECTS: &str = "pushline_redis_reconnects_total";
pub const REDIS_UP: &str = "pushline_redis_up";
pub const REGISTRY_SESSIONS: &str = "pushline_registry_sessions";
pub const REGISTRY_PENDING: &str = "pushline_registry_pending_changes";
pub const RELAY_MESSAGES: &str = "pushline_relay_messages_total";

const REDIS_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

const LATENCY_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

static META: Metadata<'static> = Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

/// Why a connection closed. Label `reason` of `pushline_connections_closed_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum CloseReason {
    /// The client sent a close frame or closed its end.
    Client = 0,
    IdleTimeout,
    /// Outbound queue overflowed under `--slow-consumer disconnect`.
    SlowConsumer,
    Shutdown,
    ProtocolError,
    /// A read or write failed (reset, broken pipe).
    IoError,
}

impl CloseReason {
    pub const ALL: [CloseReason; 6] = [
        CloseReason::Client,
        CloseReason::IdleTimeout,
        CloseReason::SlowConsumer,
        CloseReason::Shutdown,
        CloseReason::ProtocolError,
        CloseReason::IoError,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Client => "client",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::Shutdown => "shutdown",
            CloseReason::ProtocolError => "protocol_error",
            CloseReason::IoError => "io_error",
        }
    }

    pub fn from_u8(v: u8) -> Option<CloseReason> {
        CloseReason::ALL.get(v as usize).copied()
    }
}

/// Why a message did not reach a connection. Label `reason` of `pushline_messages_dropped_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// Discarded by drop-oldest to make room in a full queue.
    QueueFull,
    /// Discarded with the connection closed by the disconnect policy.
    SlowConsumer,
    /// Still queued when its connection closed.
    ConnectionClosed,
    /// A whole publish refused with 503 because the node's queued bytes were over budget.
    NodeOverBudget,
    /// A publish that could not reach the other nodes because Redis failed (answered 503).
    RegistryUnavailable,
    /// Sent to a node's channel while that node was not subscribed (reconnecting to Redis).
    NodeUnreachable,
    /// A message from another node that could not be decoded.
    BadRelay,
}

impl DropReason {
    pub const ALL: [DropReason; 7] = [
        DropReason::QueueFull,
        DropReason::SlowConsumer,
        DropReason::ConnectionClosed,
        DropReason::NodeOverBudget,
        DropReason::RegistryUnavailable,
        DropReason::NodeUnreachable,
        DropReason::BadRelay,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::SlowConsumer => "slow_consumer",
            DropReason::ConnectionClosed => "connection_closed",
            DropReason::NodeOverBudget => "node_over_budget",
            DropReason::RegistryUnavailable => "registry_unavailable",
            DropReason::NodeUnreachable => "node_unreachable",
            DropReason::BadRelay => "bad_relay",
        }
    }
}

/// Why a connection attempt was turned away. Label `reason` of `pushline_connections_refused_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefuseReason {
    MaxConnections,
    Unauthorized,
    BadRequest,
    HandshakeTimeout,
    ShuttingDown,
}

impl RefuseReason {
    pub const ALL: [RefuseReason; 5] = [
        RefuseReason::MaxConnections,
        RefuseReason::Unauthorized,
        RefuseReason::BadRequest,
        RefuseReason::HandshakeTimeout,
        RefuseReason::ShuttingDown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RefuseReason::MaxConnections => "max_connections",
            RefuseReason::Unauthorized => "unauthorized",
            RefuseReason::BadRequest => "bad_request",
            RefuseReason::HandshakeTimeout => "handshake_timeout",
            RefuseReason::ShuttingDown => "shutting_down",
        }
    }
}

/// What a publish addressed. Label `kind` of `pushline_messages_published_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PublishKind {
    Push,
    Topic,
    Broadcast,
}

impl PublishKind {
    pub const ALL: [PublishKind; 3] = [PublishKind::Push, PublishKind::Topic, PublishKind::Broadcast];

    pub fn as_str(self) -> &'static str {
        match self {
            PublishKind::Push => "push",
            PublishKind::Topic => "topic",
            PublishKind::Broadcast => "broadcast",
        }
    }
}

/// A client frame the server could not use. Label `reason` of `pushline_client_errors_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientError {
    BadJson,
    UnknownType,
    TooManyTopics,
    BinaryFrame,
}

impl ClientError {
    pub const ALL: [ClientError; 4] =
        [ClientError::BadJson, ClientError::UnknownType, ClientError::TooManyTopics, ClientError::BinaryFrame];

    pub fn as_str(self) -> &'static str {
        match self {
            ClientError::BadJson => "bad_json",
            ClientError::UnknownType => "unknown_type",
            ClientError::TooManyTopics => "too_many_topics",
            ClientError::BinaryFrame => "binary_frame",
        }
    }
}

/// A Redis command, as Pushline uses them. Label `command` of the Redis metrics; its
/// number is the first argument of the `redis_start` / `redis_end` probes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RedisCommand {
    /// A batch of session changes (HSET / HDEL), one round trip on a single Redis.
    Sessions = 0,
    /// Where the pushed uids are (HGETALL per uid, batched).
    Hgetall,
    /// Deleting dead nodes' sessions found by a lookup.
    Hdel,
    /// Liveness key refresh and node id claim.
    Set,
    Get,
    Del,
    Publish,
    Subscribe,
}

impl RedisCommand {
    pub const ALL: [RedisCommand; 8] = [
        RedisCommand::Sessions,
        RedisCommand::Hgetall,
        RedisCommand::Hdel,
        RedisCommand::Set,
        RedisCommand::Get,
        RedisCommand::Del,
        RedisCommand::Publish,
        RedisCommand::Subscribe,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RedisCommand::Sessions => "sessions",
            RedisCommand::Hgetall => "hgetall",
            RedisCommand::Hdel => "hdel",
            RedisCommand::Set => "set",
            RedisCommand::Get => "get",
            RedisCommand::Del => "del",
            RedisCommand::Publish => "publish",
            RedisCommand::Subscribe => "subscribe",
        }
    }
}

/// Direction of a message between nodes. Label `direction` of `pushline_relay_messages_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Relayed {
    Out,
    In,
}

/// Accept failures; EMFILE/ENFILE mean the file table is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcceptError {
    FileLimit,
    Other,
}

pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    connections: [Gauge; 2],
    opened: [Counter; 2],
    closed: [[Counter; CloseReason::ALL.len()]; 2],
    refused: [Counter; RefuseReason::ALL.len()],
    accept_errors: [Counter; 2],
    published: [Counter; PublishKind::ALL.len()],
    pub delivered: Counter,
    dropped: [Counter; DropReason::ALL.len()],
    client_errors: [Counter; ClientError::ALL.len()],
    pub delivery_latency: Histogram,
    queued_bytes: Gauge,
    queued_messages: Gauge,
    jemalloc: [Gauge; 6],
    jemalloc_fragmentation: Gauge,
    /// Per allocation site: live bytes, live allocations, allocations (as a gauge that
    /// only grows: the count lives in the site table, not in the recorder).
    sites: [[Gauge; 3]; SITES],
    tokio: [Gauge; 3],
    redis_latency: [Histogram; RedisCommand::ALL.len()],
    redis_errors: [Counter; RedisCommand::ALL.len()],
    pub redis_reconnects: Counter,
    pub redis_up: Gauge,
    pub registry_sessions: Gauge,
    pub registry_pending: Gauge,
    relayed: [[Counter; PublishKind::ALL.len()]; 2],
    /// Outbound bytes and messages queued on this node right now; the gauges are set from
    /// these at scrape time, and the publish API checks the byte budget against them.
    pub queued_bytes_now: AtomicUsize,
    pub queued_messages_now: AtomicUsize,
}

impl Metrics {
    pub fn new() -> Metrics {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(DELIVERY_LATENCY.into()), LATENCY_BUCKETS)
            .expect("latency buckets are not empty")
            .set_buckets_for_metric(Matcher::Full(REDIS_COMMAND_SECONDS.into()), REDIS_BUCKETS)
            .expect("Redis buckets are not empty")
            .build_recorder();
        let handle = recorder.handle();
        let counter = |name: &'static str, labels: &[(&'static str, &'static str)]| {
            let labels: Vec<Label> = labels.iter().map(|(k, v)| Label::from_static_parts(k, v)).collect();
            recorder.register_counter(&Key::from_parts(name, labels), &META)
        };
        let gauge = |name: &'static str, labels: &[(&'static str, &'static str)]| {
            let labels: Vec<Label> = labels.iter().map(|(k, v)| Label::from_static_parts(k, v)).collect();
            recorder.register_gauge(&Key::from_parts(name, labels), &META)
        };
        let by_transport = |name| Transport::ALL.map(|t| counter(name, &[("transport", t.as_str())]));
        let describe = |name: &'static str, unit: Unit, text: &'static str| {
            recorder.describe_counter(KeyName::from_const_str(name), Some(unit), SharedString::const_str(text));
        };
        describe(CONNECTIONS_OPENED, Unit::Count, "Connections that completed their handshake.");
        describe(CONNECTIONS_CLOSED, Unit::Count, "Connections closed, by reason.");
        describe(CONNECTIONS_REFUSED, Unit::Count, "Connection attempts turned away, by reason.");
        describe(ACCEPT_ERRORS, Unit::Count, "accept() failures; file_limit means EMFILE/ENFILE.");
        describe(MESSAGES_PUBLISHED, Unit::Count, "Messages accepted by the publish API, by kind.");
        describe(MESSAGES_DELIVERED, Unit::Count, "Messages written to a client socket.");
        describe(MESSAGES_DROPPED, Unit::Count, "Messages that did not reach a connection, by reason.");
        describe(CLIENT_ERRORS, Unit::Count, "Client frames the server could not use, by reason.");
        describe(API_REQUESTS, Unit::Count, "Publish API requests, by route and status.");
        describe(REDIS_ERRORS, Unit::Count, "Redis commands that failed, by command.");
        describe(REDIS_RECONNECTS, Unit::Count, "Times the Redis connection was lost (and reconnected).");
        describe(RELAY_MESSAGES, Unit::Count, "Messages sent to or received from other nodes, by direction and kind.");
        recorder.describe_gauge(
            KeyName::from_const_str(CONNECTIONS),
            Some(Unit::Count),
            SharedString::const_str("Open client connections, by transport."),
        );
        recorder.describe_gauge(
            KeyName::from_const_str(OUTBOUND_QUEUED_BYTES),
            Some(Unit::Bytes),
            SharedString::const_str("Bytes waiting in outbound queues."),
        );
        recorder.describe_gauge(
            KeyName::from_const_str(JEMALLOC_BYTES),
            Some(Unit::Bytes),
            SharedString::const_str("jemalloc statistics: allocated, active, resident, mapped, retained, metadata."),
        );
        recorder.describe_gauge(
            KeyName::from_const_str(JEMALLOC_FRAGMENTATION),
            None,
            SharedString::const_str("jemalloc active / allocated; 1.0 is no space lost inside pages."),
        );
        for (name, unit, text) in [
            (ALLOC_SITE_LIVE_BYTES, Unit::Bytes, "Bytes allocated by each site and not yet freed."),
            (ALLOC_SITE_LIVE_ALLOCATIONS, Unit::Count, "Allocations made by each site and not yet freed."),
            (ALLOC_SITE_ALLOCATIONS, Unit::Count, "Allocations each site has made since start."),
            (TOKIO_WORKERS, Unit::Count, "Worker threads of the serving runtime."),
            (TOKIO_ALIVE_TASKS, Unit::Count, "Tasks alive in the serving runtime."),
            (TOKIO_GLOBAL_QUEUE_DEPTH, Unit::Count, "Tasks waiting in the serving runtime's global queue."),
            (REDIS_UP, Unit::Count, "1 while the last Redis command succeeded, 0 after one failed."),
            (REGISTRY_SESSIONS, Unit::Count, "This node's sessions registered in Redis."),
            (REGISTRY_PENDING, Unit::Count, "Session changes waiting to be written to Redis."),
        ] {
            recorder.describe_gauge(KeyName::from_const_str(name), Some(unit), SharedString::const_str(text));
        }
        recorder.describe_histogram(
            KeyName::from_const_str(DELIVERY_LATENCY),
            Some(Unit::Seconds),
            SharedString::const_str("From publish accepted to bytes handed to the socket."),
        );
        recorder.describe_histogram(
            KeyName::from_const_str(REDIS_COMMAND_SECONDS),
            Some(Unit::Seconds),
            SharedString::const_str("Redis command round trips, by command."),
        );
        Metrics {
            connections: Transport::ALL.map(|t| gauge(CONNECTIONS, &[("transport", t.as_str())])),
            opened: by_transport(CONNECTIONS_OPENED),
            closed: Transport::ALL.map(|t| {
                CloseReason::ALL.map(|r| counter(CONNECTIONS_CLOSED, &[("transport", t.as_str()), ("reason", r.as_str())]))
            }),
            refused: RefuseReason::ALL.map(|r| counter(CONNECTIONS_REFUSED, &[("reason", r.as_str())])),
            accept_errors: [
                counter(ACCEPT_ERRORS, &[("kind", "file_limit")]),
                counter(ACCEPT_ERRORS, &[("kind", "other")]),
            ],
            published: PublishKind::ALL.map(|k| counter(MESSAGES_PUBLISHED, &[("kind", k.as_str())])),
            delivered: counter(MESSAGES_DELIVERED, &[]),
            dropped: DropReason::ALL.map(|r| counter(MESSAGES_DROPPED, &[("reason", r.as_str())])),
            client_errors: ClientError::ALL.map(|r| counter(CLIENT_ERRORS, &[("reason", r.as_str())])),
            delivery_latency: recorder.register_histogram(&Key::from_static_name(DELIVERY_LATENCY), &META),
            queued_bytes: gauge(OUTBOUND_QUEUED_BYTES, &[]),
            queued_messages: gauge(OUTBOUND_QUEUED_MESSAGES, &[]),
            jemalloc: ["allocated", "active", "resident", "mapped", "retained", "metadata"]
                .map(|stat| gauge(JEMALLOC_BYTES, &[("stat", stat)])),
            jemalloc_fragmentation: gauge(JEMALLOC_FRAGMENTATION, &[]),
            sites: Site::ALL.map(|site| {
                [ALLOC_SITE_LIVE_BYTES, ALLOC_SITE_LIVE_ALLOCATIONS, ALLOC_SITE_ALLOCATIONS]
                    .map(|name| gauge(name, &[("site", site.name())]))
            }),
            tokio: [TOKIO_WORKERS, TOKIO_ALIVE_TASKS, TOKIO_GLOBAL_QUEUE_DEPTH].map(|name| gauge(name, &[])),
            redis_latency: RedisCommand::ALL.map(|c| {
                let key = Key::from_parts(REDIS_COMMAND_SECONDS, vec![Label::from_static_parts("command", c.as_str())]);
                recorder.register_histogram(&key, &META)
            }),
            redis_errors: RedisCommand::ALL.map(|c| counter(REDIS_ERRORS, &[("command", c.as_str())])),
            redis_reconnects: counter(REDIS_RECONNECTS, &[]),
            redis_up: gauge(REDIS_UP, &[]),
            registry_sessions: gauge(REGISTRY_SESSIONS, &[]),
            registry_pending: gauge(REGISTRY_PENDING, &[]),
            relayed: [("out", 0), ("in", 1)].map(|(direction, _)| {
                PublishKind::ALL.map(|k| counter(RELAY_MESSAGES, &[("direction", direction), ("kind", k.as_str())]))
            }),
            queued_bytes_now: AtomicUsize::new(0),
            queued_messages_now: AtomicUsize::new(0),
            recorder,
            handle,
        }
    }

    pub fn connection_opened(&self, t: Transport) {
        self.opened[t.index()].increment(1);
        self.connections[t.index()].increment(1.0);
    }

    pub fn connection_closed(&self, t: Transport, reason: CloseReason) {
        self.closed[t.index()][reason as usize].increment(1);
        self.connections[t.index()].decrement(1.0);
    }

    pub fn refused(&self, reason: RefuseReason) {
        self.refused[reason as usize].increment(1);
    }

    pub fn accept_error(&self, kind: AcceptError) {
        self.accept_errors[kind as usize].increment(1);
    }

    pub fn published(&self, kind: PublishKind) {
        self.published[kind as usize].increment(1);
    }

    pub fn dropped(&self, reason: DropReason, count: usize) {
        if count > 0 {
            crate::probes::msg_drop(reason as u8, count);
            self.dropped[reason as usize].increment(count as u64);
        }
    }

    pub fn redis_command(&self, command: RedisCommand, seconds: f64, ok: bool) {
        self.redis_latency[command as usize].record(seconds);
        if !ok {
            self.redis_errors[command as usize].increment(1);
        }
        self.redis_up.set(if ok { 1.0 } else { 0.0 });
    }

    pub fn relayed(&self, direction: Relayed, kind: PublishKind) {
        self.relayed[direction as usize][kind as usize].increment(1);
    }

    pub fn client_error(&self, e: ClientError) {
        self.client_errors[e as usize].increment(1);
    }

    pub fn queued(&self, messages: isize, bytes: isize) {
        // Wrapping adds of a negative delta as two's complement keep this one atomic op.
        self.queued_messages_now.fetch_add(messages as usize, Ordering::Relaxed);
        self.queued_bytes_now.fetch_add(bytes as usize, Ordering::Relaxed);
    }

    pub fn api_request(&self, route: &'static str, status: u16) {
        let status = match status {
            200 => "200",
            400 => "400",
            401 => "401",
            404 => "404",
            405 => "405",
            413 => "413",
            503 => "503",
            _ => "other",
        };
        let key = Key::from_parts(
            API_REQUESTS,
            vec![Label::from_static_parts("route", route), Label::from_static_parts("status", status)],
        );
        self.recorder.register_counter(&key, &META).increment(1);
    }

    /// Prometheus text exposition, with the gauges that are read at scrape time brought up
    /// to date; `runtime` is the serving runtime's.
    pub fn render(&self, runtime: &tokio::runtime::RuntimeMetrics) -> String {
        for (gauges, stats) in self.sites.iter().zip(crate::alloc::sites::snapshot()) {
            gauges[0].set(stats.live_bytes as f64);
            gauges[1].set(stats.live_allocs as f64);
            gauges[2].set(stats.total_allocs as f64);
        }
        let tokio = [runtime.num_workers(), runtime.num_alive_tasks(), runtime.global_queue_depth()];
        for (gauge, value) in self.tokio.iter().zip(tokio) {
            gauge.set(value as f64);
        }
        self.queued_bytes.set(self.queued_bytes_now.load(Ordering::Relaxed) as f64);
        self.queued_messages.set(self.queued_messages_now.load(Ordering::Relaxed) as f64);
        if let Ok(stats) = crate::alloc::JemallocStats::read() {
            let values = [stats.allocated, stats.active, stats.resident, stats.mapped, stats.retained, stats.metadata];
            for (gauge, value) in self.jemalloc.iter().zip(values) {
                gauge.set(value as f64);
            }
            self.jemalloc_fragmentation.set(stats.fragmentation());
        }
        self.handle.render()
    }

    /// Drains histogram samples into their buckets; without it they pile up between scrapes.
    pub fn run_upkeep(&self) {
        self.handle.run_upkeep();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Logs to stderr through `tracing`; `filter` is an `EnvFilter` directive. With the
/// `console` feature and an address, tokio-console's server runs there too.
pub fn init_logging(filter: &str, #[cfg(feature = "console")] console: Option<std::net::SocketAddr>) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let filter = tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // log_internal_errors(false): on a closed stderr, tracing-subscriber would otherwise
    // eprintln! its write error, which panics, and take down whatever task was logging
    // (seen: the accept loop, during an EMFILE backoff).
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).log_internal_errors(false).with_filter(filter);
    let registry = tracing_subscriber::registry().with(fmt);
    #[cfg(feature = "console")]
    if let Some(addr) = console {
        let _ = registry.with(console_subscriber::ConsoleLayer::builder().server_addr(addr).spawn()).try_init();
        return;
    }
    let _ = registry.try_init();
}
