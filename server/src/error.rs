//! Errors that say whose fault they are, mapped once to what the other side sees.
//!
//! Every refusal and failure the server reports (to a client, a publisher, or the
//! operator at start-up) is an [`Error`]: a [`Kind`], which fixes the HTTP status, the
//! `Retry-After`, the refusal label and whose [`Fault`] it is, and a message that tells
//! whoever must act what to change. Hot-path errors keep enums of their own
//! (`wire::ws::ProtocolError`, mapped to close codes where it is defined).

use std::fmt;

use crate::telemetry::RefuseReason;

/// Whose fault a failure is: it decides the status class and who is told to act.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Whoever sent the input: a client, a publisher, or the operator's settings.
    Client,
    /// This server: at capacity, shutting down, or failing on its own.
    Server,
    /// Something this server depends on: Redis.
    Backend,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    BadRequest,
    Unauthorized,
    /// Authenticated, but not allowed this (a topic, a scope, an origin).
    Forbidden,
    NotFound,
    MethodNotAllowed,
    /// A request with the same Idempotency-Key is being handled; retry shortly.
    Conflict,
    /// An Idempotency-Key reused with a different request.
    Unprocessable,
    /// The request head did not arrive within the handshake timeout.
    Timeout,
    PayloadTooLarge,
    /// A WebSocket version this server does not speak.
    UpgradeRequired,
    /// At `--max-connections`; retry in a few seconds.
    AtCapacity,
    /// One uid at `--max-connections-per-uid`.
    TooManyConnections,
    /// One source address at `--max-connections-per-ip`.
    TooManyFromAddress,
    /// Past `--max-connect-rate`: retry after a jittered delay.
    RateLimited,
    /// Over a budget that drains quickly (queued bytes); retry soon.
    Overloaded,
    ShuttingDown,
    /// Redis could not be reached or failed.
    Unavailable,
    /// Settings that cannot work, found at start.
    Config,
    /// The operating system refused (binding a port, starting a thread).
    Io,
    Internal,
}

impl Kind {
    pub fn fault(self) -> Fault {
        match self {
            Kind::BadRequest
            | Kind::Unauthorized
            | Kind::Forbidden
            | Kind::NotFound
            | Kind::MethodNotAllowed
            | Kind::Conflict
            | Kind::Unprocessable
            | Kind::Timeout
            | Kind::PayloadTooLarge
            | Kind::UpgradeRequired
            | Kind::TooManyConnections
            | Kind::TooManyFromAddress
            | Kind::Config => Fault::Client,
            Kind::AtCapacity | Kind::RateLimited | Kind::Overloaded | Kind::ShuttingDown | Kind::Io | Kind::Internal => Fault::Server,
            Kind::Unavailable => Fault::Backend,
        }
    }

    pub fn status(self) -> u16 {
        match self {
            Kind::BadRequest | Kind::Config => 400,
            Kind::Unauthorized => 401,
            Kind::Forbidden => 403,
            Kind::NotFound => 404,
            Kind::MethodNotAllowed => 405,
            Kind::Conflict => 409,
            Kind::Unprocessable => 422,
            Kind::Timeout => 408,
            Kind::PayloadTooLarge => 413,
            Kind::UpgradeRequired => 426,
            Kind::TooManyConnections | Kind::TooManyFromAddress => 429,
            Kind::AtCapacity | Kind::RateLimited | Kind::Overloaded | Kind::ShuttingDown | Kind::Unavailable => 503,
            Kind::Io | Kind::Internal => 500,
        }
    }

    /// Seconds a client should wait before trying again, for refusals that pass.
    pub fn retry_after(self) -> Option<u32> {
        match self {
            Kind::AtCapacity | Kind::TooManyConnections | Kind::TooManyFromAddress | Kind::RateLimited => Some(5),
            Kind::Overloaded | Kind::ShuttingDown | Kind::Unavailable | Kind::Conflict => Some(1),
            _ => None,
        }
    }

    /// The `reason` label of `pushline_connections_refused_total` for a refused handshake.
    pub fn refuse_reason(self) -> RefuseReason {
        match self {
            Kind::Unauthorized => RefuseReason::Unauthorized,
            Kind::Forbidden => RefuseReason::Forbidden,
            Kind::Timeout => RefuseReason::HandshakeTimeout,
            Kind::AtCapacity => RefuseReason::MaxConnections,
            Kind::TooManyConnections => RefuseReason::MaxConnectionsPerUid,
            Kind::TooManyFromAddress => RefuseReason::MaxConnectionsPerIp,
            Kind::RateLimited => RefuseReason::ConnectRate,
            Kind::ShuttingDown => RefuseReason::ShuttingDown,
            Kind::Unavailable | Kind::Overloaded => RefuseReason::Unavailable,
            _ => RefuseReason::BadRequest,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Error {
    pub kind: Kind,
    pub message: String,
    /// Seconds to wait before retrying, when this error says other than its kind does.
    retry_after: Option<u32>,
}

impl Error {
    pub fn new(kind: Kind, message: impl Into<String>) -> Error {
        Error { kind, message: message.into(), retry_after: None }
    }

    /// Refusals of many clients at once say different delays, so their retries spread.
    pub fn with_retry_after(mut self, seconds: u32) -> Error {
        self.retry_after = Some(seconds);
        self
    }

    pub fn retry_after(&self) -> Option<u32> {
        self.retry_after.or(self.kind.retry_after())
    }

    pub fn bad_request(message: impl Into<String>) -> Error {
        Error::new(Kind::BadRequest, message)
    }

    pub fn config(message: impl Into<String>) -> Error {
        Error::new(Kind::Config, message)
    }

    pub fn unavailable(message: impl Into<String>) -> Error {
        Error::new(Kind::Unavailable, message)
    }

    pub fn fault(&self) -> Fault {
        self.kind.fault()
    }

    /// `{"error":"<message>"}`, the body of every error response.
    pub fn body(&self) -> String {
        serde_json::json!({ "error": self.message }).to_string()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_and_backend_refusals_tell_clients_to_come_back() {
        for kind in [Kind::AtCapacity, Kind::Overloaded, Kind::ShuttingDown, Kind::Unavailable] {
            assert_eq!(kind.status(), 503);
            assert!(kind.retry_after().is_some(), "{kind:?}");
        }
        assert_eq!(Kind::Unavailable.fault(), Fault::Backend);
        assert_eq!(Kind::BadRequest.retry_after(), None);
        assert_eq!(Kind::Timeout.refuse_reason(), RefuseReason::HandshakeTimeout);
    }
}
