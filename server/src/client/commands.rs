//! What a WebSocket client may say once connected, as JSON text messages, each answered
//! with one reply frame: `ping`; `subscribe` (to topics its token grants, or that a
//! per-subscription `token` grants); `unsubscribe`; `refresh` (a fresh token for the same
//! uid, whose rights apply from then on); `publish` (to a topic it may publish to, answered
//! once the registry took it: see [`super::publish`]); `presence` (a page of a presence
//! topic's members and its counts, for a topic it may read).

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::publish::{self, Publish};
use super::{Clients, Refused};
use crate::auth::{Grant, Ticket, HELD};
use crate::conn::io::Window;
use crate::conn::Conn;
use crate::hub::Hub;
use crate::presence::{Page, MAX_PAGE};
use crate::telemetry::{probes, ClientError};
use crate::wire::ws;

/// `{"type":"pong"}` as a server text frame.
pub const PONG: &[u8] = b"\x81\x0f{\"type\":\"pong\"}";

/// The heartbeat, every 270 s from every client: recognised without parsing.
const PING: &str = r#"{"type":"ping"}"#;

#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Ping,
    /// Topics, and a token granting them for this subscription only.
    Subscribe(Vec<String>, Option<String>),
    Unsubscribe(Vec<String>),
    Refresh(String),
    Publish(Publish),
    /// A page of a topic's members after the cursor, at most `limit`.
    Presence { topic: String, cursor: Option<String>, limit: Option<usize> },
}

/// A field that is there, whatever it holds (`null` too): `data` may be any JSON.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

pub fn parse(text: &str) -> Result<Command, Refused> {
    #[derive(Deserialize)]
    struct Frame<'a> {
        #[serde(rename = "type", borrow)]
        kind: Cow<'a, str>,
        #[serde(default)]
        topics: Vec<String>,
        #[serde(default)]
        token: Option<String>,
        #[serde(default)]
        topic: Option<String>,
        #[serde(default, borrow, deserialize_with = "present")]
        data: Option<&'a RawValue>,
        #[serde(default)]
        echo: bool,
        #[serde(default, rename = "ref")]
        reference: Option<String>,
        #[serde(default)]
        cursor: Option<String>,
        #[serde(default)]
        limit: Option<usize>,
    }
    if text == PING {
        return Ok(Command::Ping);
    }
    let frame: Frame = serde_json::from_str(text)
        .map_err(|e| Refused { reason: ClientError::BadJson, message: format!("bad JSON: {e}") })?;
    match &*frame.kind {
        "ping" => Ok(Command::Ping),
        "subscribe" => Ok(Command::Subscribe(frame.topics, frame.token)),
        "unsubscribe" => Ok(Command::Unsubscribe(frame.topics)),
        "refresh" => match frame.token {
            Some(token) => Ok(Command::Refresh(token)),
            None => Err(Refused { reason: ClientError::BadToken, message: "refresh needs a `token`".into() }),
        },
        "publish" => match (frame.topic, frame.data) {
            (Some(topic), Some(data)) => Ok(Command::Publish(Publish { topic, data: data.to_owned(), echo: frame.echo, reference: frame.reference })),
            _ => Err(Refused { reason: ClientError::BadJson, message: "publish needs a `topic` and `data`".into() }),
        },
        "presence" => match frame.topic {
            Some(topic) => Ok(Command::Presence { topic, cursor: frame.cursor, limit: frame.limit }),
            None => Err(Refused { reason: ClientError::BadJson, message: "presence needs a `topic`".into() }),
        },
        other => Err(Refused {
            reason: ClientError::UnknownType,
            message: format!("unknown type `{other}`; expected ping, subscribe, unsubscribe, refresh, publish or presence"),
        }),
    }
}

/// What carrying out a message gave: the reply, and how many topics it joined or left.
pub struct Handled {
    pub reply: Bytes,
    pub topic_changes: usize,
}

impl Handled {
    fn reply(reply: Bytes) -> Handled {
        Handled { reply, topic_changes: 0 }
    }
}

