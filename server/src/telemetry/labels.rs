//! The values metric labels take, one enum per label. Each variant's label text comes
//! from its name (snake case) through `strum`, and `VARIANTS` lists them all, so every
//! series can be registered at start and the hot path only indexes an array.

use strum::{EnumCount, FromRepr, IntoStaticStr, VariantArray};

/// Why a connection closed. Label `reason` of `pushline_connections_closed_total`; its
/// number is an argument of the `conn_close` probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, EnumCount, FromRepr, IntoStaticStr, VariantArray)]
#[strum(serialize_all = "snake_case")]
#[repr(u8)]
pub enum CloseReason {
    /// The client sent a close frame or closed its end.
    Client,
    IdleTimeout,
    /// Outbound queue overflowed under `--slow-consumer disconnect`.
    SlowConsumer,
    Shutdown,
    ProtocolError,
    /// A read or write failed (reset, broken pipe).
    IoError,
    /// Its token expired and no fresh one came within the grace period (4001).
    TokenExpired,
    /// Over a per-connection limit: commands per second, topic changes per minute (1008).
    PolicyViolation,
    /// The application ended its user's connections (Pusher `terminate_connections`, 4009).
    Terminated,
    /// Registered, then refused before its handshake was answered (503: Redis did not
    /// list its session in time, or its history could not be read): never served.
    Refused,
}

/// Why a message did not reach a connection. Label `reason` of `pushline_messages_dropped_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, EnumCount, IntoStaticStr, VariantArray)]
#[strum(serialize_all = "snake_case")]
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
    /// A message from another node that arrived while this node had `RELAY_BACKLOG`
    /// others still to deliver.
    RelayBacklog,
}

/// Why a connection attempt was turned away. Label `reason` of `pushline_connections_refused_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, EnumCount, IntoStaticStr, VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum RefuseReason {
    MaxConnections,
    Unauthorized,
    /// A topic the token does not grant, or an origin not allowed.
    Forbidden,
    /// Past `--max-connect-rate`.
    ConnectRate,
    /// Past `--max-connections-per-ip`.
    MaxConnectionsPerIp,
    BadRequest,
    HandshakeTimeout,
    ShuttingDown,
    /// A publish API connection past `--max-api-connections`.
    ApiConnections,
    /// A connection past `--max-connections-per-uid`.
    MaxConnectionsPerUid,
    /// An admin connection past the admin listener's limit.
    AdminConnections,
    /// A connection past `--max-handshakes` handshakes in progress.
    Handshakes,
    /// Plain HTTP on the TLS port.
    NotTls,
    /// Redis, or the connect or subscribe hook, could not answer (a timeout, an error,
    /// over `--hook-max-concurrency`, an open circuit breaker).
    Unavailable,
    /// A TLS handshake that failed (no shared version or suite, a bad record, a client
    /// that refused the certificate).
    TlsHandshake,
}

/// What a publish addressed. Label `kind` of `pushline_messages_published_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, EnumCount, IntoStaticStr, VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum PublishKind {
    Push,
    Topic,
    Broadcast,
}

/// What a presence frame told. Label `kind` of `pushline_presence_events_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, EnumCount, IntoStaticStr, VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum PresenceEvent {
    Join,
    Leave,
    /// Several joins and leaves in one batch.
    Diff,
    /// Only the counts: a topic above `--presence-events-max-members`.
    Count,
}

/// Who sent a Pusher event. Label `source` of `pushline_pusher_events_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, EnumCount, IntoStaticStr, VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum PusherSource {
    /// The HTTP API (`events`, `batch_events`): one per channel it went to.
    Api,
    /// A client's `client-` event.
    Client,
}

/// Which backend hook was asked. Label `hook` of the hook metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, EnumCount, IntoStaticStr, VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum HookKind {
    Connect,
    Subscribe,
}

/// How a hook question ended. Label `outcome` of `pushline_hook_requests_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, EnumCount, IntoStaticStr, VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum HookOutcome {
    /// The application answered 200.
    Admitted,
    /// The application answered 401 or 403.
    Refused,
    /// Answered from `--hook-cache-ttl`, the application not asked.
    Cached,
    /// Any other status, a bad answer, or no connection to the application.
    Failed,
    /// No answer within `--hook-timeout`.
    Timeout,
    /// Not asked: `--hook-max-concurrency` questions were already waiting.
    OverCapacity,
    /// Not asked: the circuit breaker was open after the application kept failing.
    BreakerOpen,
}

/// What became of a webhook event. Label `outcome` of `pushline_webhook_events_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, EnumCount, IntoStaticStr, VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum WebhookOutcome {
    /// In a batch the application answered 2xx.
    Sent,
    /// Not queued: the queue held `--webhook-queue-bytes` already.
    QueueFull,
    /// Its batch failed `--webhook-attempts` times.
    GaveUp,
    /// Still queued when the node stopped and its grace ran out.
    Shutdown,
}

/// A client frame the server could not use. Label `reason` of `pushline_client_errors_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, EnumCount, IntoStaticStr, VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum ClientError {
    BadJson,
    UnknownType,
    TooManyTopics,
    BinaryFrame,
    /// A topic the connection's token does not grant.
    Forbidden,
    /// A refresh token that is invalid, or another uid's.
    BadToken,
    /// Over a per-connection limit (the connection is closed, 1008).
    OverLimit,
    /// A publish over `--max-client-publishes-per-second` (not published).
    PublishRate,
    /// A publish whose data is over `--max-message-bytes`.
    TooLarge,
    /// A publish refused while the node's queued bytes, or the bytes of publishes being
    /// handled, were over budget.
    OverBudget,
    /// A publish to a topic name that is empty or over 256 bytes.
    BadTopic,
}

