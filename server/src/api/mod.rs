//! The publish API under `/v1`: push to uids, publish to a topic, broadcast to everyone.
//!
//! Each request is checked (key, node budget, size, JSON) before anything is framed; a
//! refusal names what is wrong. An accepted message is framed once and handed to the
//! registry, which delivers it.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::alloc::sites::Site;
use crate::conn::wire::Message;
use crate::gateway::http::{error_body, Prefixed};
use crate::registry::Unavailable;
use crate::server::Shared;
use crate::telemetry::{DropReason, PublishKind};

/// Room in a request body for the envelope around `data` (uids, topic).
const ENVELOPE_ALLOWANCE: usize = 1024 * 1024;

/// Serves HTTP/1.1 requests on one connection until it closes or the server stops.
pub async fn serve(io: Prefixed, shared: Arc<Shared>) {
    let service_state = shared.clone();
    let service = hyper::service::service_fn(move |req| {
        let shared = service_state.clone();
        // Tracked, so a graceful shutdown waits for publishes already accepted.
        let in_flight = shared.in_flight.clone();
        in_flight.track_future(async move { Ok::<_, Infallible>(route(req, &shared).await) })
    });
    let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = shared.stopping.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

type Reply = Response<Full<Bytes>>;

fn json(status: StatusCode, body: String) -> Reply {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    response
}

fn error(status: StatusCode, message: &str) -> Reply {
    json(status, error_body(message))
}

async fn route(req: Request<Incoming>, shared: &Shared) -> Reply {
    let kind = match req.uri().path() {
        "/v1/push" => Some(PublishKind::Push),
        "/v1/publish" => Some(PublishKind::Topic),
        "/v1/broadcast" => Some(PublishKind::Broadcast),
        _ => None,
    };
    let route_label = kind.map_or("other", |k| match k {
        PublishKind::Push => "push",
        PublishKind::Topic => "publish",
        PublishKind::Broadcast => "broadcast",
    });
    let reply = match kind {
        None if matches!(req.uri().path(), "/ws" | "/sse") => {
            error(StatusCode::BAD_REQUEST, "open /ws and /sse on a connection of their own")
        }
        None => error(StatusCode::NOT_FOUND, &format!("no endpoint {}; see /v1/push, /v1/publish, /v1/broadcast", req.uri().path())),
        Some(_) if req.method() != Method::POST => error(StatusCode::METHOD_NOT_ALLOWED, "use POST"),
        Some(kind) => publish(req, kind, shared).await,
    };
    shared.metrics.api_request(route_label, reply.status().as_u16());
    reply
}

fn authorized(req: &Request<Incoming>, key: &str) -> bool {
    let given = req
        .headers()
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .or_else(|| {
            let auth = req.headers().get(hyper::header::AUTHORIZATION)?.to_str().ok()?;
            let (scheme, token) = auth.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    // Compare in time independent of where the first difference is.
    given.is_some_and(|g| g.len() == key.len() && g.bytes().zip(key.bytes()).fold(0, |acc, (a, b)| acc | (a ^ b)) == 0)
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

/// 503: delivered to this node's connections; other nodes may or may not have it (a
/// batch can fail after part of it was applied). Retrying may repeat deliveries, with the
/// same message id, so clients can tell.
fn unavailable(msg: &Message, e: Unavailable) -> Reply {
    let body = serde_json::json!({
        "error": format!("registry unavailable: the message reached this node's connections; other nodes may not have it: {}", e.reason),
        "id": msg.id.to_string(),
        "online_local": e.local.online,
        "delivered_local": e.local.delivered,
    });
    let mut reply = json(StatusCode::SERVICE_UNAVAILABLE, body.to_string());
    reply.headers_mut().insert(hyper::header::RETRY_AFTER, hyper::header::HeaderValue::from_static("1"));
    reply
}

async fn publish(req: Request<Incoming>, kind: PublishKind, shared: &Shared) -> Reply {
    if let Some(key) = &shared.api_key {
        if !authorized(&req, key) {
            return error(StatusCode::UNAUTHORIZED, "missing or wrong API key (Authorization: Bearer KEY or X-Api-Key)");
        }
    }
    let max = shared.hub.config().max_message_bytes;
    let queued = shared.metrics.queued_bytes_now.load(std::sync::atomic::Ordering::Relaxed);
    let budget = shared.hub.config().node_queue_max_bytes;
    if queued > budget {
        shared.metrics.dropped(DropReason::NodeOverBudget, 1);
        let mut reply = error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("node has {queued} bytes queued for slow clients, over its budget of {budget}; retry later"),
        );
        reply.headers_mut().insert(hyper::header::RETRY_AFTER, hyper::header::HeaderValue::from_static("1"));
        return reply;
    }
    let limit = max + ENVELOPE_ALLOWANCE;
    let body = match Limited::new(req.into_body(), limit).collect().await {
        Ok(body) => body.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return error(StatusCode::PAYLOAD_TOO_LARGE, &format!("request body over {limit} bytes"));
        }
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("could not read body: {e}")),
    };
    let accepted_at = Instant::now();
    let bad_json = |e: serde_json::Error| error(StatusCode::BAD_REQUEST, &format!("bad JSON: {e}"));
    let too_big = |data: &RawValue| {
        (data.get().len() > max).then(|| {
            error(StatusCode::PAYLOAD_TOO_LARGE, &format!("data is {} bytes; the limit is {max}", data.get().len()))
        })
    };
    let hub = &shared.hub;
    let body = match kind {
        PublishKind::Push => {
            let push: PushBody = match serde_json::from_slice(&body) {
                Ok(p) => p,
                Err(e) => return bad_json(e),
            };
            if push.uids.is_empty() {
                return error(StatusCode::BAD_REQUEST, "uids must list at least one uid");
            }
            if let Some(reply) = too_big(push.data) {
                return reply;
            }
            let msg = Site::Codec.scope(|| Arc::new(Message::new(hub.message_ids.next(), None, push.data, accepted_at)));
            shared.metrics.published(kind);
            match shared.registry.push(hub, &push.uids, &msg).await {
                Ok(d) => serde_json::json!({ "id": msg.id.to_string(), "online": d.online, "delivered": d.delivered, "nodes": d.nodes }),
                Err(e) => return unavailable(&msg, e),
            }
        }
        PublishKind::Topic => {
            let publish: PublishBody = match serde_json::from_slice(&body) {
                Ok(p) => p,
                Err(e) => return bad_json(e),
            };
            if let Err(e) = hub.check_topics(std::slice::from_ref(&publish.topic), 0) {
                return error(StatusCode::BAD_REQUEST, &e);
            }
            if let Some(reply) = too_big(publish.data) {
                return reply;
            }
            let msg = Site::Codec.scope(|| Arc::new(Message::new(hub.message_ids.next(), Some(&publish.topic), publish.data, accepted_at)));
            shared.metrics.published(kind);
            match shared.registry.publish(hub, &publish.topic, &msg).await {
                Ok(d) => serde_json::json!({ "id": msg.id.to_string(), "delivered": d.delivered, "nodes": d.nodes }),
                Err(e) => return unavailable(&msg, e),
            }
        }
        PublishKind::Broadcast => {
            let broadcast: BroadcastBody = match serde_json::from_slice(&body) {
                Ok(p) => p,
                Err(e) => return bad_json(e),
            };
            if let Some(reply) = too_big(broadcast.data) {
                return reply;
            }
            let msg = Site::Codec.scope(|| Arc::new(Message::new(hub.message_ids.next(), None, broadcast.data, accepted_at)));
            shared.metrics.published(kind);
            match shared.registry.broadcast(hub, &msg).await {
                Ok(d) => serde_json::json!({ "id": msg.id.to_string(), "delivered": d.delivered, "nodes": d.nodes }),
                Err(e) => return unavailable(&msg, e),
            }
        }
    };
    json(StatusCode::OK, body.to_string())
}