/// Carries out one client message on `conn`, whose command window is `window`. A
/// publish that went out, and a presence page, have an empty reply: their answer comes
/// later, on the connection's queue.
pub fn handle(text: &str, conn: &Arc<Conn>, clients: &Clients, window: &mut Window) -> Handled {
    let refused = match parse(text) {
        Ok(Command::Ping) => {
            probes::heartbeat(conn.session.0, 0);
            return Handled::reply(Bytes::from_static(PONG));
        }
        Ok(Command::Subscribe(topics, token)) => match subscribe(conn, clients, &topics, token.as_deref()) {
            Ok(Subscribed::Now) => return Handled { reply: topics_reply("subscribed", &topics), topic_changes: topics.len() },
            Ok(Subscribed::Asking) => return Handled { reply: Bytes::new(), topic_changes: topics.len() },
            Err(refused) => refused,
        },
        Ok(Command::Unsubscribe(topics)) => {
            clients.hub.unsubscribe(conn, &topics);
            if let Some(grant) = conn.state().grant.as_deref_mut() {
                grant.tickets.retain(|t| !topics.contains(&t.topic));
            }
            return Handled { reply: topics_reply("unsubscribed", &topics), topic_changes: topics.len() };
        }
        Ok(Command::Refresh(token)) => match refresh(conn, clients, &token) {
            Ok(reply) => return Handled { reply: reply.0, topic_changes: reply.1 },
            Err(refused) => refused,
        },
        Ok(Command::Publish(publish)) => return Handled::reply(publish::start(conn, clients, publish, window).unwrap_or_default()),
        Ok(Command::Presence { topic, cursor, limit }) => match presence(conn, clients, topic, cursor, limit) {
            Ok(()) => return Handled::reply(Bytes::new()),
            Err(refused) => refused,
        },
        Err(refused) => refused,
    };
    clients.metrics.client_error(refused.reason);
    Handled::reply(error_reply(&refused.message))
}

/// Verifies a token the client sent for its own uid.
fn own_token(conn: &Conn, clients: &Clients, token: &str) -> Result<Grant, Refused> {
    let bad = |message: String| Refused { reason: ClientError::BadToken, message };
    let (sub, grant) = clients.auth.load().verify(token).map_err(|e| bad(e.message))?;
    if sub != *conn.uid {
        return Err(bad(format!("the token is for `{sub}`, not this connection's uid")));
    }
    Ok(grant)
}

/// How a subscribe went: done, or waiting for the subscribe hook, whose answer comes on
/// the connection's queue.
enum Subscribed {
    Now,
    Asking,
}