/// A Redis command, as Pushline uses them. Label `command` of the Redis metrics; its
/// number is the first argument of the `redis_start` / `redis_end` probes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, EnumCount, IntoStaticStr, VariantArray)]
#[strum(serialize_all = "snake_case")]
#[repr(u8)]
pub enum RedisCommand {
    /// A batch of session changes (HSET / HDEL), one round trip on a single Redis.
    Sessions,
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
    /// Appending to streams and publishing their messages (the append script, batched).
    Append,
    /// Reading streams for resuming clients (HMGET + XRANGE, one stream per pipeline).
    History,
    /// Topics this node listens to (SET PX of their interest keys, batched).
    Interest,
    /// Waiting for a publish's write to reach `--history-min-replicas` replicas.
    Wait,
    /// Presence: members written, pages and counts read, dead runs' members taken back.
    Presence,
    /// Which topics have subscribers on some node, for the occupied/vacated webhooks.
    Occupancy,
}

/// Direction of a message between nodes. Label `direction` of `pushline_relay_messages_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, EnumCount, IntoStaticStr, VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum Relayed {
    Out,
    In,
}

/// Accept failures; `file_limit` means EMFILE/ENFILE: the file table is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq, EnumCount, IntoStaticStr, VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum AcceptError {
    FileLimit,
    Other,
}

/// The publish API's routes. Label `route` of `pushline_api_requests_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, EnumCount, IntoStaticStr, VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum ApiRoute {
    Push,
    Publish,
    Broadcast,
    Batch,
    Presence,
    /// The Pusher HTTP API (`/apps/...`).
    Pusher,
    Other,
}

/// Statuses the publish API answers with. Label `status` of `pushline_api_requests_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, EnumCount, IntoStaticStr, VariantArray)]
pub enum ApiStatus {
    #[strum(serialize = "200")]
    Ok,
    #[strum(serialize = "400")]
    BadRequest,
    #[strum(serialize = "401")]
    Unauthorized,
    #[strum(serialize = "403")]
    Forbidden,
    #[strum(serialize = "404")]
    NotFound,
    #[strum(serialize = "405")]
    MethodNotAllowed,
    #[strum(serialize = "408")]
    Timeout,
    #[strum(serialize = "409")]
    Conflict,
    #[strum(serialize = "413")]
    PayloadTooLarge,
    #[strum(serialize = "422")]
    Unprocessable,
    #[strum(serialize = "503")]
    Unavailable,
    #[strum(serialize = "other")]
    Other,
}

impl ApiStatus {
    pub fn of(status: u16) -> ApiStatus {
        match status {
            200 => ApiStatus::Ok,
            400 => ApiStatus::BadRequest,
            401 => ApiStatus::Unauthorized,
            403 => ApiStatus::Forbidden,
            404 => ApiStatus::NotFound,
            405 => ApiStatus::MethodNotAllowed,
            408 => ApiStatus::Timeout,
            409 => ApiStatus::Conflict,
            413 => ApiStatus::PayloadTooLarge,
            422 => ApiStatus::Unprocessable,
            503 => ApiStatus::Unavailable,
            _ => ApiStatus::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_read_as_the_metrics_documented_them() {
        assert_eq!(<&str>::from(CloseReason::IdleTimeout), "idle_timeout");
        assert_eq!(<&str>::from(DropReason::NodeOverBudget), "node_over_budget");
        assert_eq!(<&str>::from(ApiStatus::of(413)), "413");
        assert_eq!(CloseReason::from_repr(CloseReason::IoError as u8), Some(CloseReason::IoError));
        assert_eq!(CloseReason::from_repr(CloseReason::COUNT as u8), None);
    }
}

/// How a resume went. Label `outcome` of `pushline_resumes_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, EnumCount, IntoStaticStr, VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum ResumeOutcome {
    /// Every stream of the connection was replayed from the client's position.
    Recovered,
    /// At least one stream could not be (trimmed, epoch changed, unknown): the client was told.
    NotRecovered,
}

/// Why a stream's history was forgotten before its messages aged out. Label `reason` of
/// `pushline_history_streams_evicted_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, EnumCount, IntoStaticStr, VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum Eviction {
    /// The node's history was over `--history-max-bytes`: the least recently written streams went.
    Budget,
    /// Nobody listened to the topic for `--history-ttl`.
    NoListener,
    /// The API key that wrote them was over `--history-max-bytes-per-key`: its least
    /// recently written streams went.
    PublisherShare,
}

/// Why a group's streams were given new epochs. Label `reason` of
/// `pushline_history_epoch_resets_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, EnumCount, IntoStaticStr, VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum EpochReset {
    /// Redis held less of a group's history than this node had seen appended: a failover
    /// to a replica that had not received the last writes, a restore, a flush.
    Rollback,
    /// The group's history was written under another Redis run: Redis restarted or failed
    /// over since, perhaps from a snapshot that lacks the last writes.
    RedisRun,
}

/// How a TLS handshake went. Label `kind` of `pushline_tls_handshakes_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, EnumCount, IntoStaticStr, VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum TlsHandshake {
    Full,
    /// With a session ticket: no certificate signature, no key exchange of certificates.
    Resumed,
}
