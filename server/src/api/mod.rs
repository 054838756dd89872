//! The publish API under `/v1`: push to uids, publish to a topic, broadcast to everyone.
//!
//! Each request is checked (key, node budget, size, JSON) before anything is framed; a
//! refusal names what is wrong. An accepted message is framed once and handed to the
//! registry, which delivers it.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::value::RawValue;

use arc_swap::ArcSwap;

use crate::auth::api_keys::ApiKeys;
use crate::error::{Error, Kind};
use crate::http::{bearer_token, Prefixed};
use crate::hub::{self, Hub};
use crate::registry::{Delivered, Published, Registry, Unavailable};
use crate::session::MessageIds;
use crate::shutdown::{Phase, Shutdown};
use crate::telemetry::{ApiRoute, DropReason, Metrics, PublishKind};
use crate::history::idempotency;
use crate::wire::{json, Draft};

/// Room in a request body for the envelope around `data` (uids, topic).
const ENVELOPE_ALLOWANCE: usize = 1024 * 1024;

/// Most bytes hyper buffers for a request head (its minimum is 8 KiB); the listener's own
/// head reader takes 8 KiB.
const MAX_HEAD_BUFFER: usize = 16 * 1024;
const MAX_HEADERS: usize = 64;

pub struct Api {
    pub registry: Registry,
    pub hub: Arc<Hub>,
    pub message_ids: MessageIds,
    pub metrics: Arc<Metrics>,
    /// The keys publishers present, each with its scopes; none in open mode. Swapped on SIGHUP.
    pub api_keys: Arc<ArcSwap<ApiKeys>>,
    pub max_message_bytes: usize,
    /// Queued bytes across connections above which publishes are refused.
    pub node_queue_max_bytes: usize,
    /// Time a request's head or body may take to arrive, and an idle connection may
    /// wait for its next request.
    pub request_timeout: std::time::Duration,
    /// Bytes of request bodies being read at once, in KiB permits: what publishers can
    /// make this node buffer, whatever the number of connections.
    pub bodies: Arc<tokio::sync::Semaphore>,
    pub shutdown: Arc<Shutdown>,
    /// Serve the demo page (`--demo`).
    pub demo: bool,
}

/// The demo page and the client it runs, shipped in the binary.
fn demo(path: &str) -> Option<(&'static str, &'static [u8])> {
    match path {
        "/demo" => Some(("text/html; charset=utf-8", include_bytes!("demo.html"))),
        "/demo/pushline-client.js" => Some(("text/javascript", include_bytes!("../../../clients/js/src/index.js"))),
        _ => None,
    }
}

type Reply = Response<Full<Bytes>>;

fn json(status: StatusCode, body: String) -> Reply {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    response
}

