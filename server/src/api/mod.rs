//! The publish API under `/v1`: push to uids, publish to a topic, broadcast to everyone,
//! or any of those, many at once (`/v1/batch`); and the Pusher HTTP API (`pusher`).
//! A connection's plain requests are read and answered by `connection`, the rest by hyper.
//!
//! Each request is checked (key, node budget, size, JSON) before anything is framed; a
//! refusal names what is wrong. An accepted message is framed once and handed to the
//! registry, which delivers it.

use std::borrow::Cow;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use arc_swap::ArcSwap;
use hyper_util::rt::TokioIo;
use serde::Serialize;

use crate::auth::api_keys::{ApiKey, ApiKeys};
use crate::error::{Error, Kind};
use crate::http::{bearer_token, Prefixed, MAX_HEADERS};
use crate::socket::Socket;
use crate::hub::{self, Hub};
use crate::registry::relay::Target;
use crate::registry::{Job, Published, Registry, Unavailable};
use crate::session::MessageIds;
use crate::shutdown::{Phase, Shutdown};
use crate::telemetry::{ApiRoute, DropReason, Metrics, PublishKind};
use crate::history::idempotency;
use crate::presence::Presence;
use crate::wire::{json, Draft};
use body::{checked_uids, is_object, Body};

mod batch;
mod body;
mod connection;
mod pusher;

/// Room in a request body for the envelope around `data` (uids, topic).
const ENVELOPE_ALLOWANCE: usize = 1024 * 1024;

/// Most bytes hyper buffers for a request head (its minimum is 8 KiB); the listener's own
/// head reader takes 8 KiB.
const MAX_HEAD_BUFFER: usize = 16 * 1024;

pub struct Api {
    pub registry: Arc<Registry>,
    pub hub: Arc<Hub>,
    pub message_ids: Arc<MessageIds>,
    /// Presence topics' members, when `--presence-topics` names some.
    pub presence: Option<Arc<Presence>>,
    pub metrics: Arc<Metrics>,
    /// The keys publishers present, each with its scopes; none in open mode. Swapped on SIGHUP.
    pub api_keys: Arc<ArcSwap<ApiKeys>>,
    pub max_message_bytes: usize,
    /// Most items in one `/v1/batch`, and most bytes in its body.
    pub max_batch: usize,
    /// Most uids one request (a push, or a batch's pushes in all) pushes to.
    pub max_push_uids: usize,
    pub max_batch_bytes: usize,
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
    /// The Pusher apps, when `--pusher-app` names some: their HTTP API is served here.
    pub pusher: Option<Arc<crate::pusher::Apps>>,
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

/// A JSON answer before it is written, by hyper or by [`connection`]'s plain path: its
/// status, its `Retry-After`, its body.
struct Answer {
    status: StatusCode,
    retry_after: Option<u32>,
    body: String,
}

impl Answer {
    fn ok(body: String) -> Answer {
        Answer { status: StatusCode::OK, retry_after: None, body }
    }

    /// The one place an error becomes an answer, with `body`.
    fn error(error: &Error, body: String) -> Answer {
        let status = StatusCode::from_u16(error.kind.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        Answer { status, retry_after: error.retry_after(), body }
    }
}

impl From<Error> for Answer {
    fn from(error: Error) -> Answer {
        let body = error.body();
        Answer::error(&error, body)
    }
}

impl From<Answer> for Reply {
    fn from(answer: Answer) -> Reply {
        let mut reply = json(answer.status, answer.body);
        if let Some(seconds) = answer.retry_after {
            reply.headers_mut().insert(hyper::header::RETRY_AFTER, seconds.into());
        }
        reply
    }
}

impl From<Error> for Reply {
    fn from(error: Error) -> Reply {
        Answer::from(error).into()
    }
}

impl Api {
    /// Serves a publish API connection whose first bytes (a whole request head at least)
    /// are in `read`, until it closes or the server stops.
    pub async fn serve(self: Arc<Self>, stream: Socket, read: Vec<u8>) {
        connection::serve(self, stream, read).await
    }

