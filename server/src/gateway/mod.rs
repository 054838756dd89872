//! A new client connection whose request is `GET /ws` (WebSocket) or `GET /sse`
//! (Server-Sent Events), handed over by the listener with its request head read:
//! authenticate ([`auth`]), take a place ([`Admission`]), answer the handshake, register
//! with the hub, and start the connection's task. Nothing of the handshake is kept
//! after that.

pub mod auth;
mod sse;
mod ws;

use std::os::fd::AsRawFd;
use std::sync::Arc;

use pushline_alloc::Site;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::admission::{Admission, Slot};
use crate::client::{self, Clients};
use crate::conn::Conn;
use crate::error::{Error, Kind};
use crate::http::{self, Head};
use crate::session::SessionIds;
use crate::telemetry::{probes, CloseReason, Metrics};
use crate::wire::{self, Transport};
use auth::Auth;

pub struct Gateway {
    pub auth: Auth,
    pub admission: Arc<Admission>,
    pub clients: Arc<Clients>,
    pub session_ids: SessionIds,
    pub metrics: Arc<Metrics>,
}

/// What a successful handshake settles: who, on which topics, in which slot.
struct Admitted {
    uid: String,
    topics: Vec<String>,
    slot: Slot,
}

impl Gateway {
    /// Serves the handshake of `transport` for a request whose head is `head`; `buf` holds
    /// what was read, the head being its first `used` bytes.
    pub async fn connect(&self, mut stream: TcpStream, head: Head, mut buf: Vec<u8>, used: usize, transport: Transport) {
        let hub = &self.clients.hub;
        let admitted = self.admit(&head, transport).and_then(|admitted| {
            let conn = Site::Sessions.scope(|| Arc::new(Conn::new(self.session_ids.next(), admitted.uid.into(), transport)));
            Site::Sessions.scope(|| hub.register(&conn, &admitted.topics)).map(|()| (conn, admitted.slot))
        });
        let (conn, slot) = match admitted {
            Ok(admitted) => admitted,
            Err(error) => {
                self.metrics.refused(error.kind.refuse_reason());
                let extra = if error.kind == Kind::UpgradeRequired { "Sec-WebSocket-Version: 13\r\n" } else { "" };
                return http::respond_error(&mut stream, &error, extra).await;
            }
        };
        let response = match transport {
            Transport::WebSocket => ws::accept_response(&head),
            Transport::Sse => sse::RESPONSE.to_owned(),
        };
        if stream.write_all(response.as_bytes()).await.is_err() {
            conn.close_outbox(&self.metrics);
            return hub.unregister(&conn, CloseReason::IoError);
        }
        let early = buf.split_off(used);
        drop(buf);
        if !self.admission.is_accepting() {
            // Shutdown began during this handshake, perhaps after it asked every
            // registered connection to close.
            conn.request_close(CloseReason::Shutdown);
        }
        let welcome = serde_json::json!({
            "type": "welcome",
            "session": conn.session.to_string(),
            "uid": &*conn.uid,
        })
        .to_string();
        let welcome = match transport {
            Transport::WebSocket => wire::ws::text(&welcome),
            Transport::Sse => wire::sse::event("welcome", None, &welcome),
        };
        probes::conn_open(conn.session.0, stream.as_raw_fd(), transport as u8);
        // A task of its own, so the long-lived future holds none of the handshake's state.
        let task = Site::ConnectionTask.instrument(client::serve(stream, conn, self.clients.clone(), slot, welcome, early));
        Site::ConnectionTask.scope(|| tokio::spawn(task));
    }

    fn admit(&self, head: &Head, transport: Transport) -> Result<Admitted, Error> {
        if head.version >= 1 && head.header("host").is_none() {
            return Err(Error::bad_request("HTTP/1.1 requests need a Host header"));
        }
        if transport == Transport::WebSocket {
            ws::check_upgrade(head)?;
        }
        let identity = self.auth.authenticate(head.bearer(), head.query("uid"))?;
        let mut topics: Vec<String> = Vec::new();
        for topic in head.query("topics").unwrap_or_default().split(',').filter(|t| !t.is_empty()) {
            if !topics.iter().any(|t| t == topic) {
                topics.push(topic.to_owned());
            }
        }
        self.clients.hub.check_topics(&topics, 0).map_err(Error::bad_request)?;
        let slot = self.admission.reserve()?;
        Ok(Admitted { uid: identity.uid, topics, slot })
    }
}