/// The one place an error becomes a response: its status, its `Retry-After`, `body`.
fn error_reply(error: &Error, body: String) -> Reply {
    let status = StatusCode::from_u16(error.kind.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut reply = json(status, body);
    if let Some(seconds) = error.retry_after() {
        reply.headers_mut().insert(hyper::header::RETRY_AFTER, seconds.into());
    }
    reply
}

impl From<Error> for Reply {
    fn from(error: Error) -> Reply {
        let body = error.body();
        error_reply(&error, body)
    }
}

impl Api {
    /// Serves HTTP/1.1 requests on one connection until it closes or the server stops.
    pub async fn serve(self: Arc<Self>, io: Prefixed) {
        let api = self.clone();
        let service = hyper::service::service_fn(move |req| {
            let api = api.clone();
            // Tracked, so a graceful shutdown waits for publishes already accepted.
            let shutdown = api.shutdown.clone();
            shutdown.track(async move { Ok::<_, Infallible>(api.route(req).await) })
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(self.request_timeout)
            .max_buf_size(MAX_HEAD_BUFFER)
            .max_headers(MAX_HEADERS)
            .serve_connection(TokioIo::new(io), service);
        tokio::pin!(conn);
        tokio::select! {
            _ = conn.as_mut() => {}
            // While draining, requests still get an answer (503 for a new publish); once
            // publishes are done, connections close after the request they are in.
            _ = self.shutdown.reached(Phase::Closing) => {
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            }
        }
    }

    async fn route(&self, req: Request<Incoming>) -> Reply {
        let route = match req.uri().path() {
            "/v1/push" => ApiRoute::Push,
            "/v1/publish" => ApiRoute::Publish,
            "/v1/broadcast" => ApiRoute::Broadcast,
            _ => ApiRoute::Other,
        };
        let reply = match route {
            ApiRoute::Other if matches!(req.uri().path(), "/ws" | "/sse") => {
                Error::bad_request("open /ws and /sse on a connection of their own").into()
            }
            ApiRoute::Other => match demo(req.uri().path()).filter(|_| self.demo && req.method() == Method::GET) {
                Some((kind, body)) => {
                    let mut reply = Response::new(Full::new(Bytes::from_static(body)));
                    reply.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(kind));
                    reply
                }
                None => Error::new(
                Kind::NotFound,
                    format!("no endpoint {}; see /v1/push, /v1/publish, /v1/broadcast", req.uri().path()),
                )
                .into(),
            },
            _ if req.method() != Method::POST => Error::new(Kind::MethodNotAllowed, "use POST").into(),
            ApiRoute::Push => self.publish(req, PublishKind::Push).await,
            ApiRoute::Publish => self.publish(req, PublishKind::Topic).await,
            ApiRoute::Broadcast => self.publish(req, PublishKind::Broadcast).await,
        };
        self.metrics.api_request(route, reply.status().as_u16());
        reply
    }

    /// Whether the request's key may publish `kind` (to `topic`): Ok, or the refusal.
    /// Returns the key's name ("" in open mode), which scopes its idempotency keys.
    fn authorized(keys: &ApiKeys, req_key: Option<&str>, kind: PublishKind, topic: Option<&str>) -> Result<String, Error> {
        if keys.is_open() {
            return Ok(String::new());
        }
        let key = req_key
            .and_then(|given| keys.find(given))
            .ok_or_else(|| Error::new(Kind::Unauthorized, "missing or wrong API key (Authorization: Bearer KEY or X-Api-Key)"))?;
        if key.allows(kind, topic) {
            return Ok(key.name.clone());
        }
        let what = match (kind, topic) {
            (PublishKind::Topic, Some(topic)) => format!("publish to topic `{topic}`"),
            (kind, _) => <&str>::from(kind).to_owned(),
        };
        Err(Error::new(Kind::Forbidden, format!("API key `{}` may not {what}", key.name)))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PushBody<'a> {
    uids: Vec<String>,
    #[serde(borrow)]
    data: &'a RawValue,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody<'a> {
    topic: String,
    #[serde(borrow)]
    data: &'a RawValue,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BroadcastBody<'a> {
    #[serde(borrow)]
    data: &'a RawValue,
}

/// 503: Redis failed, so the message may have reached no one, or some (a batch can fail
/// after part of it was applied). A retry with the same Idempotency-Key publishes only
/// what did not go out.
fn unavailable(id: u64, e: Unavailable) -> Reply {
    let error = Error::unavailable(format!(
        "registry unavailable: the message may not have reached every connection; retry, with an Idempotency-Key so that nothing is published twice: {}",
        e.reason
    ));
    let body = serde_json::json!({ "error": error.message, "id": id.to_string() });
    error_reply(&error, body.to_string())
}

/// A body's share of `--max-publish-bytes-in-flight`, shown in a gauge while held.
struct Reading<'a> {
    _permits: tokio::sync::OwnedSemaphorePermit,
    bytes: f64,
    metrics: &'a Metrics,
}

impl<'a> Reading<'a> {
    fn new(permits: tokio::sync::OwnedSemaphorePermit, metrics: &'a Metrics) -> Reading<'a> {
        let bytes = permits.num_permits() as f64 * 1024.0;
        metrics.publish_bytes_reading.increment(bytes);
        Reading { _permits: permits, bytes, metrics }
    }
}

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        self.metrics.publish_bytes_reading.decrement(self.bytes);
    }
}

fn bad_json(e: serde_json::Error) -> Reply {
    Error::bad_request(format!("bad JSON: {e}")).into()
}

impl Api {
    async fn publish(&self, req: Request<Incoming>, kind: PublishKind) -> Reply {
        if !self.shutdown.is_serving() {
            return Error::new(Kind::ShuttingDown, "this node is shutting down; publish to another").into();
        }
        let keys = self.api_keys.load_full();
        let header = |name| req.headers().get(name).and_then(|v| v.to_str().ok());
        let given = header("x-api-key").or_else(|| bearer_token(header("authorization")?)).map(str::to_owned);
        // The scope now; a topic publish's topic once the body is read.
        let key_name = match Api::authorized(&keys, given.as_deref(), kind, None) {
            Ok(name) => name,
            Err(e) => return e.into(),
        };
        // A key that is not plain ASCII, or given twice, is refused: read as absent, a
        // retry would publish again.
        let mut sent = req.headers().get_all("idempotency-key").iter();
        let idempotency_header = match (sent.next(), sent.next()) {
            (None, _) => None,
            (Some(one), None) => match one.to_str() {
                Ok(key) => Some(key.to_owned()),
                Err(_) => return Error::bad_request(idempotency::KEY_RULE).into(),
            },
            (Some(_), Some(_)) => return Error::bad_request("Idempotency-Key given more than once").into(),
        };
        let max = self.max_message_bytes;
        let queued = self.metrics.queued_bytes_now.load(Ordering::Relaxed);
        let budget = self.node_queue_max_bytes;
        if queued > budget {
            self.metrics.dropped(DropReason::NodeOverBudget, 1);
            return Error::new(
                Kind::Overloaded,
                format!("node has {queued} bytes queued for slow clients, over its budget of {budget}; retry later"),
            )
            .into();
        }
        let limit = max + ENVELOPE_ALLOWANCE;
        let declared = req.headers().get(hyper::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
        if declared.is_some_and(|n| n > limit) {
            return Error::new(Kind::PayloadTooLarge, format!("request body over {limit} bytes")).into();
        }
        let kib = declared.unwrap_or(limit).div_ceil(1024).max(1) as u32;
        let Ok(permits) = self.bodies.clone().try_acquire_many_owned(kib) else {
            self.metrics.dropped(DropReason::NodeOverBudget, 1);
            let error = "publish bodies being read are over this node's budget (--max-publish-bytes-in-flight); retry later";
            return Error::new(Kind::Overloaded, error).into();
        };
        let _reading = Reading::new(permits, &self.metrics);
        let body = match tokio::time::timeout(self.request_timeout, Limited::new(req.into_body(), limit).collect()).await {
            Ok(Ok(body)) => body.to_bytes(),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
                return Error::new(Kind::PayloadTooLarge, format!("request body over {limit} bytes")).into();
            }
            Ok(Err(e)) => return Error::bad_request(format!("could not read body: {e}")).into(),
            Err(_) => {
                let timeout = self.request_timeout;
                return Error::new(Kind::Timeout, format!("request body not received within {timeout:?}")).into();
            }
        };
        // Known by its holder, and by what it asked for: a reuse with another request is refused.
        let idempotency_key = match idempotency_header.map(|key| idempotency::Key::new(&key_name, &key, <&str>::from(kind), &body)).transpose() {
            Ok(key) => key,
            Err(e) => return Error::bad_request(e).into(),
        };
        let accepted_at = Instant::now();
        // Checks `data` (size, depth): the compacted JSON to frame.
        let checked = |data: &RawValue| -> Result<String, Reply> {
            if data.get().len() > max {
                let error = Error::new(Kind::PayloadTooLarge, format!("data is {} bytes; the limit is {max}", data.get().len()));
                return Err(error.into());
            }
            json::compact(data.get())
                .map(|data| data.into_owned())
                .map_err(|_| Reply::from(Error::bad_request(format!("data nests deeper than {} arrays and objects", json::MAX_DEPTH))))
        };
        let id = self.message_ids.next();
        match kind {
            PublishKind::Push => {
                let push: PushBody = match serde_json::from_slice(&body) {
                    Ok(p) => p,
                    Err(e) => return bad_json(e),
                };
                if push.uids.is_empty() {
                    return Error::bad_request("uids must list at least one uid").into();
                }
                // A uid no client can connect as would fill a mailbox nobody can read.
                if let Some(bad) = push.uids.iter().find(|u| u.is_empty() || u.len() > crate::auth::MAX_UID_BYTES) {
                    return Error::bad_request(format!("uid `{bad}` is {} bytes; uids are 1 to {} bytes", bad.len(), crate::auth::MAX_UID_BYTES)).into();
                }
                let data = match checked(push.data) {
                    Ok(data) => data,
                    Err(reply) => return reply,
                };
                self.metrics.published(kind);
                let draft = Draft { id, publisher: &key_name, topic: None, data: &data, accepted_at };
                let published = self.registry.push(&self.hub, &push.uids, &draft, idempotency_key.as_ref()).await;
                self.reply(id, published, |d| {
                    serde_json::json!({ "id": id.to_string(), "online": d.online, "delivered": d.delivered, "nodes": d.nodes, "stored": d.stored })
                })
            }
            PublishKind::Topic => {
                let publish: PublishBody = match serde_json::from_slice(&body) {
                    Ok(p) => p,
                    Err(e) => return bad_json(e),
                };
                if let Err(e) = hub::check_topic_name(&publish.topic) {
                    return Error::bad_request(e).into();
                }
                if let Err(e) = Api::authorized(&keys, given.as_deref(), kind, Some(&publish.topic)) {
                    return e.into();
                }
                let data = match checked(publish.data) {
                    Ok(data) => data,
                    Err(reply) => return reply,
                };
                self.metrics.published(kind);
                let draft = Draft { id, publisher: &key_name, topic: Some(&publish.topic), data: &data, accepted_at };
                let published = self.registry.publish(&self.hub, &publish.topic, &draft, idempotency_key.as_ref()).await;
                self.reply(id, published, |d| serde_json::json!({ "id": id.to_string(), "delivered": d.delivered, "nodes": d.nodes, "stored": d.stored }))
            }
            PublishKind::Broadcast => {
                let broadcast: BroadcastBody = match serde_json::from_slice(&body) {
                    Ok(p) => p,
                    Err(e) => return bad_json(e),
                };
                let data = match checked(broadcast.data) {
                    Ok(data) => data,
                    Err(reply) => return reply,
                };
                self.metrics.published(kind);
                let draft = Draft { id, publisher: &key_name, topic: None, data: &data, accepted_at };
                let published = self.registry.broadcast(&self.hub, &draft, idempotency_key.as_ref()).await;
                self.reply(id, published, |d| serde_json::json!({ "id": id.to_string(), "delivered": d.delivered, "nodes": d.nodes, "stored": d.stored }))
            }
        }
    }

    /// The reply to a publish: `body` of what it reached, kept for retries with its
    /// idempotency key; the first reply again for a retry; 409 while the first is under
    /// way; 503 when Redis failed.
    fn reply(&self, id: u64, published: Result<Published<'_>, Unavailable>, body: impl FnOnce(&Delivered) -> serde_json::Value) -> Reply {
        match published {
            Ok(Published::Delivered(delivered, remember)) => {
                let body = body(&delivered).to_string();
                remember.reply(&body);
                json(StatusCode::OK, body)
            }
            Ok(Published::Repeated(first)) => {
                self.metrics.idempotent_replays.increment(1);
                json(StatusCode::OK, first)
            }
            Ok(Published::InProgress) => Error::new(Kind::Conflict, "a request with this Idempotency-Key is being handled; retry").into(),
            Ok(Published::Mismatch) => Error::new(Kind::Unprocessable, "idempotency key reused with a different request").into(),
            Ok(Published::NotReplicated { acked, wanted }) => {
                let error = Error::unavailable(format!(
                    "not_replicated: published, but its write reached {acked} of the {wanted} Redis replicas --history-min-replicas asks for in time, so it may not survive a failover; retry with the same Idempotency-Key (nothing is published twice)"
                ));
                let body = serde_json::json!({ "error": error.message, "id": id.to_string() });
                error_reply(&error, body.to_string())
            }
            Err(e) => unavailable(id, e),
        }
    }
}