    /// Serves HTTP/1.1 requests with hyper until the connection closes or the server stops.
    async fn serve_with_hyper(self: Arc<Self>, io: Prefixed) {
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
        let route = route_of(req.uri().path());
        let mut reply: Reply = match route {
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
                    format!("no endpoint {}; see /v1/push, /v1/publish, /v1/broadcast, /v1/batch, /v1/presence", req.uri().path()),
                )
                .into(),
            },
            ApiRoute::Pusher => self.pusher(req).await.unwrap_or_else(Reply::from),
            ApiRoute::Presence if req.method() != Method::GET => Error::new(Kind::MethodNotAllowed, "use GET").into(),
            ApiRoute::Presence => self.presence(&req).await.map_or_else(Reply::from, |body| json(StatusCode::OK, body)),
            _ if req.method() != Method::POST => Error::new(Kind::MethodNotAllowed, "use POST").into(),
            _ => self.publish(req, route).await.unwrap_or_else(Answer::from).into(),
        };
        self.metrics.api_request(route, reply.status().as_u16());
        if ends_connection(reply.status()) {
            reply.headers_mut().insert(hyper::header::CONNECTION, hyper::header::HeaderValue::from_static("close"));
        }
        reply
    }
}

/// Whether an answer of `status` ends its connection, on either path: a request without a
/// valid key (401) must not keep one of `--max-api-connections` by asking again before
/// each timeout.
fn ends_connection(status: StatusCode) -> bool {
    status == StatusCode::UNAUTHORIZED
}

/// The route a request's path names.
fn route_of(path: &str) -> ApiRoute {
    match path {
        "/v1/push" => ApiRoute::Push,
        "/v1/publish" => ApiRoute::Publish,
        "/v1/broadcast" => ApiRoute::Broadcast,
        "/v1/batch" => ApiRoute::Batch,
        "/v1/presence" | "/v1/presence/stats" => ApiRoute::Presence,
        path if path.starts_with("/apps/") => ApiRoute::Pusher,
        _ => ApiRoute::Other,
    }
}

/// A header's value as text, as `HeaderValue::to_str` reads it: visible ASCII and tabs.
fn header_text(value: &[u8]) -> Option<&str> {
    value.iter().all(|b| *b == b'\t' || (0x20..0x7f).contains(b)).then(|| std::str::from_utf8(value).ok()).flatten()
}

/// What the API reads from a publish request's head, whichever parser read it: hyper's
/// header map, or httparse's headers on the plain path.
struct PublishHead<'h> {
    /// `X-Api-Key`, else the token of `Authorization: Bearer` (the first of each).
    api_key: Option<&'h str>,
    /// The first `Idempotency-Key` (None if it is not text), and whether another was given.
    idempotency_key: Option<Option<&'h str>>,
    idempotency_key_twice: bool,
    /// The media type of `Content-Type`, without its parameters.
    media_type: Option<&'h str>,
}

impl<'h> PublishHead<'h> {
    /// Reads the head from its headers, in order, as (name, value) pairs.
    fn read(headers: impl Iterator<Item = (&'h str, &'h [u8])>) -> PublishHead<'h> {
        let (mut api_key, mut authorization, mut content_type) = (None, None, None);
        let (mut idempotency_key, mut idempotency_key_twice) = (None, false);
        for (name, value) in headers {
            let first = |slot: &mut Option<Option<&'h str>>| {
                if slot.is_none() {
                    *slot = Some(header_text(value));
                }
            };
            if name.eq_ignore_ascii_case("x-api-key") {
                first(&mut api_key);
            } else if name.eq_ignore_ascii_case("authorization") {
                first(&mut authorization);
            } else if name.eq_ignore_ascii_case("idempotency-key") {
                idempotency_key_twice |= idempotency_key.is_some();
                first(&mut idempotency_key);
            } else if name.eq_ignore_ascii_case("content-type") {
                first(&mut content_type);
            }
        }
        PublishHead {
            api_key: api_key.flatten().or_else(|| bearer_token(authorization.flatten()?)),
            idempotency_key,
            idempotency_key_twice,
            media_type: content_type.flatten().map(|t| t.split(';').next().unwrap_or_default().trim()),
        }
    }

    fn of(headers: &'h hyper::HeaderMap) -> PublishHead<'h> {
        PublishHead::read(headers.iter().map(|(name, value)| (name.as_str(), value.as_bytes())))
    }
}

