//! Every setting Pushline has, with its default, in one place.
//!
//! A setting comes from (highest first) a command-line flag, a `PUSHLINE_*` environment
//! variable, the TOML file named by `--config`, or the default written here.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser, ValueEnum};
use serde::Serialize;

use crate::error::Error;

/// The largest `--max-client-frame-bytes`: client frames are read whole into a per-thread
/// buffer of about this size.
pub const MAX_CLIENT_FRAME_LIMIT: usize = 60 * 1024;

/// The smallest `--max-client-frame-bytes`: a control frame's largest payload.
const MIN_CLIENT_FRAME: usize = 125;

/// Shortest `--jwt-secret` or `--api-key`: 256 bits, HS256's own strength.
const MIN_SECRET_BYTES: usize = 32;

/// Most `--io-threads`: more threads than any machine has cores only adds stacks and
/// runtimes that share the same CPUs.
const MAX_IO_THREADS: usize = 1024;

/// What a connection whose outbound queue is full gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SlowConsumer {
    /// Discard the oldest queued message (counted as `queue_full`) and keep the connection.
    DropOldest,
    /// Close the connection with code 1013 (counted as `slow_consumer`).
    Disconnect,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RegistryKind {
    /// One node, sessions held in this process. No dependencies.
    Memory,
    /// Many nodes on one Redis (`--redis-url`): sessions registered there, cross-node
    /// delivery over pub/sub.
    Redis,
    /// Many nodes on a Redis Cluster (`--redis-url` per seed node): the same, with keys
    /// spread over the shards and sharded pub/sub (Redis 7).
    RedisCluster,
    /// Many nodes on the Redis master that Redis Sentinels name (`--sentinel`), followed
    /// across failovers.
    RedisSentinel,
}

#[derive(Clone, Debug, Parser, Serialize)]
#[command(name = "pushline", version, about = "A push server for millions of long-lived, mostly idle connections")]
#[command(args_override_self = true)]
pub struct Config {
    /// TOML file with settings (keys are the flag names, with `-` or `_`).
    #[arg(long, env = "PUSHLINE_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// Client listener: WebSocket, SSE and the /v1 publish API. Port 0 picks a free port.
    #[arg(long, env = "PUSHLINE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Admin listener: /metrics, /healthz, /readyz. Keep it off the public network.
    #[arg(long, env = "PUSHLINE_ADMIN_LISTEN", default_value = "127.0.0.1:9091")]
    pub admin_listen: SocketAddr,

    /// Where sessions are registered.
    #[arg(long, env = "PUSHLINE_REGISTRY", value_enum, default_value = "memory")]
    pub registry: RegistryKind,

    /// This node's id (0-1023); it is encoded in every session id and message id. Unset:
    /// 0 on the memory registry; on Redis, a free id claimed atomically at start.
    #[arg(long, env = "PUSHLINE_NODE_ID", value_parser = clap::value_parser!(u16).range(0..=1023))]
    pub node_id: Option<u16>,

    /// Redis URL (`redis://[user:password@]host:port[/db]`, `rediss://` for TLS). For
    /// redis-cluster, give each seed node (repeat the flag, or separate with commas); for
    /// redis-sentinel, the master's name as the host (`rediss://user:pass@mymaster/0`).
    #[arg(long = "redis-url", env = "PUSHLINE_REDIS_URL", value_delimiter = ',', hide_env_values = true)]
    #[serde(skip)]
    pub redis_url: Vec<String>,

    /// The Sentinels to ask where the master is, for --registry redis-sentinel
    /// (`redis://[user:password@]host:26379`, repeat or separate with commas).
    #[arg(long = "sentinel", env = "PUSHLINE_SENTINEL", value_delimiter = ',', hide_env_values = true)]
    #[serde(skip)]
    pub sentinel: Vec<String>,

    /// CA certificate (PEM) that `rediss://` servers are checked against, instead of the
    /// system's roots.
    #[arg(long, env = "PUSHLINE_REDIS_CA")]
    pub redis_ca: Option<PathBuf>,

    /// Client certificate (PEM) for `rediss://` servers that ask for one; with --redis-client-key.
    #[arg(long, env = "PUSHLINE_REDIS_CLIENT_CERT", requires = "redis_client_key")]
    pub redis_client_cert: Option<PathBuf>,

    /// Private key (PEM) of --redis-client-cert.
    #[arg(long, env = "PUSHLINE_REDIS_CLIENT_KEY", requires = "redis_client_cert")]
    pub redis_client_key: Option<PathBuf>,

    /// Prefix of every Redis key and channel this cluster of nodes uses.
    #[arg(long, env = "PUSHLINE_REDIS_PREFIX", default_value = "pushline")]
    pub redis_prefix: String,

    /// A node counts as alive this long after its last liveness refresh (refreshed every
    /// third of it); a killed node's sessions count as offline once it passes.
    #[arg(long, env = "PUSHLINE_NODE_TTL", default_value = "10s", value_parser = humantime::parse_duration)]
    #[serde(serialize_with = "as_humantime")]
    pub node_ttl: Duration,

    /// Set SO_REUSEPORT on the client listener so several processes can share the port.
    #[arg(long, env = "PUSHLINE_REUSE_PORT", default_value_t = false, num_args = 0..=1,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    pub reuse_port: bool,

    /// HS256 secret for client JWTs without a `kid`. Without it and without
    /// --jwt-public-key the server runs in open mode (`?uid=`), which is refused unless
    /// every listener is bound to loopback.
    #[arg(long, env = "PUSHLINE_JWT_SECRET", hide_env_values = true)]
    #[serde(skip)]
    pub jwt_secret: Option<String>,

    /// A public key for client JWTs, `KID=FILE` (PEM: RSA -> RS256, EC P-256 -> ES256,
    /// Ed25519 -> EdDSA), chosen by the token's `kid` (repeat, or separate with commas).
    #[arg(long = "jwt-public-key", env = "PUSHLINE_JWT_PUBLIC_KEY", value_delimiter = ',')]
    pub jwt_public_key: Vec<String>,

    /// Topic patterns every authenticated client may subscribe to, besides what its token
    /// grants (`news`, `sport.*`, `user.{sub}.*`).
    #[arg(long = "public-topics", env = "PUSHLINE_PUBLIC_TOPICS", value_delimiter = ',')]
    pub public_topics: Vec<String>,

    /// Topic patterns every client may publish to (`{"type":"publish"}`), besides what its
    /// token's `publish` claim grants; the only way to let clients publish in open mode.
    /// None by default.
    #[arg(long = "client-publish-topics", env = "PUSHLINE_CLIENT_PUBLISH_TOPICS", value_delimiter = ',')]
    pub client_publish_topics: Vec<String>,

