//! Metric names and their handles: every metric the server exports is defined here,
//! once, with the label values of [`labels`] and the USDT [`probes`] beside them.
//!
//! Each server owns its own Prometheus recorder (no global recorder), so two servers in
//! one process (as in tests) count separately. Every series is registered at start;
//! the hot path only indexes an array of handles and touches atomics.

pub mod labels;
mod latency;
pub mod logging;
pub mod probes;

use std::sync::atomic::{AtomicUsize, Ordering};

use latency::LatencyHistogram;
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use pushline_alloc::site::{Site, SITES};
use strum::{EnumCount, VariantArray};

pub use labels::{
    AcceptError, ApiRoute, ApiStatus, ClientError, CloseReason, DropReason, EpochReset, Eviction, HookKind, HookOutcome, PresenceEvent, PublishKind, PusherSource, RedisCommand, RefuseReason,
    Relayed, ResumeOutcome, TlsHandshake, WebhookOutcome,
};

use crate::wire::Transport;
use logging::Throttle;

/// How often a repeated warning may be logged.
const LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

pub const CONNECTIONS: &str = "pushline_connections";
pub const CONNECTIONS_OPENED: &str = "pushline_connections_opened_total";
pub const CONNECTIONS_CLOSED: &str = "pushline_connections_closed_total";
pub const CONNECTIONS_REFUSED: &str = "pushline_connections_refused_total";
pub const ACCEPT_ERRORS: &str = "pushline_accept_errors_total";
pub const MESSAGES_PUBLISHED: &str = "pushline_messages_published_total";
pub const MESSAGES_DELIVERED: &str = "pushline_messages_delivered_total";
pub const MESSAGES_DROPPED: &str = "pushline_messages_dropped_total";
pub const DELIVERY_LATENCY: &str = "pushline_delivery_latency_seconds";
const DELIVERY_LATENCY_HELP: &str = "From publish accepted to bytes handed to the socket.";
pub const OUTBOUND_QUEUED_BYTES: &str = "pushline_outbound_queued_bytes";
pub const OUTBOUND_QUEUED_MESSAGES: &str = "pushline_outbound_queued_messages";
pub const CLIENT_ERRORS: &str = "pushline_client_errors_total";
pub const API_REQUESTS: &str = "pushline_api_requests_total";
pub const API_BATCH_ITEMS: &str = "pushline_api_batch_items_total";
pub const JEMALLOC_BYTES: &str = "pushline_jemalloc_bytes";
pub const JEMALLOC_FRAGMENTATION: &str = "pushline_jemalloc_fragmentation_ratio";
pub const ALLOC_SITE_LIVE_BYTES: &str = "pushline_alloc_site_live_bytes";
pub const ALLOC_SITE_LIVE_ALLOCATIONS: &str = "pushline_alloc_site_live_allocations";
pub const ALLOC_SITE_ALLOCATIONS: &str = "pushline_alloc_site_allocations_total";
pub const TOKIO_WORKERS: &str = "pushline_tokio_workers";
pub const TOKIO_ALIVE_TASKS: &str = "pushline_tokio_alive_tasks";
pub const TOKIO_GLOBAL_QUEUE_DEPTH: &str = "pushline_tokio_global_queue_depth";
pub const PROCESS_RESIDENT: &str = "pushline_process_resident_bytes";
pub const OPEN_FDS: &str = "pushline_open_fds";
pub const MAX_FDS: &str = "pushline_max_fds";
pub const TCP_KERNEL: &str = "pushline_tcp_kernel_bytes";
pub const REDIS_COMMAND_SECONDS: &str = "pushline_redis_command_seconds";
pub const REDIS_ERRORS: &str = "pushline_redis_errors_total";
pub const REDIS_RECONNECTS: &str = "pushline_redis_reconnects_total";
pub const REDIS_UP: &str = "pushline_redis_up";
pub const REDIS_MASTER_CHANGES: &str = "pushline_redis_master_changes_total";
pub const RELAY_LOST: &str = "pushline_relay_lost_total";
pub const PRESENCE_MEMBERS: &str = "pushline_presence_members";
pub const PRESENCE_EVENTS: &str = "pushline_presence_events_total";
pub const HOOK_REQUESTS: &str = "pushline_hook_requests_total";
pub const HOOK_SECONDS: &str = "pushline_hook_seconds";
pub const HOOK_BREAKER_OPEN: &str = "pushline_hook_breaker_open";
pub const WEBHOOK_EVENTS: &str = "pushline_webhook_events_total";
pub const WEBHOOK_BATCHES: &str = "pushline_webhook_batches_total";
pub const WEBHOOK_QUEUED_BYTES: &str = "pushline_webhook_queued_bytes";
pub const PUBLISH_BYTES_READING: &str = "pushline_publish_bytes_reading";
pub const REGISTRY_SESSIONS: &str = "pushline_registry_sessions";
pub const REGISTRY_PENDING: &str = "pushline_registry_pending_changes";
pub const RELAY_MESSAGES: &str = "pushline_relay_messages_total";
pub const MESSAGES_DEDUPLICATED: &str = "pushline_messages_deduplicated_total";
pub const HISTORY_MESSAGES: &str = "pushline_history_messages";
pub const HISTORY_BYTES: &str = "pushline_history_bytes";
pub const HISTORY_STREAMS: &str = "pushline_history_streams";
pub const HISTORY_EVICTED: &str = "pushline_history_streams_evicted_total";
pub const HISTORY_EPOCH_RESETS: &str = "pushline_history_epoch_resets_total";
pub const NOT_REPLICATED: &str = "pushline_publishes_not_replicated_total";
pub const PROFILER_SAMPLES: &str = "pushline_profiler_samples_total";
pub const PROFILER_DROPPED: &str = "pushline_profiler_samples_dropped_total";
pub const PROFILER_FRAMES: &str = "pushline_profiler_stack_frames";
pub const RESUMES: &str = "pushline_resumes_total";
pub const RESUME_REPLAYED: &str = "pushline_resume_replayed_messages_total";
pub const IDEMPOTENT_REPLAYS: &str = "pushline_idempotent_replays_total";
pub const TLS_HANDSHAKES: &str = "pushline_tls_handshakes_total";
pub const TLS_CERT_EXPIRY: &str = "pushline_tls_cert_expiry_seconds";
pub const PUSHER_CONNECTIONS: &str = "pushline_pusher_connections";
pub const PUSHER_EVENTS: &str = "pushline_pusher_events_total";