/// The API key a request presents (`X-Api-Key`, or `Authorization: Bearer`), found; None
/// in open mode.
fn holder<'k>(keys: &'k ApiKeys, given: Option<&str>) -> Result<Option<&'k ApiKey>, Error> {
    if keys.is_open() {
        return Ok(None);
    }
    given
        .and_then(|given| keys.find(given))
        .map(Some)
        .ok_or_else(|| Error::new(Kind::Unauthorized, "missing or wrong API key (Authorization: Bearer KEY or X-Api-Key)"))
}

/// Whether `holder` may publish `kind` (to `topic`).
fn allowed(holder: Option<&ApiKey>, kind: PublishKind, topic: Option<&str>) -> Result<(), Error> {
    match holder {
        Some(key) if !key.allows(kind, topic) => {
            let what = match (kind, topic) {
                (PublishKind::Topic, Some(topic)) => format!("publish to topic `{topic}`"),
                (PublishKind::Topic, None) => "publish to topics".to_owned(),
                (kind, _) => <&str>::from(kind).to_owned(),
            };
            Err(Error::new(Kind::Forbidden, format!("API key `{}` may not {what}", key.name)))
        }
        _ => Ok(()),
    }
}

/// A publish request admitted on its head, its body still to read.
struct Admitted<'k> {
    /// The key it presented; None in open mode.
    holder: Option<&'k ApiKey>,
    /// None for a batch.
    kind: Option<PublishKind>,
    idempotency_key: Option<String>,
    /// A batch given as NDJSON lines.
    ndjson: bool,
    /// Most bytes its body may have.
    limit: usize,
}

/// A publish checked (rights, names, sizes): what becomes a registry job.
struct Checked<'a> {
    id: u64,
    /// Each uid once (pushes), a topic, or everyone.
    target: Target<'a>,
    /// Compacted JSON.
    data: Cow<'a, str>,
    key: Option<idempotency::Key>,
}

impl Checked<'_> {
    /// The uids it pushes to (none for a topic or everyone).
    fn uids(&self) -> usize {
        match &self.target {
            Target::Uids(uids) => uids.len(),
            _ => 0,
        }
    }
}

/// 503: Redis failed, so the message may have reached no one, or some (a batch can fail
/// after part of it was applied). A retry with the same Idempotency-Key publishes only
/// what did not go out.
fn unavailable(e: Unavailable) -> Error {
    Error::unavailable(format!(
        "registry unavailable: the message may not have reached every connection; retry, with an Idempotency-Key so that nothing is published twice: {}",
        e.reason
    ))
}

fn presence_unavailable(e: Unavailable) -> Error {
    Error::unavailable(format!("presence unavailable; retry: {}", e.reason))
}

/// A publish that was not answered 200, with its message id when it may have gone out
/// in part (Redis failed, or its replicas did not confirm it).
struct Failed {
    error: Error,
    id: Option<u64>,
}

impl From<Error> for Failed {
    fn from(error: Error) -> Failed {
        Failed { error, id: None }
    }
}

impl From<Failed> for Answer {
    fn from(failed: Failed) -> Answer {
        match failed.id {
            Some(id) => {
                let body = serde_json::to_string(&Refused { error: &failed.error.message, status: None, id: Some(id) }).unwrap_or_default();
                Answer::error(&failed.error, body)
            }
            None => failed.error.into(),
        }
    }
}