    /// Topic patterns that keep presence: who is subscribed, told to subscribers as they
    /// join and leave (same syntax as --public-topics, without `{sub}`). None by default.
    #[arg(long = "presence-topics", env = "PUSHLINE_PRESENCE_TOPICS", value_delimiter = ',')]
    pub presence_topics: Vec<String>,

    /// Largest member info (a token's `info` claim, or `?info=` in open mode), in bytes.
    #[arg(long, env = "PUSHLINE_PRESENCE_INFO_BYTES", default_value_t = 512)]
    pub presence_info_bytes: usize,

    /// How often a presence topic's subscribers are told who joined and left (at most one
    /// frame per topic per batch).
    #[arg(long, env = "PUSHLINE_PRESENCE_BATCH", default_value = "200ms", value_parser = humantime::parse_duration)]
    #[serde(serialize_with = "as_humantime")]
    pub presence_batch: Duration,

    /// Above this many members, a presence topic's subscribers are told only the counts.
    #[arg(long, env = "PUSHLINE_PRESENCE_EVENTS_MAX_MEMBERS", default_value_t = 1000)]
    pub presence_events_max_members: usize,

    /// The application's URL asked before each connection is welcomed (a JSON POST of
    /// the uid, the token's claims, the address, the topics and --hook-forward-headers);
    /// 200 admits, and may set `uid`, `topics`, `info`, `expire_at`; 401/403 refuses.
    #[arg(long, env = "PUSHLINE_CONNECT_HOOK")]
    #[serde(serialize_with = "redacted_url")]
    pub connect_hook: Option<String>,

    /// The application's URL asked for each subscribe to a topic matching
    /// --subscribe-hook-topics (a JSON POST of uid, topic, session); 200 admits, 401/403
    /// refuses. For those topics the application decides, not the token.
    #[arg(long, env = "PUSHLINE_SUBSCRIBE_HOOK", requires = "subscribe_hook_topics")]
    #[serde(serialize_with = "redacted_url")]
    pub subscribe_hook: Option<String>,

    /// Topic patterns whose subscribes --subscribe-hook decides (same syntax as
    /// --presence-topics).
    #[arg(long = "subscribe-hook-topics", env = "PUSHLINE_SUBSCRIBE_HOOK_TOPICS", value_delimiter = ',')]
    pub subscribe_hook_topics: Vec<String>,

    /// Request headers of a connecting client passed to --connect-hook (`cookie`,
    /// `x-forwarded-for`).
    #[arg(long = "hook-forward-headers", env = "PUSHLINE_HOOK_FORWARD_HEADERS", value_delimiter = ',')]
    pub hook_forward_headers: Vec<String>,

    /// Time a hook has to answer; past it the client is refused with 503 and Retry-After.
    #[arg(long, env = "PUSHLINE_HOOK_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    #[serde(serialize_with = "as_humantime")]
    pub hook_timeout: Duration,

    /// Most questions out at once to each hook from this node; past it clients are
    /// refused with 503 and Retry-After, not queued.
    #[arg(long, env = "PUSHLINE_HOOK_MAX_CONCURRENCY", default_value_t = 64)]
    pub hook_max_concurrency: usize,

    /// How long a subscribe hook's answer for a (uid, topic) is reused; 0: always ask.
    #[arg(long, env = "PUSHLINE_HOOK_CACHE_TTL", default_value = "0s", value_parser = humantime::parse_duration)]
    #[serde(serialize_with = "as_humantime")]
    pub hook_cache_ttl: Duration,

    /// Failures in a row (timeouts, errors, statuses other than 200/401/403) that open a
    /// hook's circuit breaker.
    #[arg(long, env = "PUSHLINE_HOOK_BREAKER_FAILURES", default_value_t = 5)]
    pub hook_breaker_failures: u32,

    /// How long an open circuit breaker refuses without asking, before one question is
    /// let through to see whether the application is back.
    #[arg(long, env = "PUSHLINE_HOOK_BREAKER_COOLDOWN", default_value = "5s", value_parser = humantime::parse_duration)]
    #[serde(serialize_with = "as_humantime")]
    pub hook_breaker_cooldown: Duration,

    /// CA certificate (PEM) that https:// hook and webhook URLs are checked against,
    /// instead of the system's roots.
    #[arg(long, env = "PUSHLINE_HOOK_CA")]
    pub hook_ca: Option<PathBuf>,

    /// The application's URL that batches of events are POSTed to (topic_occupied,
    /// topic_vacated, member_joined, member_left, client_publish), signed with
    /// --webhook-secret.
    #[arg(long, env = "PUSHLINE_WEBHOOK_URL", requires = "webhook_secret")]
    #[serde(serialize_with = "redacted_url")]
    pub webhook_url: Option<String>,

    /// Key of each batch's `X-Pushline-Signature` (HMAC-SHA256).
    #[arg(long, env = "PUSHLINE_WEBHOOK_SECRET", hide_env_values = true)]
    #[serde(skip)]
    pub webhook_secret: Option<String>,