const REDIS_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

const LATENCY_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

static META: Metadata<'static> = Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

pub struct Metrics {
    handle: PrometheusHandle,
    connections: [Gauge; Transport::COUNT],
    opened: [Counter; Transport::COUNT],
    closed: [[Counter; CloseReason::COUNT]; Transport::COUNT],
    refused: [Counter; RefuseReason::COUNT],
    accept_errors: [Counter; AcceptError::COUNT],
    published: [Counter; PublishKind::COUNT],
    pub delivered: Counter,
    dropped: [Counter; DropReason::COUNT],
    client_errors: [Counter; ClientError::COUNT],
    api_requests: [[Counter; ApiStatus::COUNT]; ApiRoute::COUNT],
    api_batch_items: [Counter; ApiStatus::COUNT],
    delivery_latency: LatencyHistogram,
    queued_bytes: Gauge,
    queued_messages: Gauge,
    jemalloc: [Gauge; 6],
    jemalloc_fragmentation: Gauge,
    /// Per allocation site: live bytes, live allocations.
    sites: [[Gauge; 2]; SITES],
    /// Per allocation site, allocations since start: a counter set at scrape time from the
    /// site table, where the count lives.
    site_allocations: [Counter; SITES],
    tokio: [Gauge; 3],
    /// Resident bytes, open files, the open-file limit, TCP kernel memory.
    process: [Gauge; 4],
    redis_latency: [Histogram; RedisCommand::COUNT],
    redis_errors: [Counter; RedisCommand::COUNT],
    pub redis_reconnects: Counter,
    pub redis_master_changes: Counter,
    pub relay_lost: Counter,
    pub presence_members: Gauge,
    presence_events: [Counter; PresenceEvent::COUNT],
    hook_requests: [[Counter; HookOutcome::COUNT]; HookKind::COUNT],
    hook_seconds: [Histogram; HookKind::COUNT],
    hook_breaker_open: [Gauge; HookKind::COUNT],
    webhook_events: [Counter; WebhookOutcome::COUNT],
    /// Batches the application answered 2xx, and attempts that failed.
    webhook_batches: [Counter; 2],
    pub webhook_queued_bytes: Gauge,
    pub redis_up: Gauge,
    pub registry_sessions: Gauge,
    pub publish_bytes_reading: Gauge,
    pub registry_pending: Gauge,
    relayed: [[Counter; PublishKind::COUNT]; Relayed::COUNT],
    pub deduplicated: Counter,
    /// Messages, bytes and streams of history kept in this process.
    pub history: [Gauge; 3],
    history_evicted: [Counter; Eviction::COUNT],
    epoch_resets: [Counter; EpochReset::COUNT],
    pub not_replicated: Counter,
    profiler_samples: Counter,
    /// ring_full, thread_ended, stack_table_full.
    profiler_dropped: [Counter; 3],
    /// Held, and the cap.
    profiler_frames: [Gauge; 2],
    resumes: [Counter; ResumeOutcome::COUNT],
    pub resume_replayed: Counter,
    pub idempotent_replays: Counter,
    tls_handshakes: [Counter; TlsHandshake::COUNT],
    tls_cert_expiry: Gauge,
    /// Unix seconds when the listener's certificate expires; 0: no TLS.
    pub tls_not_after: std::sync::atomic::AtomicU64,
    /// One log line per second at most for each drop reason, refusal reason and Redis
    /// command failing: a storm is counted in full by the metrics, and summarised in the log.
    drop_log: [Throttle; DropReason::COUNT],
    refusal_log: [Throttle; RefuseReason::COUNT],
    redis_log: [Throttle; RedisCommand::COUNT],
    /// Outbound bytes and messages queued on this node right now; the gauges are set from
    /// these at scrape time, and the publish API checks the byte budget against them.
    pub queued_bytes_now: AtomicUsize,
    pub queued_messages_now: AtomicUsize,
    /// Each configured Pusher app's, in the apps' order (labelled by app id: apps are
    /// configured, never made by requests, so the series are bounded).
    pusher_apps: Vec<PusherAppMetrics>,
}