/// Bytes `permits` (one per KiB) stand for, as the gauge counts them.
fn kib_as_bytes(permits: &tokio::sync::OwnedSemaphorePermit) -> f64 {
    permits.num_permits() as f64 * 1024.0
}

/// A body's share of `--max-publish-bytes-in-flight`, shown in a gauge while held.
struct Reading<'a> {
    /// One per KiB.
    permits: tokio::sync::OwnedSemaphorePermit,
    metrics: &'a Metrics,
}

impl<'a> Reading<'a> {
    fn new(permits: tokio::sync::OwnedSemaphorePermit, metrics: &'a Metrics) -> Reading<'a> {
        metrics.publish_bytes_reading.increment(kib_as_bytes(&permits));
        Reading { permits, metrics }
    }

    /// Holds enough of `bodies` for `bytes` read so far, taking more permits when they
    /// outgrow what is held; false when the node has none to give.
    fn cover(&mut self, bytes: usize, bodies: &Arc<tokio::sync::Semaphore>) -> bool {
        let held = self.permits.num_permits();
        let needed = bytes.div_ceil(1024);
        if needed <= held {
            return true;
        }
        let Ok(more) = bodies.clone().try_acquire_many_owned(u32::try_from(needed - held).unwrap_or(u32::MAX)) else { return false };
        self.metrics.publish_bytes_reading.increment(kib_as_bytes(&more));
        self.permits.merge(more);
        true
    }
}

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        self.metrics.publish_bytes_reading.decrement(kib_as_bytes(&self.permits));
    }
}

/// What a publish reached, as its answer says it.
#[derive(Serialize)]
struct Reached {
    #[serde(serialize_with = "json::id_as_text")]
    id: u64,
    /// Pushes only.
    #[serde(skip_serializing_if = "Option::is_none")]
    online: Option<usize>,
    delivered: usize,
    nodes: usize,
    stored: usize,
    /// A retry that published what its key's first request had not (see
    /// [`crate::registry::Delivered::first`]): its id is the first's, its counts its own.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    repeated: bool,
}

/// A publish that was not made: the body of its error answer, or its entry in a batch's
/// results (with the status it would have had alone).
#[derive(Serialize)]
struct Refused<'a> {
    error: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<u16>,
    /// Set when the message may have gone out in part (Redis failed).
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "json::id_as_text_some")]
    id: Option<u64>,
}


impl Api {
    /// `GET /v1/presence?topic=T&cursor=C&limit=N` (a page of members) or
    /// `GET /v1/presence/stats?topic=T` (the counts), for a key that may publish to `T`.
    async fn presence(&self, req: &Request<Incoming>) -> Result<String, Error> {
        let keys = self.api_keys.load_full();
        let holder = holder(&keys, PublishHead::of(req.headers()).api_key)?;
        let query = crate::http::query_pairs(req.uri().query().unwrap_or_default())?;
        let param = |name: &str| query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
        let topic = param("topic").ok_or_else(|| Error::bad_request("name the topic: ?topic="))?;
        hub::check_topic_name(topic).map_err(Error::bad_request)?;
        allowed(holder, PublishKind::Topic, Some(topic))?;
        let presence = self.presence.as_deref().filter(|p| p.is_presence_topic(topic));
        let presence = presence.ok_or_else(|| Error::new(Kind::NotFound, format!("`{topic}` is not a presence topic (--presence-topics)")))?;
        let body = if req.uri().path().ends_with("/stats") {
            serde_json::to_string(&self.registry.presence_stats(presence, topic).await.map_err(presence_unavailable)?)
        } else {
            let limit = match param("limit") {
                Some(n) => n.parse::<usize>().map_err(|_| Error::bad_request("?limit= is a number"))?.clamp(1, crate::presence::MAX_PAGE),
                None => crate::presence::MAX_PAGE,
            };
            serde_json::to_string(&self.registry.presence_page(presence, topic, param("cursor"), limit).await.map_err(presence_unavailable)?)
        };
        body.map_err(|e| Error::new(Kind::Internal, format!("could not write the answer: {e}")))
    }

