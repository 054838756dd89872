//! A new client connection whose request is `GET /ws` (WebSocket) or `GET /sse`
//! (Server-Sent Events), handed over by the listener with its request head read:
//! authenticate ([`crate::auth`]), take a place ([`Admission`]), register with the hub, read
//! what a returning client missed ([`resume`]), answer the handshake, and hand the
//! connection to its core's driver (`client::driver`). Nothing of the handshake is kept
//! after that.


mod sse;
mod ws;

use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use pushline_alloc::Site;
use serde_json::value::RawValue;

use crate::admission::{Admission, Reservation};
use crate::auth::{Grant, Identity, Ticket, HELD};
use crate::hooks;
use crate::pusher;
use crate::client::Clients;
use crate::conn::io::{Io, Writing};
use crate::conn::{Conn, Inbox};
use crate::error::{Error, Kind};
use crate::history::read::From;
use crate::history::resume::{self, History};
use crate::history::{Cursor, Stream};
use crate::http::{self, Head};
use crate::session::{SessionId, SessionIds};
use crate::socket::Socket;
use crate::telemetry::{probes, CloseReason, Metrics, RefuseReason};
use crate::wire::{self, Transport};

/// How long a resume waits for Redis to list its session before it reads its uid's
/// stream: past it, the handshake is refused (503) rather than risk a gap.
const WRITTEN_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Why a Pusher connection is refused: the protocol's close code, the reason it is
/// counted under, and what the client is told.
struct PusherRefusal {
    code: u16,
    reason: RefuseReason,
    message: String,
}

pub struct Gateway {
    pub admission: Arc<Admission>,
    pub history: History,
    pub clients: Arc<Clients>,
    pub session_ids: SessionIds,
    pub metrics: Arc<Metrics>,
    /// Origins browsers may connect from; empty: any.
    pub allowed_origins: Vec<String>,
    /// Each core's driver's, in the cores' order: where a connection goes once admitted.
    pub inboxes: Vec<Arc<Inbox>>,
    /// `--presence-info-bytes`.
    pub presence_info_bytes: usize,
    /// Seconds a Pusher client is told to ping after, within `--idle-timeout`.
    pub pusher_activity_timeout: u32,
}

/// The first frame a connection gets: which session it is, for whom, and since when (the
/// cursor of a fresh start).
#[derive(serde::Serialize)]
struct Welcome<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    session: String,
    uid: &'a str,
    since: String,
}

/// What a successful handshake settles: who, what it may read, on which topics, and its
/// place.
struct Admitted {
    identity: Identity,
    topics: Vec<String>,
    reservation: Reservation,
    resume: resume::Request,
    /// The streams to read for the resume, and from where; empty when none was asked for.
    plan: Vec<(Stream, From)>,
}