    /// Events sent to --webhook-url.
    #[arg(long = "webhook-events", env = "PUSHLINE_WEBHOOK_EVENTS", value_delimiter = ',',
          default_value = "topic_occupied,topic_vacated,member_joined,member_left")]
    pub webhook_events: Vec<EventKind>,

    /// Bytes of events waiting to be sent; past it new events are dropped and counted.
    #[arg(long, env = "PUSHLINE_WEBHOOK_QUEUE_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub webhook_queue_bytes: usize,

    /// Most events in one POST.
    #[arg(long, env = "PUSHLINE_WEBHOOK_BATCH", default_value_t = 100)]
    pub webhook_batch: usize,

    /// Times a batch is tried (backing off from 100ms, doubling, at most 10s apart)
    /// before its events are dropped and counted.
    #[arg(long, env = "PUSHLINE_WEBHOOK_ATTEMPTS", default_value_t = 8)]
    pub webhook_attempts: u32,

    /// Time the application has to answer a webhook POST.
    #[arg(long, env = "PUSHLINE_WEBHOOK_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    #[serde(serialize_with = "as_humantime")]
    pub webhook_timeout: Duration,

    /// A Pusher Channels app, `ID:KEY:SECRET` (repeat): Pusher clients connect at
    /// `/app/KEY`, the Pusher HTTP API is served at `/apps/ID/...`. None: Pusher is off.
    #[arg(long = "pusher-app", env = "PUSHLINE_PUSHER_APP", value_delimiter = ',', hide_env_values = true)]
    #[serde(skip)]
    pub pusher_app: Vec<String>,

    /// The config file's `[[pusher_app]]` tables: apps with options of their own.
    #[arg(skip)]
    #[serde(skip)]
    pub pusher_app_tables: Vec<crate::pusher::AppTable>,

    /// Let Pusher clients send `client-` events on private channels.
    #[arg(long, env = "PUSHLINE_PUSHER_CLIENT_EVENTS", default_value_t = false, num_args = 0..=1,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    pub pusher_client_events: bool,

    /// Where each Pusher app's webhooks are POSTed, in Pusher's format, signed with the
    /// app's key and secret: channel_occupied, channel_vacated, member_added,
    /// member_removed.
    #[arg(long, env = "PUSHLINE_PUSHER_WEBHOOK_URL")]
    #[serde(serialize_with = "redacted_url")]
    pub pusher_webhook_url: Option<String>,

    /// Send Pusher `client_event` webhooks too.
    #[arg(long, env = "PUSHLINE_PUSHER_WEBHOOK_CLIENT_EVENTS", default_value_t = false, num_args = 0..=1,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    pub pusher_webhook_client_events: bool,

    /// Most publishes a client may send per second; more are answered `publish_failed` and
    /// counted (`publish_rate`), not published.
    #[arg(long, env = "PUSHLINE_MAX_CLIENT_PUBLISHES_PER_SECOND", default_value_t = 10)]
    pub max_client_publishes_per_second: u16,

    /// Time a client whose token expired has to send a fresh one (`refresh`) before it is
    /// closed (4001).
    #[arg(long, env = "PUSHLINE_TOKEN_REFRESH_GRACE", default_value = "60s", value_parser = humantime::parse_duration)]
    #[serde(serialize_with = "as_humantime")]
    pub token_refresh_grace: Duration,

    /// Longest a client token may still be valid for when presented (its `exp` at most
    /// this far from now).
    #[arg(long, env = "PUSHLINE_JWT_MAX_LIFETIME", default_value = "24h", value_parser = humantime::parse_duration)]
    #[serde(serialize_with = "as_humantime")]
    pub jwt_max_lifetime: Duration,

    /// Key the /v1 publish API requires (`Authorization: Bearer KEY` or `X-Api-Key: KEY`).
    /// Required unless in open mode.
    #[arg(long, env = "PUSHLINE_API_KEY", hide_env_values = true)]
    #[serde(skip)]
    pub api_key: Option<String>,

    /// TOML file of named publish API keys with scopes (README, "Security").
    #[arg(long, env = "PUSHLINE_API_KEYS")]
    pub api_keys: Option<PathBuf>,

    /// Bearer token every admin route requires; needed to bind --admin-listen off loopback.
    #[arg(long, env = "PUSHLINE_ADMIN_TOKEN", hide_env_values = true)]
    #[serde(skip)]
    pub admin_token: Option<String>,

    /// Origins browsers may open WebSocket/SSE connections from (`https://app.example`);
    /// others are refused with 403. Unset: any.
    #[arg(long = "allowed-origins", env = "PUSHLINE_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// PEM certificate chain: TLS on the client listener (wss://, https://), with --tls-key.
    #[arg(long, env = "PUSHLINE_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert (RSA, ECDSA or Ed25519).
    #[arg(long, env = "PUSHLINE_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// A file of at least 32 random bytes that every process on the port reads, so TLS
    /// sessions resume whichever process a client lands on; unset: a key of this process.
    #[arg(long, env = "PUSHLINE_TLS_TICKET_KEY")]
    pub tls_ticket_key: Option<PathBuf>,

    /// Serve a demo page at /demo on the client listener: connect with the JavaScript
    /// client, watch messages arrive, publish (open mode).
    #[arg(long, env = "PUSHLINE_DEMO")]
    #[serde(default)]
    pub demo: bool,

    /// Most WebSocket + SSE connections held at once; more are refused with 503.
    #[arg(long, env = "PUSHLINE_MAX_CONNECTIONS", default_value_t = 1_000_000)]
    pub max_connections: usize,

    /// Most WebSocket + SSE connections of one uid on this node; more are refused with 429.
    #[arg(long, env = "PUSHLINE_MAX_CONNECTIONS_PER_UID", default_value_t = 16)]
    pub max_connections_per_uid: usize,

    /// New WebSocket/SSE connections taken per second (a token bucket); more are refused
    /// with 503 and a jittered Retry-After. 0: no limit.
    #[arg(long, env = "PUSHLINE_MAX_CONNECT_RATE", default_value_t = 0)]
    pub max_connect_rate: u32,

    /// Most connections from one source address. 0: no limit.
    #[arg(long, env = "PUSHLINE_MAX_CONNECTIONS_PER_IP", default_value_t = 0)]
    pub max_connections_per_ip: u32,

    /// Most connections whose request head is still being read.
    #[arg(long, env = "PUSHLINE_MAX_HANDSHAKES", default_value_t = 10_000)]
    pub max_handshakes: usize,

    /// Most commands a client may send per second; more close it (1008).
    #[arg(long, env = "PUSHLINE_MAX_COMMANDS_PER_SECOND", default_value_t = 20)]
    pub max_commands_per_second: u16,

    /// Most topics a client may subscribe to or unsubscribe from per minute; more close it (1008).
    #[arg(long, env = "PUSHLINE_MAX_TOPIC_CHANGES_PER_MINUTE", default_value_t = 600)]
    pub max_topic_changes_per_minute: u16,

    /// Most publish API connections open at once (they do not count against
    /// --max-connections); more are answered 503 and closed.
    #[arg(long, env = "PUSHLINE_MAX_API_CONNECTIONS", default_value_t = 1024)]
    pub max_api_connections: usize,

    /// Close a WebSocket connection that sent nothing for this long (2 x the talk's 270 s heartbeat).
    #[arg(long, env = "PUSHLINE_IDLE_TIMEOUT", default_value = "540s", value_parser = humantime::parse_duration)]
    #[serde(serialize_with = "as_humantime")]
    pub idle_timeout: Duration,

    /// Send a WebSocket ping to every connection this often; 0s turns server pings off.
    #[arg(long, env = "PUSHLINE_PING_INTERVAL", default_value = "0s", value_parser = humantime::parse_duration)]
    #[serde(serialize_with = "as_humantime")]
    pub ping_interval: Duration,

    /// Write an SSE comment line this often so proxies keep the stream open; 0s turns it off.
    #[arg(long, env = "PUSHLINE_SSE_KEEPALIVE", default_value = "30s", value_parser = humantime::parse_duration)]
    #[serde(serialize_with = "as_humantime")]
    pub sse_keepalive: Duration,

    /// Most messages waiting in one connection's outbound queue.
    #[arg(long, env = "PUSHLINE_QUEUE_MAX_MESSAGES", default_value_t = 64)]
    pub queue_max_messages: usize,

    /// Most bytes waiting in one connection's outbound queue.
    #[arg(long, env = "PUSHLINE_QUEUE_MAX_BYTES", default_value_t = 256 * 1024)]
    pub queue_max_bytes: usize,

    /// What happens when a connection's outbound queue is full.
    #[arg(long, env = "PUSHLINE_SLOW_CONSUMER", value_enum, default_value = "drop-oldest")]
    pub slow_consumer: SlowConsumer,

    /// Close a connection (1013, counted as slow_consumer) whose outbound queue has stayed
    /// full, unread, this long, whatever --slow-consumer says: a client that never reads
    /// must not hold the node's queue budget.
    #[arg(long, env = "PUSHLINE_SLOW_CONSUMER_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    #[serde(serialize_with = "as_humantime")]
    pub slow_consumer_timeout: Duration,

    /// Largest `data` a publish may carry (bytes of JSON); larger is a 413.
    #[arg(long, env = "PUSHLINE_MAX_MESSAGE_BYTES", default_value_t = 64 * 1024)]
    pub max_message_bytes: usize,

    /// Bytes queued across all connections above which publishes get 503 + Retry-After.
    #[arg(long, env = "PUSHLINE_NODE_QUEUE_MAX_BYTES", default_value_t = 1 << 30)]
    pub node_queue_max_bytes: usize,

    /// Messages kept per stream (a uid's, a topic's, the broadcast stream) for clients that
    /// come back with a cursor; 0 keeps none (history off).
    #[arg(long, env = "PUSHLINE_HISTORY_SIZE", default_value_t = 100)]
    pub history_size: usize,

    /// How long a message is kept; a topic nobody listens to keeps nothing after it.
    #[arg(long, env = "PUSHLINE_HISTORY_TTL", default_value = "10m", value_parser = humantime::parse_duration)]
    #[serde(serialize_with = "as_humantime")]
    pub history_ttl: Duration,

    /// Bytes of history this node keeps in memory (memory registry); past it, the least
    /// recently written streams are forgotten. On Redis, history lives in Redis.
    #[arg(long, env = "PUSHLINE_HISTORY_MAX_BYTES", default_value_t = 64 << 20)]
    pub history_max_bytes: usize,

    /// Of --history-max-bytes, the most the streams last written by one API key may hold
    /// (memory registry); past it, that key's own least recently written streams go. 0: one
    /// pool for every key.
    #[arg(long, env = "PUSHLINE_HISTORY_MAX_BYTES_PER_KEY", default_value_t = 0)]
    pub history_max_bytes_per_key: usize,

    /// Redis replicas a publish's write must reach (Redis `WAIT`) before it is answered
    /// 200; one that does not within --history-replica-timeout is answered 503
    /// (`not_replicated`). 0: answered once the master has it.
    #[arg(long, env = "PUSHLINE_HISTORY_MIN_REPLICAS", default_value_t = 0)]
    pub history_min_replicas: usize,

    /// How long a publish waits for --history-min-replicas.
    #[arg(long, env = "PUSHLINE_HISTORY_REPLICA_TIMEOUT", default_value = "1s", value_parser = humantime::parse_duration)]
    #[serde(serialize_with = "as_humantime")]
    pub history_replica_timeout: Duration,

    /// Topic patterns whose messages are never kept (`typing.*`).
    #[arg(long = "history-off", env = "PUSHLINE_HISTORY_OFF", value_delimiter = ',')]
    pub history_off: Vec<String>,

    /// How long a publish's Idempotency-Key is remembered: a retry within it gets the
    /// first reply and publishes nothing.
    #[arg(long, env = "PUSHLINE_IDEMPOTENCY_WINDOW", default_value = "10m", value_parser = humantime::parse_duration)]
    #[serde(serialize_with = "as_humantime")]
    pub idempotency_window: Duration,

    /// Samples per second of each thread's CPU time, always on, kept for --profile-window;
    /// 0 turns it off (`?seconds=N` profiles still work).
    #[arg(long, env = "PUSHLINE_PROFILE_HZ", default_value_t = 19, value_parser = clap::value_parser!(u32).range(0..=1000))]
    pub profile_hz: u32,

    /// How much of the past the always-on profiler keeps, per minute.
    #[arg(long, env = "PUSHLINE_PROFILE_WINDOW", default_value = "60m", value_parser = humantime::parse_duration)]
    #[serde(serialize_with = "as_humantime")]
    pub profile_window: Duration,

    /// Idempotency keys remembered per API key (one node, memory registry); past it that
    /// API key's own oldest are forgotten first. About 500 bytes each.
    #[arg(long, env = "PUSHLINE_IDEMPOTENCY_MAX_KEYS", default_value_t = 100_000)]
    pub idempotency_max_keys: usize,

    /// Bytes of publish request bodies this node reads at once (a body counts its
    /// Content-Length, or, chunked, what has arrived of it); past it, publishes get 503.
    #[arg(long, env = "PUSHLINE_MAX_PUBLISH_BYTES_IN_FLIGHT", default_value_t = 64 << 20)]
    pub max_publish_bytes_in_flight: usize,

    /// Most items in one `POST /v1/batch`.
    #[arg(long, env = "PUSHLINE_MAX_BATCH", default_value_t = 1000)]
    pub max_batch: usize,

    /// Most uids one request pushes to: a `/v1/push`'s, or all of a batch's push items'
    /// (each uid's message is a stream append and a write of its own).
    #[arg(long, env = "PUSHLINE_MAX_PUSH_UIDS", default_value_t = 10_000)]
    pub max_push_uids: usize,

    /// Largest `POST /v1/batch` body, in bytes (each item's `data` is also held to
    /// --max-message-bytes); a larger value is capped at --max-publish-bytes-in-flight.
    #[arg(long, env = "PUSHLINE_MAX_BATCH_BYTES", default_value_t = 16 << 20)]
    pub max_batch_bytes: usize,

    /// Largest frame a client may send (its frames are pings and subscriptions).
    #[arg(long, env = "PUSHLINE_MAX_CLIENT_FRAME_BYTES", default_value_t = 16 * 1024)]
    pub max_client_frame_bytes: usize,

    /// Most topics one connection may subscribe to.
    #[arg(long, env = "PUSHLINE_MAX_TOPICS_PER_CONNECTION", default_value_t = 64)]
    pub max_topics_per_connection: usize,

    /// Threads serving client connections, each a runtime of its own that a connection
    /// stays on for its life; 0: one per core.
    #[arg(long, env = "PUSHLINE_IO_THREADS", default_value_t = 0)]
    pub io_threads: usize,

    /// Connections a fan-out enqueues to before yielding, so accepts and pings keep running.
    #[arg(long, env = "PUSHLINE_FANOUT_BATCH", default_value_t = 512)]
    pub fanout_batch: usize,

    /// Time a new connection has to send its HTTP request head; on the publish API, also
    /// each later request's head and body, and an idle keep-alive connection its next request.
    #[arg(long, env = "PUSHLINE_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    #[serde(serialize_with = "as_humantime")]
    pub handshake_timeout: Duration,

    /// On SIGTERM/SIGINT, time given to in-flight publishes and to clients to take their
    /// close frame before the process exits anyway.
    #[arg(long, env = "PUSHLINE_SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    #[serde(serialize_with = "as_humantime")]
    pub shutdown_grace: Duration,

    /// Serve tokio-console's gRPC on this address (e.g. 127.0.0.1:6669); off when unset.
    #[cfg(feature = "console")]
    #[arg(long, env = "PUSHLINE_CONSOLE_LISTEN")]
    pub console_listen: Option<SocketAddr>,

    /// Charge every allocation to a named site (`/debug/memory`, `memory-audit`). Off
    /// saves its small CPU cost (README, "Allocation sites") and blinds those views.
    #[arg(long, env = "PUSHLINE_ALLOC_TRACKING", default_value_t = true, num_args = 0..=1,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    pub alloc_tracking: bool,

    /// Log lines as text, or as JSON objects (timestamp, level, target, node, fields).
    #[arg(long, env = "PUSHLINE_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: crate::telemetry::logging::LogFormat,

    /// Check the settings (flags, environment, file) as a start would, list every
    /// problem, and exit: 0 if they can work, 2 if not. Binds nothing.
    #[arg(long, default_value_t = false)]
    #[serde(skip)]
    pub check_config: bool,

    /// Log filter (tracing-subscriber `EnvFilter` syntax, e.g. `info,pushline=debug`).
    #[arg(long, env = "PUSHLINE_LOG", default_value = "info")]
    pub log: String,
}