    /// A publish request (`route` is push, publish, broadcast or batch) that hyper read:
    /// Ok with its answer, or the reason the whole request is refused.
    async fn publish(&self, req: Request<Incoming>, route: ApiRoute) -> Result<Answer, Error> {
        let keys = self.api_keys.load_full();
        let head = PublishHead::of(req.headers());
        let admitted = self.admit(&head, &keys, route)?;
        let (body, _reading) = self.read_body(req, admitted.limit).await?;
        self.publish_body(admitted, &body).await
    }

    /// Reads a body of at most `limit` bytes (413 past it), holding its share of
    /// `--max-publish-bytes-in-flight` while the returned `Reading` lives (see
    /// [`Api::reserve_body`]), within the request timeout (408).
    async fn read_body(&self, req: Request<Incoming>, limit: usize) -> Result<(Bytes, Reading<'_>), Error> {
        let declared = req.headers().get(hyper::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
        let mut reading = self.reserve_body(declared, limit)?;
        let mut body = req.into_body();
        let mut read = Vec::with_capacity(declared.unwrap_or(0).min(limit));
        let mut collect = std::pin::pin!(async {
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| Error::bad_request(format!("could not read body: {e}")))?;
                let Ok(data) = frame.into_data() else { continue };
                if read.len() + data.len() > limit {
                    return Err(Error::new(Kind::PayloadTooLarge, format!("request body over {limit} bytes")));
                }
                // A body without a Content-Length is charged as it arrives.
                if !reading.cover(read.len() + data.len(), &self.bodies) {
                    return Err(self.over_body_budget());
                }
                read.extend_from_slice(&data);
            }
            Ok(())
        });
        // A body that came with its head (most publishes) is read whole at once: no timer
        // is armed for it.
        let collected = match futures_util::poll!(collect.as_mut()) {
            std::task::Poll::Ready(collected) => collected,
            std::task::Poll::Pending => tokio::time::timeout(self.request_timeout, collect).await.map_err(|_| self.body_timeout())?,
        };
        collected.map(|()| (Bytes::from(read), reading))
    }

    /// The first checks of a publish request, on its head alone: the node is serving, the
    /// key is known and may publish this kind, the idempotency key is well-formed, the
    /// node is within its queue budget.
    fn admit<'k>(&self, head: &PublishHead<'_>, keys: &'k ApiKeys, route: ApiRoute) -> Result<Admitted<'k>, Error> {
        if !self.shutdown.is_serving() {
            return Err(Error::new(Kind::ShuttingDown, "this node is shutting down; publish to another"));
        }
        let holder = holder(keys, head.api_key)?;
        let kind = match route {
            ApiRoute::Push => Some(PublishKind::Push),
            ApiRoute::Publish => Some(PublishKind::Topic),
            ApiRoute::Broadcast => Some(PublishKind::Broadcast),
            _ => None,
        };
        // The scope now; a topic's once the body is read; a batch's item by item.
        if let Some(kind) = kind {
            allowed(holder, kind, None)?;
        }
        // A key that is not plain ASCII, or given twice, is refused: read as absent, a
        // retry would publish again.
        let idempotency_key = match (head.idempotency_key, head.idempotency_key_twice) {
            (None, _) => None,
            (Some(_), _) if kind.is_none() => {
                return Err(Error::bad_request("a batch takes no Idempotency-Key header: give each item its own `idempotency_key`"));
            }
            (Some(_), true) => return Err(Error::bad_request("Idempotency-Key given more than once")),
            (Some(one), false) => Some(one.ok_or_else(|| Error::bad_request(idempotency::KEY_RULE))?.to_owned()),
        };
        let ndjson = head.media_type.is_some_and(|t| t.eq_ignore_ascii_case("application/x-ndjson") || t.eq_ignore_ascii_case("application/jsonl"));
        let budget = self.node_queue_max_bytes;
        if let Some(queued) = self.metrics.over_queue_budget(budget) {
            return Err(Error::new(
                Kind::Overloaded,
                format!("node has {queued} bytes queued for slow clients, over its budget of {budget}; retry later"),
            ));
        }
        let limit = if kind.is_some() { self.max_message_bytes + ENVELOPE_ALLOWANCE } else { self.max_batch_bytes };
        Ok(Admitted { holder, kind, idempotency_key, ndjson, limit })
    }

    /// A publish admitted on its head, published from its `body`.
    async fn publish_body(&self, admitted: Admitted<'_>, body: &[u8]) -> Result<Answer, Error> {
        self.not_closing()?;
        let accepted_at = Instant::now();
        let Admitted { holder, kind, idempotency_key, ndjson, .. } = admitted;
        let publisher = holder.map_or("", |key| key.name.as_str());
        let Some(kind) = kind else {
            return self.batch(body, ndjson, holder, accepted_at).await;
        };
        if !is_object(body) {
            return Err(Error::bad_request("bad JSON: the body must be a JSON object"));
        }
        let read = Body::read(kind, body).map_err(|e| Error::bad_request(format!("bad JSON: {e}")))?;
        // Known by its holder, and by what it asked for: a reuse with another request is refused.
        let key = idempotency_key
            .map(|key| idempotency::Key::new(publisher, &key, <&str>::from(kind), body))
            .transpose()
            .map_err(Error::bad_request)?;
        let checked = self.check(&read, holder, key)?;
        self.within_uid_cap(checked.uids())?;
        let mut answers = self.run(&[&checked], publisher, accepted_at).await;
        let answer = answers.pop().ok_or_else(|| Error::unavailable("the registry gave no answer"))?;
        Ok(self.answer(&checked, answer).map_or_else(Answer::from, Answer::ok))
    }

    /// A body of at most `limit` bytes may be read: 413 past it (from its Content-Length,
    /// `declared`, when it has one), 503 when the node has no room for it; its share of
    /// `--max-publish-bytes-in-flight` (its Content-Length, else a first KiB, then what
    /// arrives: [`Reading::cover`]) is held while the returned `Reading` lives.
    fn reserve_body(&self, declared: Option<usize>, limit: usize) -> Result<Reading<'_>, Error> {
        if declared.is_some_and(|n| n > limit) {
            return Err(Error::new(Kind::PayloadTooLarge, format!("request body over {limit} bytes")));
        }
        let kib = declared.unwrap_or(0).div_ceil(1024).max(1) as u32;
        let permits = self.bodies.clone().try_acquire_many_owned(kib).map_err(|_| self.over_body_budget())?;
        Ok(Reading::new(permits, &self.metrics))
    }

    fn over_body_budget(&self) -> Error {
        self.metrics.dropped(DropReason::NodeOverBudget, 1);
        let error = "publish bodies being read are over this node's budget (--max-publish-bytes-in-flight); retry later";
        Error::new(Kind::Overloaded, error)
    }

    /// 503 for a publish whose body arrived after draining ended: its clients are being
    /// closed, so it would reach no one (and the memory registry's copy ends with the
    /// process); the publisher should send it to another node.
    fn not_closing(&self) -> Result<(), Error> {
        if self.shutdown.phase() >= Phase::Closing {
            return Err(Error::new(Kind::ShuttingDown, "this node closed its connections before the body arrived; publish to another"));
        }
        Ok(())
    }

    fn body_timeout(&self) -> Error {
        let timeout = self.request_timeout;
        Error::new(Kind::Timeout, format!("request body not received within {timeout:?}"))
    }

    /// 413 when a request would push to more than `--max-push-uids` uids.
    fn within_uid_cap(&self, uids: usize) -> Result<(), Error> {
        if uids > self.max_push_uids {
            return Err(Error::new(Kind::PayloadTooLarge, format!("the request pushes to {uids} uids; the limit is {} (--max-push-uids)", self.max_push_uids)));
        }
        Ok(())
    }

    /// Checks one publish against the key's rights and the size limits.
    fn check<'b>(&self, body: &'b Body<'b>, holder: Option<&ApiKey>, key: Option<idempotency::Key>) -> Result<Checked<'b>, Error> {
        let (target, topic, data) = match body {
            Body::Push(push) => (Target::Uids(checked_uids(&push.uids)?), None, push.data),
            Body::Publish(publish) => {
                hub::check_topic_name(&publish.topic).map_err(Error::bad_request)?;
                (Target::Topic(&publish.topic), Some(publish.topic.as_ref()), publish.data)
            }
            Body::Broadcast(broadcast) => (Target::Everyone, None, broadcast.data),
        };
        allowed(holder, target.kind(), topic)?;
        let max = self.max_message_bytes;
        if data.get().len() > max {
            return Err(Error::new(Kind::PayloadTooLarge, format!("data is {} bytes; the limit is {max}", data.get().len())));
        }
        let data = json::compact(data.get()).map_err(|unfit| Error::bad_request(format!("data {unfit}")))?;
        Ok(Checked { id: self.message_ids.next(), target, data, key })
    }

    /// Publishes checked messages, in order, each with its own answer.
    async fn run<'c>(&'c self, checked: &[&'c Checked<'c>], publisher: &'c str, accepted_at: Instant) -> Vec<Result<Published<'c>, Unavailable>> {
        let jobs: Vec<Job> = checked
            .iter()
            .map(|c| {
                let topic = match c.target {
                    Target::Topic(topic) => Some(topic),
                    _ => None,
                };
                Job { draft: Draft { id: c.id, publisher, topic, data: &c.data, accepted_at, except: None, pusher: None }, target: c.target.clone(), key: c.key.as_ref() }
            })
            .collect();
        self.registry.publish(&self.hub, &jobs).await
    }

    /// The answer to one publish: the JSON of what it reached, kept for retries with its
    /// idempotency key; the first answer again for a retry; 409 while the first is under
    /// way; 503 when Redis failed.
    fn answer(&self, checked: &Checked, published: Result<Published<'_>, Unavailable>) -> Result<String, Failed> {
        let id = checked.id;
        match published {
            Ok(Published::Delivered(delivered, remember)) => {
                let kind = checked.target.kind();
                self.metrics.published(kind);
                let online = (kind == PublishKind::Push).then_some(delivered.online);
                let id = delivered.first.unwrap_or(id);
                let reached = Reached { id, online, delivered: delivered.delivered, nodes: delivered.nodes, stored: delivered.stored, repeated: delivered.first.is_some() };
                let body = serde_json::to_string(&reached).map_err(|e| Error::new(Kind::Internal, format!("could not write the answer: {e}")))?;
                remember.reply(&body);
                Ok(body)
            }
            Ok(Published::Repeated(first)) => {
                self.metrics.idempotent_replays.increment(1);
                Ok(first)
            }
            Ok(Published::InProgress) => Err(Error::new(Kind::Conflict, "a request with this Idempotency-Key is being handled; retry").into()),
            Ok(Published::Mismatch) => Err(Error::new(Kind::Unprocessable, "idempotency key reused with a different request").into()),
            // A retry names the message its key published.
            Ok(Published::NotReplicated { acked, wanted, first }) => Err(Failed {
                error: Error::unavailable(format!(
                    "not_replicated: published, but its write reached {acked} of the {wanted} Redis replicas --history-min-replicas asks for in time, so it may not survive a failover; {}",
                    match checked.key {
                        Some(_) => "retry with the same Idempotency-Key (nothing is published twice)",
                        None => "a retry publishes it again: send an Idempotency-Key to retry safely",
                    }
                )),
                id: Some(first.unwrap_or(id)),
            }),
            Err(e) => Err(Failed { error: unavailable(e), id: Some(id) }),
        }
    }
}