impl Gateway {
    /// Serves the handshake of `transport` for a request whose head is `head`; `buf` holds
    /// what was read, the head being its first `used` bytes. It runs on `core`, where the
    /// connection will live.
    #[allow(clippy::too_many_arguments)]
    pub async fn connect(&self, mut stream: Socket, peer: IpAddr, head: Head, mut buf: Vec<u8>, used: usize, transport: Transport, core: usize) {
        let hub = &self.clients.hub;
        let inbox = &self.inboxes[core];
        let session = self.session_ids.next();
        let app = match transport {
            Transport::Pusher => match self.pusher_app(&head) {
                Ok(app) => app,
                Err(refusal) => return self.refuse_pusher(&mut stream, &head, refusal).await,
            },
            _ => 0,
        };
        let admitted = match (transport, self.admit(&head, peer, transport)) {
            (Transport::Pusher, Ok(admitted)) => Ok(Admitted { identity: Identity { uid: pusher::uid(session), grant: None, info: None }, ..admitted }),
            (_, Ok(admitted)) => self.authorize(admitted, session, &head, peer, transport).await,
            (_, Err(error)) => Err(error),
        };
        let admitted = admitted.and_then(|admitted| {
            let address = admitted.reservation.hand_over();
            let Identity { uid, grant, info } = admitted.identity;
            let conn = Site::Sessions.scope(|| Arc::new(Conn::new(session, uid.into(), (transport, app), grant, address, inbox.clone())));
            if let (Some(info), Some(presence)) = (info, &self.clients.presence) {
                presence.bring(conn.session.0, Arc::from(info));
            }
            match Site::Sessions.scope(|| hub.register(&conn, &admitted.topics)) {
                Ok(()) => Ok((conn, admitted.resume, admitted.plan)),
                Err(e) => {
                    self.admission.release(address);
                    Err(e)
                }
            }
        });
        let (conn, request, plan) = match admitted {
            Ok(admitted) => admitted,
            Err(error) => return self.refuse(&mut stream, &error).await,
        };
        // On Redis a push through another node finds the uid's nodes there: the client is
        // welcomed (and a resume reads its uid's stream) once Redis lists this session, or
        // a push in between would reach no one here, and the client, with no place yet in
        // its uid's stream, could not tell it missed it.
        if let Err(error) = self.written(&conn).await {
            self.abandon(&conn);
            return self.refuse(&mut stream, &error).await;
        }
        // Registered first: anything published from here on is queued, so reading history
        // now leaves no gap; what is both read and queued is written once.
        if !plan.is_empty() {
            if let Err(error) = resume::resume(&self.history, &conn, &request, plan, hub.limits().max_bytes, &self.metrics).await {
                self.abandon(&conn);
                return self.refuse(&mut stream, &error).await;
            }
        }
        let mut first = match transport {
            Transport::WebSocket | Transport::Pusher => ws::accept_response(&head),
            Transport::Sse => sse::response(self.cors(&head)),
        }
        .into_bytes();
        let early = buf.split_off(used);
        drop(buf);
        if !self.admission.is_accepting() {
            // Shutdown began during this handshake, perhaps after it asked every
            // registered connection to close.
            conn.request_close(CloseReason::Shutdown);
        }
        let since = conn.since_ms();
        let welcome = Welcome { kind: "welcome", session: conn.session.to_string(), uid: &conn.uid, since: since.to_string() };
        let welcome = serde_json::to_string(&welcome).unwrap_or_default();
        match transport {
            Transport::WebSocket => first.extend_from_slice(&wire::ws::text(&welcome)),
            Transport::Pusher => first.extend_from_slice(&wire::ws::text(&pusher::established(conn.session, self.pusher_activity_timeout))),
            Transport::Sse => {
                // A returning client's cursor stands until its `resumed` event: should this
                // connection drop mid-replay, `EventSource` comes back with it again.
                let cursor = head.header("last-event-id").or(head.query("cursor")).filter(|_| request.cursor.is_some());
                let cursor = cursor.map_or_else(|| format!("s{since}"), str::to_owned);
                first.extend_from_slice(&wire::sse::retry(conn.session.0.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32));
                first.extend_from_slice(&wire::sse::event("welcome", &welcome, &cursor));
            }
        }
        // The answer and the welcome in one write, one segment: what the socket does not
        // take now (it nearly always takes all), the driver writes first.
        let written = match stream.write(&first) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
            Err(_) => return self.abandon(&conn),
        };
        let unsent = (written < first.len()).then(|| Writing { bytes: first.into(), written, accepted_at: None });
        let socket = match stream.detach() {
            Ok(socket) => socket,
            Err(_) => return self.abandon(&conn),
        };
        // Opened only now, so that every `conn_open` has its `conn_close`.
        probes::conn_open(conn.session.0, socket.as_raw_fd(), transport as u8);
        *conn.io() = Some(Site::ConnectionTask.scope(|| Io::new(socket, unsent, early)));
        inbox.arrive(conn);
    }

    /// The app a Pusher connection names (`/app/{key}?protocol=7`), or why it is refused.
    fn pusher_app(&self, head: &Head) -> Result<u16, PusherRefusal> {
        let refused = |code, reason, message| PusherRefusal { code, reason, message };
        let key = head.path.strip_prefix("/app/").unwrap_or_default();
        let apps = self.clients.pusher.as_deref().filter(|apps| !apps.is_empty());
        let Some((index, app)) = apps.and_then(|apps| apps.by_key(key)) else {
            return Err(refused(pusher::CLOSE_UNKNOWN_APP, RefuseReason::Unauthorized, format!("App key {key} does not exist")));
        };
        if head.query("protocol") != Some(pusher::PROTOCOL) {
            let given = head.query("protocol").unwrap_or("(none)");
            return Err(refused(pusher::CLOSE_PROTOCOL, RefuseReason::BadRequest, format!("Unsupported protocol version {given}: this server speaks 7")));
        }
        if let Some(origin) = head.header("origin").filter(|origin| !app.allows_origin(origin)) {
            return Err(refused(pusher::CLOSE_TERMINATED, RefuseReason::Forbidden, format!("The origin {origin} is not allowed to connect to app {}", app.id)));
        }
        // Counted as connections register: a burst of handshakes may pass it by a few.
        if app.max_connections > 0 && self.metrics.pusher_connections(index) >= app.max_connections {
            let message = format!("Application {} is over its connection quota ({})", app.id, app.max_connections);
            return Err(refused(pusher::CLOSE_OVER_QUOTA, RefuseReason::MaxConnections, message));
        }
        Ok(index)
    }

    /// Refuses a Pusher connection as the protocol does: the WebSocket is opened, told
    /// `pusher:error` and closed with the refusal's code, so the client knows not to come
    /// back. A request that is no WebSocket upgrade is refused as that, once.
    async fn refuse_pusher(&self, stream: &mut Socket, head: &Head, refusal: PusherRefusal) {
        if let Err(error) = ws::check_upgrade(head) {
            return self.refuse(stream, &error).await;
        }
        self.metrics.refused(refusal.reason);
        let mut answer = ws::accept_response(head).into_bytes();
        answer.extend_from_slice(&wire::ws::text(&pusher::error(Some(refusal.code), &refusal.message)));
        answer.extend_from_slice(&wire::ws::close(refusal.code, &refusal.message));
        http::write_and_close(stream, &answer).await;
    }

    /// Waits until the registry has written `conn`'s session (at most [`WRITTEN_WAIT`]),
    /// where it writes sessions at all.
    async fn written(&self, conn: &Conn) -> Result<(), Error> {
        let Some(written) = self.clients.hub.written(conn.session) else { return Ok(()) };
        match tokio::time::timeout(WRITTEN_WAIT, written).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(Error::unavailable("registry unavailable: this session could not be written to Redis in time, and until it is a push through another node would not reach it; retry")),
        }
    }

    /// Undoes a registration whose handshake failed after it: the connection's queue is
    /// stopped and counted, its place given back, and it leaves the hub.
    fn abandon(&self, conn: &Arc<Conn>) {
        conn.close_outbox(&self.metrics);
        self.admission.release(conn.address);
        self.clients.hub.unregister(conn, CloseReason::Refused);
    }

    /// Whether a page on the request's origin may read the SSE stream: any origin in open
    /// mode, the listed ones (`--allowed-origins`, with credentials) otherwise; none listed
    /// means same-origin only, which needs no CORS answer.
    fn cors<'h>(&self, head: &'h Head) -> Option<(&'h str, bool)> {
        let origin = head.header("origin")?;
        if self.allowed_origins.iter().any(|o| o == origin) {
            Some((origin, true))
        } else if self.allowed_origins.is_empty() && self.clients.auth.load().is_open() {
            Some((origin, false))
        } else {
            None
        }
    }

    async fn refuse(&self, stream: &mut Socket, error: &Error) {
        self.metrics.refused(error.kind.refuse_reason());
        let extra = if error.kind == Kind::UpgradeRequired { "Sec-WebSocket-Version: 13\r\n" } else { "" };
        http::respond_error(stream, error, extra).await
    }

    /// Member info, as presence shows it: a JSON object of at most `--presence-info-bytes`.
    fn checked_info(&self, info: Box<RawValue>) -> Result<Box<RawValue>, Error> {
        let max = self.presence_info_bytes;
        if info.get().len() > max {
            return Err(Error::bad_request(format!("member info is {} bytes; at most {max} (--presence-info-bytes)", info.get().len())));
        }
        // Read whole, as any client of it will: a lone surrogate, a number out of range or
        // nesting past serde's limit is refused here, not met later by every subscriber.
        match serde_json::from_str::<serde_json::Value>(info.get()) {
            Ok(serde_json::Value::Object(_)) => Ok(info),
            Ok(_) => Err(Error::bad_request("member info (the token's `info` claim, or ?info=) must be a JSON object")),
            Err(e) => Err(Error::bad_request(format!("member info is not JSON every reader can take: {e}"))),
        }
    }

    fn admit(&self, head: &Head, peer: IpAddr, transport: Transport) -> Result<Admitted, Error> {
        if head.version >= 1 && head.header("host").is_none() {
            return Err(Error::bad_request("HTTP/1.1 requests need a Host header"));
        }
        if let Some(origin) = head.header("origin") {
            if !self.allowed_origins.is_empty() && !self.allowed_origins.iter().any(|o| o == origin) {
                return Err(Error::new(Kind::Forbidden, format!("origin `{origin}` is not allowed (--allowed-origins)")));
            }
        }
        if transport.is_websocket() {
            ws::check_upgrade(head)?;
        }
        if transport == Transport::Pusher {
            // Anonymous until it subscribes: a private channel's authorization says who.
            let identity = Identity { uid: String::new(), grant: None, info: None };
            let resume = resume::Request { cursor: None, mailbox: false };
            return Ok(Admitted { identity, topics: Vec::new(), reservation: self.admission.reserve(peer)?, resume, plan: Vec::new() });
        }
        let auth = self.clients.auth.load();
        let mut identity = auth.authenticate(head.bearer(), head.query("uid"), head.query("info"))?;
        identity.info = match (identity.info.take(), &self.clients.presence) {
            (Some(info), Some(_)) => Some(self.checked_info(info)?),
            // Without presence topics nothing shows it: not kept.
            _ => None,
        };
        let mut topics: Vec<String> = Vec::new();
        for topic in head.query("topics").unwrap_or_default().split(',').filter(|t| !t.is_empty()) {
            if !topics.iter().any(|t| t == topic) {
                topics.push(topic.to_owned());
            }
        }
        self.clients.hub.check_topics(&topics, 0).map_err(Error::bad_request)?;
        // EventSource sends its last event id on its own when it reconnects; a first
        // connect (or a WebSocket) passes `?cursor=`.
        let cursor = match head.header("last-event-id").or(head.query("cursor")) {
            Some(text) => Some(Cursor::parse(text).map_err(|e| Error::bad_request(format!("bad cursor: {e}")))?),
            None => None,
        };
        let request = resume::Request { cursor, mailbox: matches!(head.query("mailbox"), Some("1" | "true")) };
        // Checked now, with what the client asked for, so that a bad cursor costs the
        // application no question; planned again once the hooks had their say.
        resume::plan(&identity.uid, &topics, &request)?;
        let reservation = self.admission.reserve(peer)?;
        Ok(Admitted { identity, topics, reservation, resume: request, plan: Vec::new() })
    }

    /// Whether the admitted client may have the topics it asked for: the connect hook's
    /// answer when there is one (which may change the uid, the topics, the info and the
    /// expiry), else the token's rights, and the subscribe hook's answer for the topics it
    /// decides. Then the resume is planned for the topics settled on.
    async fn authorize(&self, mut admitted: Admitted, session: SessionId, head: &Head, peer: IpAddr, transport: Transport) -> Result<Admitted, Error> {
        let auth = self.clients.auth.load();
        let hooks = self.clients.hooks.as_deref();
        // Topics the application granted: held by tickets, not by the token's rights.
        let mut granted: Vec<String> = Vec::new();
        if let Some(hook) = hooks.and_then(|h| h.connect.as_ref()) {
            let claims = head.bearer().filter(|_| !auth.is_open()).and_then(crate::auth::claims_of);
            let forward = &hooks.map_or(&[][..], |h| &h.forward_headers[..]);
            let headers = forward.iter().filter_map(|name| Some((name.as_str(), head.header_joined(name)?))).collect();
            let question = hooks::Connecting {
                uid: &admitted.identity.uid,
                claims: claims.as_deref(),
                address: peer.to_string(),
                transport: transport.into(),
                topics: &admitted.topics,
                headers,
            };
            let answer: hooks::Admitted = hook.ask(&question).await?;
            self.apply(&mut admitted, answer, &mut granted)?;
        }
        let identity = &admitted.identity;
        let mut decided = Vec::new();
        for topic in admitted.topics.iter().filter(|t| !granted.contains(t)) {
            match hooks.filter(|h| h.decides(topic)) {
                Some(_) => decided.push(topic),
                None if auth.may_read(&identity.uid, identity.grant.as_ref(), topic) => {}
                None => return Err(Error::new(Kind::Forbidden, format!("not allowed to read topic `{topic}`"))),
            }
        }
        if let Some(hooks) = hooks.filter(|_| !decided.is_empty()) {
            hooks.may_subscribe_all(&identity.uid, session.0, decided).await.map_err(|(_, e)| e)?;
        }
        if let Some(grant) = admitted.identity.grant.as_mut() {
            let ticketed = admitted.topics.iter().filter(|t| granted.contains(t) || hooks.is_some_and(|h| h.decides(t)));
            grant.tickets.extend(ticketed.map(|topic| Ticket { topic: topic.clone(), expires_at: HELD }));
        }
        admitted.plan = resume::plan(&admitted.identity.uid, &admitted.topics, &admitted.resume)?;
        Ok(admitted)
    }

    /// Takes the connect hook's answer: the uid, topics (into `granted`), info and expiry
    /// it names in place of the client's.
    fn apply(&self, admitted: &mut Admitted, answer: hooks::Admitted, granted: &mut Vec<String>) -> Result<(), Error> {
        let broken = |what: String| Error::unavailable(format!("the connect hook's answer {what}"));
        let identity = &mut admitted.identity;
        if let Some(uid) = answer.uid {
            crate::auth::check_uid(&uid).map_err(|e| broken(format!("names a uid this server refuses: {e}")))?;
            identity.uid = uid;
        }
        if let Some(topics) = answer.topics {
            let mut seen = std::collections::HashSet::with_capacity(topics.len());
            let distinct: Vec<String> = topics.into_iter().filter(|t| seen.insert(t.clone())).collect();
            self.clients.hub.check_topics(&distinct, 0).map_err(|e| broken(format!("names topics this server refuses: {e}")))?;
            granted.clone_from(&distinct);
            admitted.topics = distinct;
        }
        if let Some(info) = answer.info {
            identity.info = match &self.clients.presence {
                Some(_) => Some(self.checked_info(info).map_err(|e| broken(format!("has {}", e.message)))?),
                None => None,
            };
        }
        if let Some(expire_at) = answer.expire_at {
            match identity.grant.as_mut() {
                Some(grant) => grant.expires_at = grant.expires_at.min(expire_at),
                None => identity.grant = Some(Grant::open_until(expire_at)),
            }
        }
        Ok(())
    }
}