/// Subscribes to `topics` if the connection's token (or `token`, for this subscription)
/// grants them, and the subscribe hook admits those it decides. Topics only `token` grants
/// last until it expires; those the hook admitted, until left. A connection whose own
/// token expired subscribes to nothing until it is refreshed.
fn subscribe(conn: &Arc<Conn>, clients: &Clients, topics: &[String], token: Option<&str>) -> Result<Subscribed, Refused> {
    let extra = token.map(|t| own_token(conn, clients, t)).transpose()?;
    let auth = clients.auth.load();
    let hooks = clients.hooks.as_ref().filter(|h| topics.iter().any(|t| h.decides(t)));
    let forbidden = |topic: &String| Refused { reason: ClientError::Forbidden, message: format!("not allowed to read topic `{topic}`") };
    let mut own: Vec<&String> = Vec::new();
    let mut asked: Vec<&String> = Vec::new();
    let ticketed: Vec<&String> = {
        let state = conn.state();
        if state.grant.as_deref().is_some_and(|g| g.expired(crate::clock::wall_ms())) {
            let message = "your token expired: send {\"type\":\"refresh\",\"token\":...} before subscribing".to_owned();
            return Err(Refused { reason: ClientError::BadToken, message });
        }
        let mut ticketed = Vec::new();
        for topic in topics {
            if state.topics.iter().any(|t| **t == **topic) {
                continue;
            }
            if hooks.is_some_and(|h| h.decides(topic)) {
                asked.push(topic);
                continue;
            }
            if auth.may_read(&conn.uid, state.grant.as_deref(), topic) {
                own.push(topic);
                continue;
            }
            match &extra {
                Some(g) if g.rights.allows(topic) => ticketed.push(topic),
                _ => return Err(forbidden(topic)),
            }
        }
        ticketed
    };
    let tickets = |expires_at| move |topic: &&String| Ticket { topic: (*topic).clone(), expires_at };
    let mut new_tickets: Vec<Ticket> = ticketed.iter().map(tickets(extra.as_ref().map_or(0, |g| g.expires_at))).collect();
    let (Some(hooks), false) = (hooks, asked.is_empty()) else {
        add(conn, &clients.hub, topics, &own, new_tickets)?;
        return Ok(Subscribed::Now);
    };
    // Refused now rather than after the application was asked.
    let held = conn.state().topics.len();
    clients.hub.check_topics(&[], held + own.len() + ticketed.len() + asked.len()).map_err(|message| Refused { reason: ClientError::TooManyTopics, message })?;
    new_tickets.extend(asked.iter().map(tickets(HELD)));
    let asked: Vec<String> = asked.into_iter().cloned().collect();
    let own: Vec<String> = own.into_iter().cloned().collect();
    let (conn, hub, metrics, hooks, topics) = (conn.clone(), clients.hub.clone(), clients.metrics.clone(), hooks.clone(), topics.to_vec());
    // Nothing more is read from the client until the application has answered: its next
    // command (an unsubscribe of the same topic, say) comes after this one.
    conn.begin_exclusive_request();
    tokio::spawn(async move {
        let answer = match hooks.may_subscribe_all(&conn.uid, conn.session.0, &asked).await {
            Err((topic, e)) => {
                metrics.client_error(ClientError::Forbidden);
                serde_json::json!({ "type": "error", "error": e.message, "topic": topic, "retry_after": e.retry_after() }).to_string()
            }
            Ok(()) => {
                let own: Vec<&String> = own.iter().collect();
                match add(&conn, &hub, &topics, &own, new_tickets) {
                    Ok(()) => serde_json::json!({ "type": "subscribed", "topics": topics }).to_string(),
                    Err(refused) => {
                        metrics.client_error(refused.reason);
                        serde_json::json!({ "type": "error", "error": refused.message }).to_string()
                    }
                }
            }
        };
        conn.answer_exclusive_request(&[&answer], hub.limits(), &metrics);
    });
    Ok(Subscribed::Asking)
}

/// Adds `topics` to the connection; `own` are those its token grants, `tickets` hold the
/// others.
fn add(conn: &Arc<Conn>, hub: &Hub, topics: &[String], own: &[&String], tickets: Vec<Ticket>) -> Result<(), Refused> {
    hub.subscribe(conn, topics).map_err(|message| Refused { reason: ClientError::TooManyTopics, message })?;
    if conn.is_closed() {
        // Closed while the hook was asked, perhaps after it was unregistered: what was
        // just added would be held by no one.
        hub.unsubscribe(conn, topics);
        return Ok(());
    }
    if let Some(grant) = conn.state().grant.as_deref_mut() {
        // A topic the connection's own token grants is held by it, whatever ticket it had.
        grant.tickets.retain(|t| !own.iter().any(|topic| **topic == t.topic) && !tickets.iter().any(|new| new.topic == t.topic));
        grant.tickets.extend(tickets);
    }
    Ok(())
}

/// Takes a fresh token: its expiry and rights apply from now; topics it no longer grants
/// are left, but for those a ticket holds (a per-subscription token's, or the
/// application's). Returns the reply and the topics left.
fn refresh(conn: &Arc<Conn>, clients: &Clients, token: &str) -> Result<(Bytes, usize), Refused> {
    let mut grant = own_token(conn, clients, token)?;
    let expires_at = grant.expires_at;
    let auth = clients.auth.load();
    let revoked: Vec<String> = {
        let mut state = conn.state();
        if let Some(old) = state.grant.as_deref_mut() {
            grant.tickets = std::mem::take(&mut old.tickets);
        }
        state.grant = Some(Box::new(grant));
        let grant = state.grant.as_deref();
        state.topics.iter().filter(|t| !auth.may_read(&conn.uid, grant, t) && !grant.is_some_and(|g| g.has_ticket(t))).map(|t| t.to_string()).collect()
    };
    clients.hub.unsubscribe(conn, &revoked);
    let reply = serde_json::json!({ "type": "refreshed", "expires_at": expires_at, "revoked": revoked });
    Ok((ws::text(&reply.to_string()), revoked.len()))
}

