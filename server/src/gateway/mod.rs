//! A new client connection's first request: WebSocket upgrade (`/ws`), Server-Sent
//! Events (`/sse`), or the publish API (everything else, served by hyper).
//!
//! For `/ws` and `/sse` the gateway reads the request head itself, authenticates, takes a
//! connection slot, answers, registers the connection with the hub and starts its task;
//! nothing of the handshake is kept after that.

pub mod auth;
pub mod http;
mod sse;
mod ws;

use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::alloc::sites::Site;
use crate::conn::{self, wire::Transport, Conn};
use crate::hub::Slot;
use crate::server::Shared;
use crate::telemetry::RefuseReason;
use http::{Head, ReadHead};

/// A request turned away before any connection state was made.
struct Refusal {
    status: u16,
    reason: RefuseReason,
    headers: &'static str,
    message: String,
}

impl Refusal {
    fn bad_request(message: impl Into<String>) -> Refusal {
        Refusal { status: 400, reason: RefuseReason::BadRequest, headers: "", message: message.into() }
    }
}

/// What a successful handshake settles: who, on which topics, in which slot.
struct Admitted {
    uid: String,
    topics: Vec<String>,
    slot: Slot,
}

pub async fn handle(mut stream: TcpStream, shared: Arc<Shared>) {
    let mut buf = Vec::with_capacity(1024);
    let timeout = shared.hub.config().handshake_timeout;
    let (head, used) = match tokio::time::timeout(timeout, http::read_head(&mut stream, &mut buf)).await {
        Ok(Ok(ReadHead::Complete(head, used))) => (head, used),
        Ok(Ok(ReadHead::Closed)) | Ok(Err(_)) => return,
        Ok(Ok(ReadHead::Malformed(why))) => {
            shared.metrics.refused(RefuseReason::BadRequest);
            return http::respond(&mut stream, 400, "", &http::error_body(&why)).await;
        }
        Err(_) => {
            shared.metrics.refused(RefuseReason::HandshakeTimeout);
            return http::respond(&mut stream, 408, "", &http::error_body("request head not received in time")).await;
        }
    };
    let transport = match (head.method.as_str(), head.path.as_str()) {
        ("GET", "/ws") => Transport::WebSocket,
        ("GET", "/sse") => Transport::Sse,
        _ => return crate::api::serve(http::Prefixed::new(buf, stream), shared).await,
    };
    let admitted = match admit(&head, transport, &shared) {
        Ok(admitted) => admitted,
        Err(refusal) => {
            shared.metrics.refused(refusal.reason);
            let body = http::error_body(&refusal.message);
            return http::respond(&mut stream, refusal.status, refusal.headers, &body).await;
        }
    };
    let response = match transport {
        Transport::WebSocket => ws::accept_response(&head),
        Transport::Sse => sse::RESPONSE.to_owned(),
    };
    if stream.write_all(response.as_bytes()).await.is_err() {
        return;
    }
    let early = buf.split_off(used);
    drop(buf);
    let hub = &shared.hub;
    let conn = Site::Sessions.scope(|| {
        let conn = Arc::new(Conn::new(hub.session_ids.next(), admitted.uid.into(), transport));
        hub.register(&conn, &admitted.topics);
        conn
    });
    let welcome = serde_json::json!({
        "type": "welcome",
        "session": conn.session.to_string(),
        "uid": &*conn.uid,
    })
    .to_string();
    let welcome = match transport {
        Transport::WebSocket => conn::wire::ws_text(&welcome),
        Transport::Sse => conn::wire::sse_event("welcome", &welcome),
    };
    {
        use std::os::fd::AsRawFd;
        crate::probes::conn_open(conn.session.0, stream.as_raw_fd(), transport as u8);
    }
    // A task of its own, so the long-lived future holds none of the handshake's state.
    let task = Site::ConnectionTask.instrument(conn::serve(stream, conn, hub.clone(), admitted.slot, welcome, early));
    Site::ConnectionTask.scope(|| tokio::spawn(task));
}

fn admit(head: &Head, transport: Transport, shared: &Shared) -> Result<Admitted, Refusal> {
    if transport == Transport::WebSocket {
        ws::check_upgrade(head)?;
    }
    let identity = shared.auth.authenticate(head.bearer(), head.query("uid")).map_err(|message| Refusal {
        status: 401,
        reason: RefuseReason::Unauthorized,
        headers: "",
        message,
    })?;
    let topics: Vec<String> = head
        .query("topics")
        .map(|t| t.split(',').filter(|t| !t.is_empty()).map(str::to_owned).collect())
        .unwrap_or_default();
    shared.hub.check_topics(&topics, 0).map_err(Refusal::bad_request)?;
    let slot = shared.hub.reserve().map_err(|reason| Refusal {
        status: 503,
        reason,
        headers: "Retry-After: 5\r\n",
        message: match reason {
            RefuseReason::MaxConnections => {
                format!("server is at max_connections ({})", shared.hub.config().max_connections)
            }
            _ => "server is shutting down".into(),
        },
    })?;
    Ok(Admitted { uid: identity.uid, topics, slot })
}