/// A webhook event the application may be told of (`--webhook-events`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[clap(rename_all = "snake_case")]
pub enum EventKind {
    TopicOccupied,
    TopicVacated,
    MemberJoined,
    MemberLeft,
    ClientPublish,
}

impl EventKind {
    pub const ALL: [EventKind; 5] = [EventKind::TopicOccupied, EventKind::TopicVacated, EventKind::MemberJoined, EventKind::MemberLeft, EventKind::ClientPublish];
}

/// An application URL as the log shows it: credentials and query hidden, since either may
/// hold a secret.
fn redacted_url<S: serde::Serializer>(url: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    let Some(url) = url else { return s.serialize_none() };
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let (rest, query) = match rest.split_once('?') {
        Some((rest, _)) => (rest, "?***"),
        None => (rest, ""),
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let host = authority.rsplit_once('@').map_or_else(|| authority.to_owned(), |(_, host)| format!("***@{host}"));
    s.serialize_str(&format!("{scheme}://{host}{path}{query}"))
}

fn as_humantime<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

impl Config {
    /// Reads flags, environment and the `--config` file, in that order of precedence.
    pub fn load() -> Result<Config, Error> {
        Self::load_from(std::env::args_os().map(|a| a.to_string_lossy().into_owned()).collect())
    }

    pub fn load_from(args: Vec<String>) -> Result<Config, Error> {
        let first = Config::try_parse_from(&args).map_err(|e| Error::config(e.render().to_string()))?;
        let Some(path) = first.config.clone() else {
            return Ok(first);
        };
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Error::config(format!("cannot read config file {}: {e}", path.display())))?;
        Config::with_file(&text, &path.display().to_string(), args)
    }

    /// The settings of a TOML file's `text` (called `origin` in messages) under the
    /// command line `args`, which win over it.
    pub fn with_file(text: &str, origin: &str, args: Vec<String>) -> Result<Config, Error> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| Error::config(format!("config file {origin}: {e}")))?;
        // `[[pusher_app]]` tables carry options no flag spells: read as they are.
        let pusher_app_tables: Vec<crate::pusher::AppTable> = match table.remove("pusher_app") {
            Some(toml::Value::Array(items)) if items.iter().all(toml::Value::is_table) => {
                toml::Value::Array(items).try_into().map_err(|e| Error::config(format!("config file {origin}: [[pusher_app]]: {e}")))?
            }
            Some(other) => {
                table.insert("pusher_app".into(), other);
                Vec::new()
            }
            None => Vec::new(),
        };
        // TOML values become flags placed before the user's own, so a later flag overrides
        // them (args_override_self); a key whose environment variable is set is skipped so
        // the environment wins over the file.
        let command = Config::command();
        let mut from_file = Vec::new();
        for (key, value) in &table {
            let flag = key.replace('_', "-");
            let Some(arg) = command.get_arguments().find(|a| a.get_long() == Some(flag.as_str())) else {
                return Err(Error::config(format!("config file {origin}: unknown setting `{key}`")));
            };
            if flag == "config" {
                return Err(Error::config(format!("config file {origin}: `config` cannot name another file")));
            }
            if let Some(env) = arg.get_env() {
                if std::env::var_os(env).is_some() {
                    continue;
                }
            }
            let text = match value {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Array(items) if items.iter().all(toml::Value::is_str) => {
                    items.iter().filter_map(toml::Value::as_str).collect::<Vec<_>>().join(",")
                }
                other => return Err(Error::config(format!("config file {origin}: `{key}` takes one value, not {other}"))),
            };
            from_file.push(format!("--{flag}={text}"));
        }
        let mut merged = Vec::with_capacity(args.len() + from_file.len());
        merged.extend(args.first().cloned());
        merged.extend(from_file);
        merged.extend(args.into_iter().skip(1));
        let matches = Config::command().try_get_matches_from(merged).map_err(|e| Error::config(e.render().to_string()))?;
        let config = Config::from_arg_matches(&matches).map_err(|e| Error::config(e.render().to_string()))?;
        Ok(Config { pusher_app_tables, ..config })
    }

    /// The Pusher apps, from `--pusher-app` and the file's `[[pusher_app]]` tables.
    pub fn pusher_apps(&self) -> Result<crate::pusher::Apps, String> {
        crate::pusher::Apps::parse(&self.pusher_app, &self.pusher_app_tables, self.pusher_client_events)
    }

    /// Checks settings against each other; the message says what to change.
    pub fn validate(&self) -> Result<(), Error> {
        match self.problems().as_slice() {
            [] => Ok(()),
            problems => Err(Error::config(problems.join("\n"))),
        }
    }

    /// Every setting that cannot work, each with what to change.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for (name, secret) in [("--jwt-secret", &self.jwt_secret), ("--api-key", &self.api_key), ("--admin-token", &self.admin_token), ("--webhook-secret", &self.webhook_secret)] {
            match secret.as_deref().map(str::len) {
                Some(0) => problems.push(format!("{name} is empty (an unset variable in the environment or file?); set a random value of at least {MIN_SECRET_BYTES} bytes, e.g. `openssl rand -base64 32`")),
                Some(n) if n < MIN_SECRET_BYTES => {
                    problems.push(format!("{name} is {n} bytes; use at least {MIN_SECRET_BYTES} random bytes, e.g. `openssl rand -base64 32`"))
                }
                _ => {}
            }
        }
        if self.admin_token.is_none() && !self.admin_listen.ip().is_loopback() {
            problems.push(format!(
                "--admin-listen {} is not loopback, and without --admin-token the admin endpoints (profiles, sessions) take no credentials; set --admin-token or bind to 127.0.0.1",
                self.admin_listen
            ));
        }
        if let Err(e) = crate::rights::Rights::parse(&self.public_topics, "") {
            problems.push(format!("--public-topics: {e}"));
        }
        if let Err(e) = crate::rights::Rights::parse(&self.client_publish_topics, "") {
            problems.push(format!("--client-publish-topics: {e}"));
        }
        if self.presence_topics.iter().any(|p| p.contains("{sub}")) {
            problems.push("--presence-topics: patterns name topics shared by many uids; `{sub}` has no place in them".into());
        } else if let Err(e) = crate::rights::Rights::parse(&self.presence_topics, "") {
            problems.push(format!("--presence-topics: {e}"));
        }
        if self.presence_batch < Duration::from_millis(10) {
            problems.push("--presence-batch must be at least 10ms".into());
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => problems.push("--tls-cert needs --tls-key, the certificate's private key".into()),
            (None, Some(_)) => problems.push("--tls-key needs --tls-cert, the certificate chain it signs for".into()),
            (None, None) if self.tls_ticket_key.is_some() => problems.push("--tls-ticket-key is for TLS: set --tls-cert and --tls-key".into()),
            _ => {}
        }
        let cursor = crate::wire::cursor::longest(self.max_topics_per_connection);
        if cursor > crate::wire::cursor::MAX_CURSOR_BYTES {
            let fits = crate::wire::cursor::most_topics();
            problems.push(format!(
                "--max-topics-per-connection {}: a connection's cursor (its SSE `id:`, which it sends back to resume) could reach {cursor} bytes, over the {} the server accepts; use at most {fits}",
                self.max_topics_per_connection,
                crate::wire::cursor::MAX_CURSOR_BYTES
            ));
        }
        if let Err(e) = crate::rights::Rights::parse(&self.history_off, "") {
            problems.push(format!("--history-off: {e}"));
        }
        if self.history_min_replicas > 0 && self.registry == RegistryKind::Memory {
            problems.push("--history-min-replicas waits for Redis replicas: it needs --registry redis or redis-cluster".into());
        }
        if self.history_size > 0 && self.history_ttl < Duration::from_secs(1) {
            problems.push(format!("--history-ttl {:?} keeps nothing long enough to resume; use at least 1s, or --history-size 0 to turn history off", self.history_ttl));
        }
        if self.reuse_port && self.registry == RegistryKind::Memory {
            problems.push("--reuse-port with --registry memory splits clients between processes that cannot reach each other's sessions (and would share node id 0); use --registry redis so they form a cluster".into());
        }
        for (flag, url) in [("--connect-hook", &self.connect_hook), ("--subscribe-hook", &self.subscribe_hook), ("--webhook-url", &self.webhook_url), ("--pusher-webhook-url", &self.pusher_webhook_url)] {
            if let Some(Err(e)) = url.as_deref().map(|url| crate::application::parse_url(flag, url)) {
                problems.push(e.message);
            }
        }
        if self.subscribe_hook_topics.iter().any(|p| p.contains("{sub}")) {
            problems.push("--subscribe-hook-topics: the hook is asked about every uid alike; `{sub}` has no place in its patterns".into());
        } else if let Err(e) = crate::rights::Rights::parse(&self.subscribe_hook_topics, "") {
            problems.push(format!("--subscribe-hook-topics: {e}"));
        }
        if let Some(Err(e)) = self.hook_ca.as_deref().map(|ca| crate::application::roots(Some(ca))) {
            problems.push(e.message);
        }
        if self.hook_breaker_failures == 0 {
            problems.push("--hook-breaker-failures must be at least 1".into());
        }
        if !self.subscribe_hook_topics.is_empty() && self.subscribe_hook.is_none() {
            problems.push("--subscribe-hook-topics names the topics --subscribe-hook decides: set --subscribe-hook too".into());
        }
        if self.hook_max_concurrency == 0 || self.hook_timeout.is_zero() {
            problems.push("--hook-max-concurrency and --hook-timeout must be more than 0: no hook could be asked".into());
        }
        if let Err(e) = self.pusher_apps() {
            problems.push(e);
        }
        if self.pusher_webhook_url.is_some() && self.pusher_app.is_empty() && self.pusher_app_tables.is_empty() {
            problems.push("--pusher-webhook-url tells Pusher apps' events: name the apps with --pusher-app".into());
        }
        if self.webhook_batch == 0 || self.webhook_attempts == 0 || self.webhook_timeout.is_zero() {
            problems.push("--webhook-batch, --webhook-attempts and --webhook-timeout must be more than 0: no webhook could be sent".into());
        }
        // Behind a connect hook the application authenticates every client, so the client
        // listener may face the network in open mode, as long as the publish API has a key.
        let vouched = self.connect_hook.is_some() && (self.api_key.is_some() || self.api_keys.is_some());
        if self.open_mode() {
            for (name, addr) in [("--listen", self.listen), ("--admin-listen", self.admin_listen)] {
                if !addr.ip().is_loopback() && !(vouched && name == "--listen") {
                    problems.push(format!(
                        "open mode (no --jwt-secret) refuses a non-loopback listener: {name} {addr}; \
                         set --jwt-secret and --api-key (or --connect-hook and --api-key), or bind to 127.0.0.1"
                    ));
                }
            }
        } else if self.api_key.is_none() && self.api_keys.is_none() {
            problems.push("client tokens are required (--jwt-secret or --jwt-public-key) but the publish API has no key: set --api-key or --api-keys".into());
        }
        if self.max_message_bytes > self.queue_max_bytes {
            problems.push(format!(
                "--max-message-bytes ({}) is larger than --queue-max-bytes ({}): no message that large could ever be queued",
                self.max_message_bytes, self.queue_max_bytes
            ));
        }
        if self.max_client_frame_bytes > MAX_CLIENT_FRAME_LIMIT {
            problems.push(format!(
                "--max-client-frame-bytes ({}) is over {MAX_CLIENT_FRAME_LIMIT}: client frames are read whole into a per-thread buffer",
                self.max_client_frame_bytes
            ));
        }
        for (flag, value) in [("--max-batch", self.max_batch), ("--max-batch-bytes", self.max_batch_bytes), ("--max-push-uids", self.max_push_uids)] {
            if value == 0 {
                problems.push(format!("{flag} is 0: nothing could be published with it"));
            }
        }
        if self.max_publish_bytes_in_flight < self.max_message_bytes {
            problems.push(format!(
                "--max-publish-bytes-in-flight ({}) is smaller than --max-message-bytes ({}): no publish could be read",
                self.max_publish_bytes_in_flight, self.max_message_bytes
            ));
        }
        if self.max_client_frame_bytes < MIN_CLIENT_FRAME {
            problems.push(format!(
                "--max-client-frame-bytes ({}) is under {MIN_CLIENT_FRAME}: clients could not send a control frame or a subscribe",
                self.max_client_frame_bytes
            ));
        }
        // Not max_connections x queue_max_bytes: that product (256 GB by default) is far
        // past any machine's memory, and the budget exists to cap what slow clients can
        // hold. Queues that stay full are closed after --slow-consumer-timeout, so the
        // budget comes back; it only has to hold one full queue.
        if self.node_queue_max_bytes < self.queue_max_bytes {
            problems.push(format!(
                "--node-queue-max-bytes ({}) is smaller than one connection's --queue-max-bytes ({})",
                self.node_queue_max_bytes, self.queue_max_bytes
            ));
        }
        if self.queue_max_messages == 0 || self.fanout_batch == 0 || self.max_connections_per_uid == 0 {
            problems.push("--queue-max-messages, --fanout-batch and --max-connections-per-uid must be at least 1".into());
        }
        if self.handshake_timeout.is_zero() {
            problems.push("--handshake-timeout must be more than 0s: a head not whole in its first read would be refused".into());
        }
        if self.idle_timeout.is_zero() {
            problems.push("--idle-timeout must be more than 0s".into());
        }
        if self.io_threads > MAX_IO_THREADS {
            problems.push(format!("--io-threads {} is more than {MAX_IO_THREADS}: each is a thread and a runtime; one per core (0) is the default", self.io_threads));
        }
        match (self.registry, self.redis_url.len()) {
            (RegistryKind::Memory, 0) | (RegistryKind::Redis | RegistryKind::RedisSentinel, 1) | (RegistryKind::RedisCluster, 1..) => {}
            (RegistryKind::Memory, _) => {
                problems.push("--redis-url is set but --registry is memory; add --registry redis, redis-cluster or redis-sentinel".into())
            }
            (_, 0) => problems.push("--registry redis, redis-cluster and redis-sentinel need --redis-url".into()),
            (RegistryKind::Redis, _) => {
                problems.push("--registry redis takes one --redis-url; for seed nodes use --registry redis-cluster".into())
            }
            (RegistryKind::RedisSentinel, _) => {
                problems.push("--registry redis-sentinel takes one --redis-url, naming the master (redis://mymaster); the Sentinels go in --sentinel".into())
            }
        }
        match (self.registry, self.sentinel.is_empty()) {
            (RegistryKind::RedisSentinel, true) => problems.push("--registry redis-sentinel needs --sentinel (the Sentinels' addresses)".into()),
            (RegistryKind::RedisSentinel, false) | (_, true) => {}
            (_, false) => problems.push("--sentinel is set but --registry is not redis-sentinel".into()),
        }
        for (flag, url) in self.redis_url.iter().map(|u| ("--redis-url", u)).chain(self.sentinel.iter().map(|u| ("--sentinel", u))) {
            let shown = redacted(url);
            match redis::IntoConnectionInfo::into_connection_info(url.as_str()) {
                Err(e) => problems.push(format!("{flag} {shown}: {e}")),
                Ok(info) if matches!(info.addr(), redis::ConnectionAddr::Unix(_)) && (flag == "--sentinel" || self.registry == RegistryKind::RedisSentinel) => {
                    problems.push(format!("{flag} {shown}: Sentinel and the master it names are reached over TCP, not a unix socket"))
                }
                Ok(_) => {}
            }
        }
        if self.registry == RegistryKind::RedisSentinel {
            let authority = |url: &str| url.split_once("://").map(|(_, rest)| rest.rsplit_once('@').map_or(rest, |(_, host)| host).split('/').next().unwrap_or("").to_owned());
            if let Some(named) = self.redis_url.first().and_then(|u| authority(u)).filter(|host| host.contains(':')) {
                problems.push(format!("--redis-url for redis-sentinel names the master (redis://mymaster), not an address: `{named}` has a port; the Sentinels say where the master is"));
            }
        }
        let tls = self.redis_url.iter().chain(&self.sentinel).any(|u| u.starts_with("rediss://"));
        if (self.redis_ca.is_some() || self.redis_client_cert.is_some()) && !tls {
            problems.push("--redis-ca and --redis-client-cert are for rediss:// URLs; no --redis-url or --sentinel is one".into());
        }
        if self.node_ttl < Duration::from_secs(1) {
            problems.push("--node-ttl must be at least 1s".into());
        }
        problems
    }

    /// No keys for client tokens: clients say who they are, and read any topic.
    pub fn open_mode(&self) -> bool {
        self.jwt_secret.is_none() && self.jwt_public_key.is_empty()
    }

    /// A config for tests and embedding: both listeners on free loopback ports, open mode.
    pub fn for_loopback() -> Config {
        Config::try_parse_from(["pushline", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .expect("built-in arguments parse")
    }
}

/// URLs as [`redacted`] shows them, comma-separated.
pub fn redacted_all(urls: &[String]) -> String {
    urls.iter().map(|u| redacted(u)).collect::<Vec<_>>().join(", ")
}

/// A URL with any password replaced, for messages and logs.
pub fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}://***@{}", &url[..scheme], &url[at + 1..]),
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn application_urls_are_logged_without_their_secrets() {
        let mut config = Config::for_loopback();
        config.connect_hook = Some("https://user:pass@app.example:8443/hooks/connect?key=s3cret".into());
        config.webhook_url = Some("http://app.example/events".into());
        let logged = serde_json::to_value(&config).unwrap();
        assert_eq!(logged["connect_hook"], "https://***@app.example:8443/hooks/connect?***");
        assert_eq!(logged["webhook_url"], "http://app.example/events");
        assert!(logged["subscribe_hook"].is_null());
    }

    fn args(list: &[&str]) -> Vec<String> {
        std::iter::once("pushline").chain(list.iter().copied()).map(str::to_owned).collect()
    }

    #[test]
    fn file_sets_values_and_flags_override_them() {
        let dir = std::env::temp_dir().join(format!("pushline-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pushline.toml");
        std::fs::write(&path, "max_connections = 7\nidle-timeout = \"3s\"\nslow_consumer = \"disconnect\"\nreuse_port = true\n").unwrap();
        let file = path.to_str().unwrap();
        let config = Config::load_from(args(&["--config", file])).unwrap();
        assert_eq!(config.max_connections, 7);
        assert_eq!(config.idle_timeout, Duration::from_secs(3));
        assert_eq!(config.slow_consumer, SlowConsumer::Disconnect);
        assert!(config.reuse_port);
        let config = Config::load_from(args(&["--config", file, "--max-connections", "9"])).unwrap();
        assert_eq!(config.max_connections, 9, "a flag beats the file");

        std::fs::write(&path, "max_conections = 7\n").unwrap();
        let err = Config::load_from(args(&["--config", file])).unwrap_err();
        assert!(err.message.contains("unknown setting `max_conections`"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn pusher_app_tables_carry_their_options_beside_the_flag_apps() {
        let text = "[[pusher_app]]\nid = \"1\"\nkey = \"k1\"\nsecret = \"0123456789abcdef\"\nmax_connections = 5\nallowed_origins = [\"https://a.example\"]\nwebhook_url = \"http://127.0.0.1:1/hook\"\n";
        let config = Config::with_file(text, "test", args(&["--pusher-app", "2:k2:fedcba9876543210", "--pusher-client-events"])).unwrap();
        let apps = config.pusher_apps().unwrap();
        let [flagged, tabled] = [apps.by_id("2").unwrap().1, apps.by_id("1").unwrap().1];
        assert!(flagged.client_events && tabled.client_events, "--pusher-client-events is every app's default");
        assert_eq!((tabled.max_connections, tabled.allowed_origins.as_slice()), (5, &["https://a.example".to_owned()][..]));
        assert_eq!(tabled.webhook_url.as_deref(), Some("http://127.0.0.1:1/hook"));
        let unknown = Config::with_file("[[pusher_app]]\nid = \"1\"\nkey = \"k\"\nsecret = \"0123456789abcdef\"\nclient_event = true\n", "test", args(&[])).unwrap_err();
        assert!(unknown.message.contains("unknown field `client_event`"), "{unknown}");
        for origin in ["https://a.example/", "a.example", "https://*.example"] {
            let text = format!("[[pusher_app]]\nid = \"1\"\nkey = \"k\"\nsecret = \"0123456789abcdef\"\nallowed_origins = [\"{origin}\"]\n");
            let config = Config::with_file(&text, "test", args(&[])).unwrap();
            assert!(config.validate().unwrap_err().message.contains("is not an origin"), "{origin}");
        }
        let any = Config::with_file("[[pusher_app]]\nid = \"1\"\nkey = \"k\"\nsecret = \"0123456789abcdef\"\nallowed_origins = [\"*\"]\n", "test", args(&[])).unwrap();
        assert!(any.pusher_apps().unwrap().by_id("1").unwrap().1.allows_origin("https://anywhere.example"));
        let same_key = Config::with_file(text, "test", args(&["--pusher-app", "3:k1:fedcba9876543210"])).unwrap();
        assert!(same_key.validate().unwrap_err().message.contains("already configured"));
    }

    #[test]
    fn validation_explains_itself() {
        let mut config = Config::for_loopback();
        assert!(config.validate().is_ok());
        config.max_message_bytes = config.queue_max_bytes + 1;
        assert!(config.validate().unwrap_err().message.contains("--max-message-bytes"));
        let mut config = Config::for_loopback();
        config.max_client_frame_bytes = 1 << 20;
        assert!(config.validate().unwrap_err().message.contains("--max-client-frame-bytes"));
    }

    #[test]
    fn settings_that_cannot_work_are_refused() {
        let refused = |edit: fn(&mut Config)| {
            let mut config = Config::for_loopback();
            edit(&mut config);
            config.validate().unwrap_err().message
        };
        assert!(refused(|c| c.max_client_frame_bytes = 0).contains("--max-client-frame-bytes (0) is under 125"));
        assert!(refused(|c| c.reuse_port = true).contains("--reuse-port with --registry memory"));
        assert!(refused(|c| c.node_queue_max_bytes = c.queue_max_bytes - 1).contains("--node-queue-max-bytes"));
        assert!(refused(|c| c.max_connections_per_uid = 0).contains("--max-connections-per-uid"));
        assert!(refused(|c| c.io_threads = MAX_IO_THREADS + 1).contains("--io-threads 1025 is more than 1024"));
        assert!(refused(|c| c.max_topics_per_connection = 250).contains("use at most 122"));
        assert!(refused(|c| c.history_min_replicas = 1).contains("--history-min-replicas waits for Redis replicas"));
    }

    #[test]
    fn redis_settings_come_from_a_file_and_are_checked() {
        let dir = std::env::temp_dir().join(format!("pushline-config-redis-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pushline.toml");
        std::fs::write(&path, "registry = \"redis-cluster\"\nredis_url = [\"redis://a:1\", \"redis://b:2\"]\nnode_id = 9\n").unwrap();
        let config = Config::load_from(args(&["--config", path.to_str().unwrap()])).unwrap();
        assert_eq!((config.registry, config.redis_url.len(), config.node_id), (RegistryKind::RedisCluster, 2, Some(9)));
        assert!(config.validate().is_ok());

        let mut config = Config::for_loopback();
        config.redis_url = vec!["redis://a:1".into()];
        assert!(config.validate().unwrap_err().message.contains("--registry is memory"));
        config.registry = RegistryKind::Redis;
        assert!(config.validate().is_ok());
        config.redis_url.push("redis://b:2".into());
        assert!(config.validate().unwrap_err().message.contains("redis-cluster"));
        config.redis_url.clear();
        assert!(config.validate().unwrap_err().message.contains("need --redis-url"));
    }

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(redacted("redis://:secret@10.0.0.1:6379/0"), "redis://***@10.0.0.1:6379/0");
        assert_eq!(redacted("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }

    /// `--check-config` refuses what a start would: URLs that do not parse, and for
    /// Sentinel, a master given an address instead of a name, or a unix socket.
    #[test]
    fn redis_urls_are_checked_as_a_start_would() {
        let problems = |registry: RegistryKind, url: &str, sentinel: &str| {
            let mut config = Config::for_loopback();
            config.registry = registry;
            config.redis_url = vec![url.into()];
            config.sentinel = [sentinel].into_iter().filter(|s| !s.is_empty()).map(str::to_owned).collect();
            config.validate().map_or_else(|e| e.message, |()| String::new())
        };
        let sentinel = RegistryKind::RedisSentinel;
        assert_eq!(problems(sentinel, "rediss://u:pw@mymaster/0", "redis://127.0.0.1:26379"), "");
        let bad_db = problems(sentinel, "redis://u:pw@mymaster/abc", "redis://127.0.0.1:26379");
        assert!(bad_db.contains("--redis-url redis://***@mymaster/abc") && !bad_db.contains("pw"), "{bad_db}");
        assert!(problems(sentinel, "redis://mymaster", "http://127.0.0.1:26379").contains("--sentinel http://127.0.0.1:26379"));
        assert!(problems(sentinel, "redis://mymaster:6379", "redis://127.0.0.1:26379").contains("`mymaster:6379` has a port"));
        assert!(problems(sentinel, "redis://mymaster", "unix:///tmp/s.sock").contains("not a unix socket"));
        assert!(problems(RegistryKind::Redis, "redis://a:1/abc", "").contains("--redis-url redis://a:1/abc"));
    }
}