/// A page of `topic`'s members, for a client that may read the topic: read where the
/// members are (Redis, on many nodes), and queued on the connection as its answer.
fn presence(conn: &Arc<Conn>, clients: &Clients, topic: String, cursor: Option<String>, limit: Option<usize>) -> Result<(), Refused> {
    crate::hub::check_topic_name(&topic).map_err(|message| Refused { reason: ClientError::BadTopic, message })?;
    let presence = clients.presence.clone().filter(|p| p.is_presence_topic(&topic)).ok_or_else(|| Refused {
        reason: ClientError::Forbidden,
        message: format!("`{topic}` is not a presence topic (--presence-topics)"),
    })?;
    let may_read = {
        let state = conn.state();
        let grant = state.grant.as_deref();
        // A topic a per-subscription token granted is readable while its ticket lasts.
        clients.auth.load().may_read(&conn.uid, grant, &topic) || grant.is_some_and(|g| g.tickets.iter().any(|t| t.topic == topic))
    };
    if !may_read {
        return Err(Refused { reason: ClientError::Forbidden, message: format!("not allowed to read topic `{topic}`") });
    }
    let limit = limit.unwrap_or(MAX_PAGE).clamp(1, MAX_PAGE);
    let (conn, registry, hub, metrics) = (conn.clone(), clients.publishing.registry.clone(), clients.hub.clone(), clients.metrics.clone());
    conn.begin_request();
    tokio::spawn(async move {
        let answer = match registry.presence_page(&presence, &topic, cursor.as_deref(), limit).await {
            Ok(page) => serde_json::to_string(&Page { kind: Some("presence"), ..page }).unwrap_or_default(),
            Err(e) => serde_json::json!({"type": "error", "error": format!("presence unavailable; retry: {}", e.reason), "topic": topic}).to_string(),
        };
        conn.answer_request(&answer, hub.limits(), &metrics);
    });
    Ok(())
}

fn topics_reply(kind: &str, topics: &[String]) -> Bytes {
    ws::text(&serde_json::json!({ "type": kind, "topics": topics }).to_string())
}

pub fn error_reply(error: &str) -> Bytes {
    ws::text(&serde_json::json!({ "type": "error", "error": error }).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_pong_is_a_text_frame() {
        assert_eq!(PONG, &ws::text(r#"{"type":"pong"}"#)[..]);
    }

    #[test]
    fn commands_parse_or_say_why_not() {
        assert_eq!(parse(PING).unwrap(), Command::Ping);
        assert_eq!(parse(r#"{ "type" : "ping" }"#).unwrap(), Command::Ping);
        assert_eq!(parse(r#"{"type":"subscribe","topics":["a","b"]}"#).unwrap(), Command::Subscribe(vec!["a".into(), "b".into()], None));
        assert_eq!(parse(r#"{"type":"refresh","token":"t"}"#).unwrap(), Command::Refresh("t".into()));
        assert_eq!(parse(r#"{"type":"refresh"}"#).unwrap_err().reason, ClientError::BadToken);
        assert_eq!(parse(r#"{"type":"unsubscribe"}"#).unwrap(), Command::Unsubscribe(vec![]));
        assert_eq!(parse("{").unwrap_err().reason, ClientError::BadJson);
        assert_eq!(parse(r#"{"type":"dance"}"#).unwrap_err().reason, ClientError::UnknownType);
        assert_eq!(parse(r#"{"type":"subscribe","topics":"a"}"#).unwrap_err().reason, ClientError::BadJson);
        let Command::Publish(publish) = parse(r#"{"type":"publish","topic":"chat","data":{"t": [1, 2]},"ref":"a1"}"#).unwrap() else { panic!("not a publish") };
        assert_eq!((publish.topic.as_str(), publish.data.get(), publish.echo, publish.reference.as_deref()), ("chat", r#"{"t": [1, 2]}"#, false, Some("a1")));
        assert_eq!(parse(r#"{"type":"publish","topic":"chat"}"#).unwrap_err().reason, ClientError::BadJson);
        let Command::Publish(publish) = parse(r#"{"type":"publish","topic":"chat","data":null}"#).unwrap() else { panic!("not a publish") };
        assert_eq!(publish.data.get(), "null", "null is data like any JSON");
        assert_eq!(parse(r#"{"type":"publish","data":1}"#).unwrap_err().reason, ClientError::BadJson);
    }
}