struct PusherAppMetrics {
    connections: Gauge,
    /// The same number, read for the app's `max_connections`.
    open: AtomicUsize,
    events: [Counter; PusherSource::COUNT],
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics::with_pusher_apps(&[])
    }

    /// With series of their own for the Pusher apps with these ids.
    pub fn with_pusher_apps(pusher_apps: &[&str]) -> Metrics {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(REDIS_COMMAND_SECONDS.into()), REDIS_BUCKETS)
            .expect("Redis buckets are not empty")
            .set_buckets_for_metric(Matcher::Full(HOOK_SECONDS.into()), LATENCY_BUCKETS)
            .expect("latency buckets are not empty")
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
        // One handle per value of a label enum, in the enum's order.
        fn each<L: VariantArray + Into<&'static str> + Copy, T, const N: usize>(make: impl Fn(&'static str) -> T) -> [T; N] {
            std::array::from_fn(|i| make(L::VARIANTS[i].into()))
        }
        // What each metric means, for the exposition's HELP lines.
        const COUNTERS: [(&str, Option<Unit>, &str); 31] = [
            (PUSHER_EVENTS, Some(Unit::Count), "Events published on a Pusher app's channels, by app and source (api: one per channel; client: client- events)."),
            (HOOK_REQUESTS, Some(Unit::Count), "Questions to the connect and subscribe hooks, by hook and outcome (over_capacity and breaker_open were not asked)."),
            (WEBHOOK_EVENTS, Some(Unit::Count), "Webhook events, by outcome: sent, or dropped and why."),
            (WEBHOOK_BATCHES, Some(Unit::Count), "Webhook POSTs, by result: delivered (2xx) or failed (to be retried or given up)."),
            (CONNECTIONS_OPENED, Some(Unit::Count), "Connections that completed their handshake."),
            (CONNECTIONS_CLOSED, Some(Unit::Count), "Connections closed, by reason."),
            (CONNECTIONS_REFUSED, Some(Unit::Count), "Connection attempts turned away, by reason."),
            (ACCEPT_ERRORS, Some(Unit::Count), "accept() failures; file_limit means EMFILE/ENFILE."),
            (MESSAGES_PUBLISHED, Some(Unit::Count), "Messages accepted by the publish API, by kind."),
            (MESSAGES_DELIVERED, Some(Unit::Count), "Messages written to a client socket."),
            (MESSAGES_DROPPED, Some(Unit::Count), "Messages that did not reach a connection, by reason."),
            (CLIENT_ERRORS, Some(Unit::Count), "Client frames the server could not use, by reason."),
            (API_REQUESTS, Some(Unit::Count), "Publish API requests, by route and status."),
            (API_BATCH_ITEMS, Some(Unit::Count), "Items of /v1/batch requests, by the status each would have had alone."),
            (REDIS_ERRORS, Some(Unit::Count), "Redis commands that failed, by command."),
            (REDIS_RECONNECTS, Some(Unit::Count), "Times the Redis connection was lost (and reconnected)."),
            (REDIS_MASTER_CHANGES, Some(Unit::Count), "Times the Sentinels named a new Redis master and the link moved to it."),
            (PRESENCE_EVENTS, Some(Unit::Count), "Presence frames sent to a topic's subscribers (one per topic per batch), by kind."),
            (RELAY_LOST, Some(Unit::Count), "Times this node told its clients of a relay_lost gap: it stopped hearing its Redis channels, heard them again, or dropped messages on the way in."),
            (RELAY_MESSAGES, Some(Unit::Count), "Messages sent to or received from other nodes, by direction and kind."),
            (MESSAGES_DEDUPLICATED, Some(Unit::Count), "Queued messages not written because a resume had replayed them already."),
            (HISTORY_EVICTED, Some(Unit::Count), "Streams whose history was forgotten early, by reason (their next message starts a new epoch)."),
            (RESUMES, Some(Unit::Count), "Clients that came back with a cursor, by outcome."),
            (RESUME_REPLAYED, Some(Unit::Count), "Messages replayed from history to resuming clients."),
            (IDEMPOTENT_REPLAYS, Some(Unit::Count), "Publishes answered from an earlier request with the same Idempotency-Key, publishing nothing."),
            (TLS_HANDSHAKES, Some(Unit::Count), "TLS handshakes completed on the client listener, full or resumed."),
            (ALLOC_SITE_ALLOCATIONS, Some(Unit::Count), "Allocations each site has made since start."),
            (PROFILER_SAMPLES, Some(Unit::Count), "CPU samples the always-on profiler took."),
            (PROFILER_DROPPED, Some(Unit::Count), "CPU samples not kept as taken, by reason (ring_full, thread_ended; stack_table_full samples are kept under one stack)."),
            (NOT_REPLICATED, Some(Unit::Count), "Publishes answered 503 because their write did not reach --history-min-replicas Redis replicas in time."),
            (HISTORY_EPOCH_RESETS, Some(Unit::Count), "Times a group of streams was given new epochs because Redis held less history than this node had seen, by reason."),
        ];
        const GAUGES: [(&str, Option<Unit>, &str); 27] = [
            (PUSHER_CONNECTIONS, Some(Unit::Count), "Open Pusher protocol connections, by app."),
            (HOOK_BREAKER_OPEN, Some(Unit::Count), "1 while a hook's circuit breaker is open (its application kept failing), by hook."),
            (WEBHOOK_QUEUED_BYTES, Some(Unit::Bytes), "Bytes of webhook events waiting to be sent, held against --webhook-queue-bytes."),
            (PROCESS_RESIDENT, Some(Unit::Bytes), "Resident memory of this process."),
            (OPEN_FDS, Some(Unit::Count), "File descriptors this process has open."),
            (MAX_FDS, Some(Unit::Count), "This process's open-file limit."),
            (TCP_KERNEL, Some(Unit::Bytes), "Kernel memory in TCP sockets, machine-wide (/proc/net/sockstat)."),
            (PUBLISH_BYTES_READING, Some(Unit::Bytes), "Bytes of publish bodies being read (their Content-Length), held against --max-publish-bytes-in-flight."),
            (CONNECTIONS, Some(Unit::Count), "Open client connections, by transport."),
            (OUTBOUND_QUEUED_BYTES, Some(Unit::Bytes), "Bytes waiting in outbound queues, replays not yet written included."),
            (JEMALLOC_BYTES, Some(Unit::Bytes), "jemalloc statistics: allocated, active, resident, mapped, retained, metadata."),
            (JEMALLOC_FRAGMENTATION, None, "jemalloc active / allocated; 1.0 is no space lost inside pages."),
            (ALLOC_SITE_LIVE_BYTES, Some(Unit::Bytes), "Bytes allocated by each site and not yet freed."),
            (ALLOC_SITE_LIVE_ALLOCATIONS, Some(Unit::Count), "Allocations made by each site and not yet freed."),
            (OUTBOUND_QUEUED_MESSAGES, Some(Unit::Count), "Messages waiting in outbound queues, replays not yet written included."),
            (TOKIO_WORKERS, Some(Unit::Count), "Worker threads of the serving runtime."),
            (TOKIO_ALIVE_TASKS, Some(Unit::Count), "Tasks alive in the serving runtime."),
            (TOKIO_GLOBAL_QUEUE_DEPTH, Some(Unit::Count), "Tasks waiting in the serving runtime's global queue."),
            (REDIS_UP, Some(Unit::Count), "1 while the last Redis command succeeded, 0 after one failed."),
            (REGISTRY_SESSIONS, Some(Unit::Count), "This node's sessions registered in Redis."),
            (PRESENCE_MEMBERS, Some(Unit::Count), "Members of presence topics, summed over topics (a uid in two topics counts twice)."),
            (REGISTRY_PENDING, Some(Unit::Count), "Session changes waiting to be written to Redis."),
            (HISTORY_MESSAGES, Some(Unit::Count), "Messages of history kept in this process (memory registry)."),
            (HISTORY_BYTES, Some(Unit::Bytes), "Bytes of history kept in this process, held against --history-max-bytes."),
            (HISTORY_STREAMS, Some(Unit::Count), "Streams with history kept in this process."),
            (PROFILER_FRAMES, Some(Unit::Count), "Frames in the profiler's stack table, against its cap (label `of`)."),
            (TLS_CERT_EXPIRY, Some(Unit::Seconds), "Seconds until the client listener's TLS certificate expires (0 without TLS)."),
        ];
        const HISTOGRAMS: [(&str, Option<Unit>, &str); 2] = [
            (HOOK_SECONDS, Some(Unit::Seconds), "Time the application took to answer a hook question, by hook."),
            (REDIS_COMMAND_SECONDS, Some(Unit::Seconds), "Redis command round trips, by command."),
        ];
        let help = |name: &'static str, text: &'static str| (KeyName::from_const_str(name), SharedString::const_str(text));
        for (name, unit, text) in COUNTERS {
            let (name, text) = help(name, text);
            recorder.describe_counter(name, unit, text);
        }
        for (name, unit, text) in GAUGES {
            let (name, text) = help(name, text);
            recorder.describe_gauge(name, unit, text);
        }
        for (name, unit, text) in HISTOGRAMS {
            let (name, text) = help(name, text);
            recorder.describe_histogram(name, unit, text);
        }
        Metrics {
            connections: each::<Transport, _, _>(|t| gauge(CONNECTIONS, &[("transport", t)])),
            opened: each::<Transport, _, _>(|t| counter(CONNECTIONS_OPENED, &[("transport", t)])),
            closed: each::<Transport, _, _>(|t| {
                each::<CloseReason, _, _>(|r| counter(CONNECTIONS_CLOSED, &[("transport", t), ("reason", r)]))
            }),
            refused: each::<RefuseReason, _, _>(|r| counter(CONNECTIONS_REFUSED, &[("reason", r)])),
            accept_errors: each::<AcceptError, _, _>(|k| counter(ACCEPT_ERRORS, &[("kind", k)])),
            published: each::<PublishKind, _, _>(|k| counter(MESSAGES_PUBLISHED, &[("kind", k)])),
            delivered: counter(MESSAGES_DELIVERED, &[]),
            dropped: each::<DropReason, _, _>(|r| counter(MESSAGES_DROPPED, &[("reason", r)])),
            client_errors: each::<ClientError, _, _>(|r| counter(CLIENT_ERRORS, &[("reason", r)])),
            api_batch_items: each::<ApiStatus, _, _>(|status| counter(API_BATCH_ITEMS, &[("status", status)])),
            api_requests: each::<ApiRoute, _, _>(|route| {
                each::<ApiStatus, _, _>(|status| counter(API_REQUESTS, &[("route", route), ("status", status)]))
            }),
            delivery_latency: LatencyHistogram::new(LATENCY_BUCKETS),
            queued_bytes: gauge(OUTBOUND_QUEUED_BYTES, &[]),
            queued_messages: gauge(OUTBOUND_QUEUED_MESSAGES, &[]),
            jemalloc: ["allocated", "active", "resident", "mapped", "retained", "metadata"]
                .map(|stat| gauge(JEMALLOC_BYTES, &[("stat", stat)])),
            jemalloc_fragmentation: gauge(JEMALLOC_FRAGMENTATION, &[]),
            sites: Site::ALL.map(|site| [ALLOC_SITE_LIVE_BYTES, ALLOC_SITE_LIVE_ALLOCATIONS].map(|name| gauge(name, &[("site", site.name())]))),
            site_allocations: Site::ALL.map(|site| counter(ALLOC_SITE_ALLOCATIONS, &[("site", site.name())])),
            tokio: [TOKIO_WORKERS, TOKIO_ALIVE_TASKS, TOKIO_GLOBAL_QUEUE_DEPTH].map(|name| gauge(name, &[])),
            process: [PROCESS_RESIDENT, OPEN_FDS, MAX_FDS, TCP_KERNEL].map(|name| gauge(name, &[])),
            redis_latency: each::<RedisCommand, _, _>(|c| {
                let key = Key::from_parts(REDIS_COMMAND_SECONDS, vec![Label::from_static_parts("command", c)]);
                recorder.register_histogram(&key, &META)
            }),
            redis_errors: each::<RedisCommand, _, _>(|c| counter(REDIS_ERRORS, &[("command", c)])),
            redis_reconnects: counter(REDIS_RECONNECTS, &[]),
            redis_master_changes: counter(REDIS_MASTER_CHANGES, &[]),
            relay_lost: counter(RELAY_LOST, &[]),
            presence_members: gauge(PRESENCE_MEMBERS, &[]),
            presence_events: each::<PresenceEvent, _, _>(|k| counter(PRESENCE_EVENTS, &[("kind", k)])),
            hook_requests: each::<HookKind, _, _>(|hook| each::<HookOutcome, _, _>(|o| counter(HOOK_REQUESTS, &[("hook", hook), ("outcome", o)]))),
            hook_seconds: each::<HookKind, _, _>(|hook| {
                let key = Key::from_parts(HOOK_SECONDS, vec![Label::from_static_parts("hook", hook)]);
                recorder.register_histogram(&key, &META)
            }),
            hook_breaker_open: each::<HookKind, _, _>(|hook| gauge(HOOK_BREAKER_OPEN, &[("hook", hook)])),
            webhook_events: each::<WebhookOutcome, _, _>(|o| counter(WEBHOOK_EVENTS, &[("outcome", o)])),
            webhook_batches: ["delivered", "failed"].map(|result| counter(WEBHOOK_BATCHES, &[("result", result)])),
            webhook_queued_bytes: gauge(WEBHOOK_QUEUED_BYTES, &[]),
            redis_up: gauge(REDIS_UP, &[]),
            registry_sessions: gauge(REGISTRY_SESSIONS, &[]),
            publish_bytes_reading: gauge(PUBLISH_BYTES_READING, &[]),
            registry_pending: gauge(REGISTRY_PENDING, &[]),
            relayed: each::<Relayed, _, _>(|direction| {
                each::<PublishKind, _, _>(|k| counter(RELAY_MESSAGES, &[("direction", direction), ("kind", k)]))
            }),
            deduplicated: counter(MESSAGES_DEDUPLICATED, &[]),
            history: [HISTORY_MESSAGES, HISTORY_BYTES, HISTORY_STREAMS].map(|name| gauge(name, &[])),
            history_evicted: each::<Eviction, _, _>(|r| counter(HISTORY_EVICTED, &[("reason", r)])),
            epoch_resets: each::<EpochReset, _, _>(|r| counter(HISTORY_EPOCH_RESETS, &[("reason", r)])),
            not_replicated: counter(NOT_REPLICATED, &[]),
            profiler_samples: counter(PROFILER_SAMPLES, &[]),
            profiler_dropped: ["ring_full", "thread_ended", "stack_table_full"].map(|r| counter(PROFILER_DROPPED, &[("reason", r)])),
            profiler_frames: ["held", "cap"].map(|of| gauge(PROFILER_FRAMES, &[("of", of)])),
            resumes: each::<ResumeOutcome, _, _>(|o| counter(RESUMES, &[("outcome", o)])),
            resume_replayed: counter(RESUME_REPLAYED, &[]),
            idempotent_replays: counter(IDEMPOTENT_REPLAYS, &[]),
            tls_handshakes: each::<TlsHandshake, _, _>(|k| counter(TLS_HANDSHAKES, &[("kind", k)])),
            tls_cert_expiry: gauge(TLS_CERT_EXPIRY, &[]),
            tls_not_after: std::sync::atomic::AtomicU64::new(0),
            drop_log: std::array::from_fn(|_| Throttle::new(LOG_EVERY)),
            refusal_log: std::array::from_fn(|_| Throttle::new(LOG_EVERY)),
            redis_log: std::array::from_fn(|_| Throttle::new(LOG_EVERY)),
            queued_bytes_now: AtomicUsize::new(0),
            queued_messages_now: AtomicUsize::new(0),
            pusher_apps: pusher_apps
                .iter()
                .map(|app| {
                    let label = |extra: Option<(&'static str, &'static str)>| {
                        let mut labels = vec![Label::new("app", app.to_string())];
                        labels.extend(extra.map(|(k, v)| Label::from_static_parts(k, v)));
                        labels
                    };
                    PusherAppMetrics {
                        connections: recorder.register_gauge(&Key::from_parts(PUSHER_CONNECTIONS, label(None)), &META),
                        open: AtomicUsize::new(0),
                        events: each::<PusherSource, _, _>(|source| recorder.register_counter(&Key::from_parts(PUSHER_EVENTS, label(Some(("source", source)))), &META)),
                    }
                })
                .collect(),
            handle,
        }
    }

    /// A connection opened; `app` is its Pusher app's index (Pusher connections).
    pub fn connection_opened(&self, t: Transport, app: u16) {
        self.opened[t as usize].increment(1);
        self.connections[t as usize].increment(1.0);
        if let (Transport::Pusher, Some(app)) = (t, self.pusher_apps.get(app as usize)) {
            app.connections.increment(1.0);
            app.open.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn connection_closed(&self, t: Transport, app: u16, reason: CloseReason) {
        self.closed[t as usize][reason as usize].increment(1);
        self.connections[t as usize].decrement(1.0);
        if let (Transport::Pusher, Some(app)) = (t, self.pusher_apps.get(app as usize)) {
            app.connections.decrement(1.0);
            app.open.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Open connections of Pusher app `app` (its index).
    pub fn pusher_connections(&self, app: u16) -> usize {
        self.pusher_apps.get(app as usize).map_or(0, |app| app.open.load(Ordering::Relaxed))
    }

    /// Events published on the channels of Pusher app `app` (its index).
    pub fn pusher_events(&self, app: u16, source: PusherSource, events: usize) {
        if let Some(app) = self.pusher_apps.get(app as usize) {
            app.events[source as usize].increment(events as u64);
        }
    }

    pub fn refused(&self, reason: RefuseReason) {
        self.refused[reason as usize].increment(1);
        if let Some(held_back) = self.refusal_log[reason as usize].allow() {
            tracing::info!(reason = <&str>::from(reason), held_back, "connection refused");
        }
    }

    pub fn accept_error(&self, kind: AcceptError) {
        self.accept_errors[kind as usize].increment(1);
    }

    /// A hook question ended with `outcome`, after `seconds` when it was asked.
    pub fn hook(&self, kind: HookKind, outcome: HookOutcome, seconds: Option<f64>) {
        self.hook_requests[kind as usize][outcome as usize].increment(1);
        if let Some(seconds) = seconds {
            self.hook_seconds[kind as usize].record(seconds);
        }
    }

    pub fn hook_breaker(&self, kind: HookKind, open: bool) {
        self.hook_breaker_open[kind as usize].set(if open { 1.0 } else { 0.0 });
    }

    pub fn webhook_events(&self, outcome: WebhookOutcome, events: usize) {
        self.webhook_events[outcome as usize].increment(events as u64);
    }

    /// A webhook POST was answered 2xx (`delivered`), or was not.
    pub fn webhook_batch(&self, delivered: bool) {
        self.webhook_batches[usize::from(!delivered)].increment(1);
    }

    pub fn presence_event(&self, kind: PresenceEvent) {
        self.presence_events[kind as usize].increment(1);
    }

    pub fn published(&self, kind: PublishKind) {
        self.published[kind as usize].increment(1);
    }

    /// The node's queued bytes when they are over `budget` (`--node-queue-max-bytes`): the
    /// publish asking is refused, and counted dropped (`node_over_budget`) here.
    pub fn over_queue_budget(&self, budget: usize) -> Option<usize> {
        let queued = self.queued_bytes_now.load(Ordering::Relaxed);
        (queued > budget).then(|| {
            self.dropped(DropReason::NodeOverBudget, 1);
            queued
        })
    }

    pub fn dropped(&self, reason: DropReason, count: usize) {
        if count > 0 {
            probes::msg_drop(reason as u8, count);
            self.dropped[reason as usize].increment(count as u64);
            if let Some(held_back) = self.drop_log[reason as usize].allow() {
                tracing::warn!(reason = <&str>::from(reason), count, held_back, "messages dropped");
            }
        }
    }

    pub fn redis_command(&self, command: RedisCommand, seconds: f64, ok: bool) {
        self.redis_latency[command as usize].record(seconds);
        if !ok {
            self.redis_errors[command as usize].increment(1);
            if let Some(held_back) = self.redis_log[command as usize].allow() {
                tracing::warn!(command = <&str>::from(command), held_back, "Redis command failed");
            }
        }
        self.redis_up.set(if ok { 1.0 } else { 0.0 });
    }

    pub fn relayed(&self, direction: Relayed, kind: PublishKind) {
        self.relayed[direction as usize][kind as usize].increment(1);
    }

    /// The profiler's own counters, as of a scrape.
    pub fn record_profiler(&self, report: &pushline_profiler::Report) {
        self.profiler_samples.absolute(report.taken);
        for (counter, value) in self.profiler_dropped.iter().zip([report.dropped_ring_full, report.dropped_thread_ended, report.overflowed]) {
            counter.absolute(value);
        }
        self.profiler_frames[0].set(report.frames as f64);
        self.profiler_frames[1].set(report.max_frames as f64);
    }

    pub fn epoch_reset(&self, reason: EpochReset) {
        self.epoch_resets[reason as usize].increment(1);
    }

    pub fn evicted(&self, reason: Eviction, streams: usize) {
        self.history_evicted[reason as usize].increment(streams as u64);
    }

    pub fn resumed(&self, outcome: ResumeOutcome, replayed: usize) {
        self.resumes[outcome as usize].increment(1);
        self.resume_replayed.increment(replayed as u64);
    }

    pub fn tls_handshake(&self, resumed: bool) {
        self.tls_handshakes[if resumed { TlsHandshake::Resumed } else { TlsHandshake::Full } as usize].increment(1);
    }

    pub fn client_error(&self, e: ClientError) {
        self.client_errors[e as usize].increment(1);
    }

    pub fn queued(&self, messages: isize, bytes: isize) {
        // Wrapping adds of a negative delta as two's complement keep this one atomic op.
        self.queued_messages_now.fetch_add(messages as usize, Ordering::Relaxed);
        self.queued_bytes_now.fetch_add(bytes as usize, Ordering::Relaxed);
    }

    pub fn api_request(&self, route: ApiRoute, status: u16) {
        self.api_requests[route as usize][ApiStatus::of(status) as usize].increment(1);
    }

    /// An item of a `/v1/batch` answered with what `status` its own request would have had.
    pub fn api_batch_item(&self, status: u16) {
        self.api_batch_items[ApiStatus::of(status) as usize].increment(1);
    }

    /// Prometheus text exposition, with the gauges that are read at scrape time brought up
    /// to date; `runtime` is the serving runtime's.
    /// A message written whole to its client, `latency` after it was accepted.
    pub fn record_delivery(&self, latency: std::time::Duration) {
        self.delivered.increment(1);
        self.delivery_latency.record(latency);
    }

    /// The Prometheus text, its gauges read fresh first.
    pub fn render(&self, runtime: crate::cores::RuntimeCounts) -> String {
        self.refresh_gauges(runtime);
        self.exposition()
    }

    /// The Prometheus text as it stands: counters and histograms are always current; gauges
    /// read at scrape time (memory, files, sites) are as the last `render` left them.
    pub fn exposition(&self) -> String {
        let mut text = self.handle.render();
        self.delivery_latency.render(DELIVERY_LATENCY, DELIVERY_LATENCY_HELP, &mut text);
        text
    }

    /// Sets the gauges that are read from the process at scrape time (sites, runtime,
    /// resident memory, open files, kernel TCP memory, jemalloc).
    fn refresh_gauges(&self, runtime: crate::cores::RuntimeCounts) {
        for ((gauges, allocations), stats) in self.sites.iter().zip(&self.site_allocations).zip(pushline_alloc::table::snapshot()) {
            gauges[0].set(stats.live_bytes as f64);
            gauges[1].set(stats.live_allocs as f64);
            allocations.absolute(stats.total_allocs);
        }
        let tokio = [runtime.workers, runtime.alive_tasks, runtime.queued_tasks];
        for (gauge, value) in self.tokio.iter().zip(tokio) {
            gauge.set(value as f64);
        }
        let myself = procfs::process::Process::myself().ok();
        let process = [
            pushline_alloc::process::Resident::myself().rss as f64,
            myself.as_ref().and_then(|p| p.fd_count().ok()).unwrap_or(0) as f64,
            rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(0, |(soft, _)| soft) as f64,
            pushline_alloc::socket::TcpSockstat::read().map_or(0, |s| s.mem_bytes()) as f64,
        ];
        for (gauge, value) in self.process.iter().zip(process) {
            gauge.set(value);
        }
        self.queued_bytes.set(self.queued_bytes_now.load(Ordering::Relaxed) as f64);
        let not_after = self.tls_not_after.load(Ordering::Relaxed);
        if not_after > 0 {
            self.tls_cert_expiry.set(not_after as f64 - (crate::clock::wall_ms() / 1000) as f64);
        }
        self.queued_messages.set(self.queued_messages_now.load(Ordering::Relaxed) as f64);
        if let Ok(stats) = pushline_alloc::jemalloc::JemallocStats::read() {
            let values = [stats.allocated, stats.active, stats.resident, stats.mapped, stats.retained, stats.metadata];
            for (gauge, value) in self.jemalloc.iter().zip(values) {
                gauge.set(value as f64);
            }
            self.jemalloc_fragmentation.set(stats.fragmentation());
        }
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
