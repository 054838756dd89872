//! What a Pusher client may say (protocol 7): `pusher:ping`, and `pusher:pong` to the
//! server's (sent when it has been silent for its `activity_timeout`, see `sweep`); `pusher:subscribe` to a
//! public channel, to a private one (`private-`, `private-encrypted-`) or a presence one
//! with the authorization its application signed, to a cache channel (then its last event,
//! or `pusher:cache_miss`), or to its own `#server-to-user-` channel once signed in;
//! `pusher:unsubscribe`; `pusher:signin` (user authentication, signed by the application);
//! and `client-` events on a private or presence channel it holds, when the apps allow
//! them (`--pusher-client-events`), at most 10 a second.
//!
//! A client event goes out like a client's publish: through the registry, to the
//! channel's subscribers on every node, not back to its sender. A signed-in connection
//! holds its user's topic, which is how the application reaches (and ends) the user's
//! connections on every node.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::commands::Handled;
use super::Clients;
use crate::auth::api_keys::CLIENTS_PUBLISHER;
use crate::conn::io::Window;
use crate::conn::Conn;
use crate::history::read::From;
use crate::history::resume::History;
use crate::history::Stream;
use crate::pusher::{self, App, Kind};
use crate::registry::relay::Target;
use crate::registry::Job;
use crate::telemetry::{ClientError, DropReason, PusherSource};
use crate::wire::{json, ws, Draft, PusherEvent};

/// A reason to close the connection, with the protocol's code.
pub struct Close {
    pub code: u16,
    pub reason: &'static str,
}

#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(borrow)]
    event: Cow<'a, str>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
    #[serde(default, borrow)]
    channel: Option<Cow<'a, str>>,
}

/// A subscription's channel alone, to refuse one whose other fields are not read.
#[derive(Deserialize)]
struct Channel {
    channel: String,
}

#[derive(Deserialize)]
struct Subscription {
    channel: String,
    #[serde(default)]
    auth: Option<String>,
    /// A presence channel's member, as the application signed it: a JSON string of
    /// `{"user_id":..,"user_info":..}`.
    #[serde(default)]
    channel_data: Option<String>,
}

/// The member a presence subscription names.
#[derive(Deserialize)]
struct ChannelData<'a> {
    #[serde(borrow)]
    user_id: &'a RawValue,
    #[serde(default, borrow)]
    user_info: Option<&'a RawValue>,
}

/// Most members a presence channel's subscription lists (its count is the whole one).
const MAX_PRESENCE_MEMBERS: usize = crate::presence::MAX_PAGE;

fn reply(text: &str) -> Handled {
    Handled { reply: ws::text(text), topic_changes: 0 }
}

fn error(clients: &Clients, reason: ClientError, message: &str) -> Handled {
    clients.metrics.client_error(reason);
    reply(&pusher::error(None, message))
}

/// The `data` of a `pusher:` event: an object, or (as some clients send it) a string
/// holding one.
fn data_of<T: DeserializeOwned>(data: Option<&RawValue>) -> Option<T> {
    let data = data?;
    serde_json::from_str(data.get()).ok().or_else(|| serde_json::from_str::<String>(data.get()).ok().and_then(|inner| serde_json::from_str(&inner).ok()))
}

fn subscription_error(channel: &str, kind: &str, status: u16, message: &str) -> Handled {
    let data = serde_json::json!({ "type": kind, "error": message, "status": status }).to_string();
    reply(&pusher::frame("pusher:subscription_error", Some(channel), &data))
}

/// Carries out one Pusher frame from `conn`, whose command window is `window`.
pub fn handle(text: &str, conn: &Arc<Conn>, clients: &Clients, window: &mut Window) -> Result<Handled, Close> {
    let Some(app) = clients.pusher.as_deref().and_then(|apps| apps.get(conn.app)) else {
        return Err(Close { code: pusher::CLOSE_UNKNOWN_APP, reason: "the app is no longer configured" });
    };
    if !text.trim_start().starts_with('{') {
        return Ok(error(clients, ClientError::BadJson, "a frame is a JSON object"));
    }
    let frame: Frame = match serde_json::from_str(text) {
        Ok(frame) => frame,
        Err(e) => return Ok(error(clients, ClientError::BadJson, &format!("bad JSON: {e}"))),
    };
    match &*frame.event {
        "pusher:ping" => Ok(reply(r#"{"event":"pusher:pong","data":"{}"}"#)),
        "pusher:pong" => Ok(Handled { reply: Bytes::new(), topic_changes: 0 }),
        // A subscribe or an unsubscribe is a topic change, refused or not: pusher-js sends
        // all of a page's at once, and a handful refused (a lapsed authorization, a channel
        // past the connection's topics) must not count as commands a second, whose limit
        // closes the connection (pusher-js then reconnects and sends them all again).
        "pusher:subscribe" => {
            let handled = match data_of::<Subscription>(frame.data) {
                Some(subscription) => subscribe(conn, clients, app, subscription),
                None => match data_of::<Channel>(frame.data) {
                    // Refused on its channel, so the client's subscription ends rather than waits.
                    Some(Channel { channel }) => {
                        clients.metrics.client_error(ClientError::BadJson);
                        subscription_error(&channel, "InvalidRequest", 400, "`auth` and `channel_data` are strings (`channel_data` a JSON string of {user_id, user_info})")
                    }
                    None => error(clients, ClientError::BadJson, "pusher:subscribe needs data with a `channel`"),
                },
            };
            Ok(Handled { topic_changes: handled.topic_changes.max(1), ..handled })
        }
        "pusher:unsubscribe" => {
            #[derive(Deserialize)]
            struct Unsubscription {
                channel: String,
            }
            let handled = match data_of::<Unsubscription>(frame.data) {
                // A signed-in connection keeps its user's channel: the application ends
                // the user's connections through it.
                Some(u) if Kind::of(&u.channel) == Kind::ServerToUser => Handled { reply: Bytes::new(), topic_changes: 1 },
                Some(u) => {
                    clients.hub.unsubscribe(conn, &[pusher::topic(app, &u.channel)]);
                    Handled { reply: Bytes::new(), topic_changes: 1 }
                }
                None => error(clients, ClientError::BadJson, "pusher:unsubscribe needs data with a `channel`"),
            };
            Ok(Handled { topic_changes: handled.topic_changes.max(1), ..handled })
        }
        "pusher:signin" => match data_of::<Signin>(frame.data) {
            Some(signin) => Ok(signin_user(conn, clients, app, signin)),
            None => {
                clients.metrics.client_error(ClientError::BadJson);
                Ok(reply(&pusher::error(Some(pusher::CLOSE_TERMINATED), "pusher:signin needs data with the strings `auth` and `user_data`")))
            }
        },
        event if event.starts_with("client-") => client_event(conn, clients, app, event, frame.channel.as_deref(), frame.data, window),
        event => Ok(error(clients, ClientError::UnknownType, &format!("unknown event `{event}`; expected pusher:ping, pusher:subscribe, pusher:unsubscribe, pusher:signin or a client- event"))),
    }
}

fn subscribe(conn: &Arc<Conn>, clients: &Clients, app: &App, subscription: Subscription) -> Handled {
    let channel = subscription.channel.as_str();
    if let Err(e) = pusher::check_channel(channel) {
        clients.metrics.client_error(ClientError::BadTopic);
        return subscription_error(channel, "InvalidChannel", 400, &e);
    }
    match Kind::of(channel) {
        Kind::Public => {}
        Kind::Private => {
            let socket_id = pusher::socket_id(conn.session);
            let auth = subscription.auth.as_deref().unwrap_or_default();
            if !pusher::authorized(app, auth, &socket_id, channel, None) {
                clients.metrics.client_error(ClientError::Forbidden);
                return subscription_error(channel, "AuthError", 401, &format!("Invalid signature: expected HMAC-SHA256 of `{socket_id}:{channel}` with the app's secret"));
            }
        }
        Kind::Presence => return subscribe_presence(conn, clients, app, subscription),
        // Held since the connection signed in as that user; asked for by pusher-js then.
        Kind::ServerToUser if holds(conn, &pusher::topic(app, channel)) => return succeeded(channel),
        Kind::ServerToUser => {
            clients.metrics.client_error(ClientError::Forbidden);
            return subscription_error(channel, "AuthError", 403, "only a connection signed in as this user (pusher:signin) holds its channel");
        }
    }
    let topic = pusher::topic(app, channel);
    if let Err(message) = clients.hub.subscribe(conn, std::slice::from_ref(&topic)) {
        clients.metrics.client_error(ClientError::TooManyTopics);
        return subscription_error(channel, "LimitReached", 400, &message);
    }
    if !pusher::is_cache(channel) {
        return Handled { topic_changes: 1, ..succeeded(channel) };
    }
    let (conn, hub, metrics, history) = (conn.clone(), clients.hub.clone(), clients.metrics.clone(), clients.publishing.registry.history());
    let channel = channel.to_owned();
    conn.begin_exclusive_request();
    tokio::spawn(async move {
        let last = last_event(&history, &topic, &channel).await;
        conn.answer_exclusive_request(&[&pusher::subscription_succeeded(&channel), &last], hub.limits(), &metrics);
    });
    Handled { reply: Bytes::new(), topic_changes: 1 }
}

fn succeeded(channel: &str) -> Handled {
    reply(&pusher::subscription_succeeded(channel))
}

fn holds(conn: &Conn, topic: &str) -> bool {
    conn.state().topics.iter().any(|t| **t == *topic)
}

/// A cache channel's last event, for a new subscriber: the newest the application
/// triggered that its topic's history keeps (`--history-ttl`), or `pusher:cache_miss`.
async fn last_event(history: &History, topic: &str, channel: &str) -> String {
    let miss = || pusher::frame("pusher:cache_miss", Some(channel), r#""{}""#);
    let stream = Stream::Topic(Arc::from(topic));
    if !history.keeps(&stream) {
        return miss();
    }
    match history.read(&[(stream, From::Start)]).await {
        // The last event the application triggered: a client's `client-` event on a
        // private cache channel is not the state later subscribers are given.
        Ok(found) => found
            .into_iter()
            .next()
            .and_then(|found| {
                found.messages.iter().rev().map(|m| m.envelope()).find(|envelope| !envelope.starts_with(br#"{"event":"client-"#)).and_then(|e| std::str::from_utf8(e).ok().map(str::to_owned))
            })
            .unwrap_or_else(miss),
        Err(e) => {
            tracing::debug!(error = %e, channel, "a cache channel's last event could not be read; told as a miss");
            miss()
        }
    }
}

#[derive(Deserialize)]
struct Signin {
    auth: String,
    /// JSON of the user, as the application signed it: `{"id":"..",..}`.
    user_data: String,
}

/// `pusher:signin`: the application signed `socket_id::user::user_data`; the connection
/// then holds the user's `#server-to-user-<id>` topic, which the application sends to
/// and ends the user's connections through.
fn signin_user(conn: &Arc<Conn>, clients: &Clients, app: &App, signin: Signin) -> Handled {
    let refused = |message: &str| {
        clients.metrics.client_error(ClientError::Forbidden);
        reply(&pusher::error(Some(pusher::CLOSE_TERMINATED), message))
    };
    let socket_id = pusher::socket_id(conn.session);
    if !pusher::signed_by(app, &signin.auth, &format!("{socket_id}::user::{}", signin.user_data)) {
        return refused(&format!("Invalid signature: expected HMAC-SHA256 of `{socket_id}::user::<user_data>` with the app's secret"));
    }
    #[derive(Deserialize)]
    struct User {
        id: String,
    }
    let user = match serde_json::from_str::<User>(&signin.user_data) {
        Ok(user) => user,
        Err(e) => return refused(&format!("user_data is not a JSON object with a string `id`: {e}")),
    };
    // Echoed back to the client: held to what strict decoders read, as `channel_data` is.
    if let Err(unfit) = json::compact(&signin.user_data) {
        return refused(&format!("user_data {unfit}"));
    }
    if let Err(e) = pusher::check_user_id(&user.id) {
        return refused(&e);
    }
    let topic = pusher::user_topic(app, &user.id);
    let user_prefix = pusher::topic(app, pusher::SERVER_TO_USER);
    let signed_in_as = conn.state().topics.iter().find(|t| t.starts_with(&user_prefix)).cloned();
    let topic_changes = match signed_in_as {
        Some(held) if *held == *topic => 0,
        Some(_) => return refused("this connection is signed in as another user"),
        None => {
            if let Err(message) = clients.hub.subscribe(conn, std::slice::from_ref(&topic)) {
                clients.metrics.client_error(ClientError::TooManyTopics);
                return reply(&pusher::error(Some(pusher::CLOSE_TERMINATED), &format!("the user's channel is one of the connection's topics: {message}")));
            }
            1
        }
    };
    let data = serde_json::json!({ "user_data": signin.user_data });
    Handled { reply: ws::text(&pusher::frame("pusher:signin_success", None, &pusher::stringified(&data))), topic_changes }
}

/// A presence channel: the signature covers the member too; the member joins through
/// presence (once per user, however many connections), and the subscription's answer,
/// once the members are read, lists them.
fn subscribe_presence(conn: &Arc<Conn>, clients: &Clients, app: &App, subscription: Subscription) -> Handled {
    let channel = subscription.channel.as_str();
    let socket_id = pusher::socket_id(conn.session);
    let data = subscription.channel_data.as_deref().unwrap_or_default();
    if !pusher::authorized(app, subscription.auth.as_deref().unwrap_or_default(), &socket_id, channel, Some(data)) {
        clients.metrics.client_error(ClientError::Forbidden);
        return subscription_error(channel, "AuthError", 401, &format!("Invalid signature: expected HMAC-SHA256 of `{socket_id}:{channel}:<channel_data>` with the app's secret"));
    }
    let Some(presence) = clients.presence.clone() else {
        return subscription_error(channel, "NotSupported", 501, "presence is off on this server");
    };
    let member = match serde_json::from_str::<ChannelData>(data) {
        Ok(member) => member,
        Err(e) => return subscription_error(channel, "InvalidChannelData", 400, &format!("channel_data is not {{\"user_id\":..,\"user_info\":..}}: {e}")),
    };
    // A string is the id it spells; a number, the id as written (`1` is `"1"`, and no
    // two numbers written differently are one user).
    let user = match serde_json::from_str::<serde_json::Value>(member.user_id.get()) {
        Ok(serde_json::Value::String(user)) => user,
        Ok(serde_json::Value::Number(_)) => member.user_id.get().to_owned(),
        _ => return subscription_error(channel, "InvalidChannelData", 400, "user_id is a string or a number"),
    };
    if user.is_empty() || user.len() > pusher::MAX_USER_ID {
        return subscription_error(channel, "InvalidChannelData", 400, &format!("user_id is 1 to {} bytes", pusher::MAX_USER_ID));
    }
    let info = match member.user_info {
        Some(info) if info.get().len() > presence.info_bytes() => {
            return subscription_error(channel, "InvalidChannelData", 400, &format!("user_info is over {} bytes (--presence-info-bytes)", presence.info_bytes()));
        }
        Some(info) => match json::compact(info.get()) {
            Ok(compact) => RawValue::from_string(compact.into_owned()).ok().map(Arc::from),
            Err(unfit) => return subscription_error(channel, "InvalidChannelData", 400, &format!("user_info {unfit}")),
        },
        None => None,
    };
    // Told as its own member even before its write is read back (on Redis).
    let own_info = info.as_ref().and_then(|i: &Arc<RawValue>| serde_json::from_str::<serde_json::Value>(i.get()).ok()).unwrap_or(serde_json::Value::Null);
    if let Err(e) = presence.bring_user(conn.session.0, &user, info) {
        return subscription_error(channel, "InvalidChannelData", 400, &e);
    }
    let topic = pusher::topic(app, channel);
    if let Err(message) = clients.hub.subscribe(conn, std::slice::from_ref(&topic)) {
        clients.metrics.client_error(ClientError::TooManyTopics);
        return subscription_error(channel, "LimitReached", 400, &message);
    }
    let (conn, hub, metrics, registry) = (conn.clone(), clients.hub.clone(), clients.metrics.clone(), clients.publishing.registry.clone());
    let channel = channel.to_owned();
    // Its next frame is read once this is answered: an unsubscribe comes after it.
    conn.begin_exclusive_request();
    tokio::spawn(async move {
        let mut last = None;
        let answer = match registry.presence_page(&presence, &topic, None, MAX_PRESENCE_MEMBERS).await {
            Ok(page) => {
                let mut ids: Vec<String> = page.members.iter().map(|m| m.uid.clone()).collect();
                let mut hash = serde_json::Map::new();
                for member in page.members {
                    let info = member.info.and_then(|i| serde_json::from_str(i.get()).ok()).unwrap_or(serde_json::Value::Null);
                    hash.insert(member.uid, info);
                }
                // On Redis this node's own write may not be read back yet.
                let mut count = page.count;
                if !hash.contains_key(&user) {
                    // In its place: the ids are listed by user id.
                    let at = ids.binary_search(&user).unwrap_or_else(|at| at);
                    ids.insert(at, user.clone());
                    hash.insert(user.clone(), own_info);
                    count = count.max(ids.len());
                }
                let presence = serde_json::json!({ "presence": { "count": count, "ids": ids, "hash": hash } });
                if pusher::is_cache(&channel) {
                    last = Some(last_event(&registry.history(), &topic, &channel).await);
                }
                pusher::frame("pusher_internal:subscription_succeeded", Some(&channel), &pusher::stringified(&presence))
            }
            Err(e) => {
                hub.unsubscribe(&conn, &[topic]);
                let data = serde_json::json!({ "type": "Unavailable", "error": format!("presence unavailable; retry: {}", e.reason), "status": 503 });
                pusher::frame("pusher:subscription_error", Some(&channel), &data.to_string())
            }
        };
        let answers: Vec<&str> = std::iter::once(answer.as_str()).chain(last.as_deref()).collect();
        conn.answer_exclusive_request(&answers, hub.limits(), &metrics);
    });
    Handled { reply: Bytes::new(), topic_changes: 1 }
}

fn client_event(conn: &Arc<Conn>, clients: &Clients, app: &App, event: &str, channel: Option<&str>, data: Option<&RawValue>, window: &mut Window) -> Result<Handled, Close> {
    if !app.client_events {
        return Ok(error(clients, ClientError::Forbidden, "To send client events, you must enable this feature (--pusher-client-events, or the app's client_events)"));
    }
    let Some(channel) = channel else { return Ok(error(clients, ClientError::BadJson, "a client event needs a `channel`")) };
    // Encrypted channels' payloads are the clients' own ciphertext; the protocol gives
    // them no client events.
    if !matches!(Kind::of(channel), Kind::Private | Kind::Presence) || channel.starts_with("private-encrypted-") {
        return Ok(error(clients, ClientError::Forbidden, "client events are sent on private and presence channels only (not encrypted ones)"));
    }
    let topic = pusher::topic(app, channel);
    if !holds(conn, &topic) {
        return Ok(error(clients, ClientError::Forbidden, &format!("not subscribed to `{channel}`: subscribe before sending client events on it")));
    }
    if event.len() > pusher::MAX_CHANNEL {
        return Ok(error(clients, ClientError::BadJson, "event names are at most 200 characters"));
    }
    if window.publishes >= pusher::CLIENT_EVENTS_PER_SECOND {
        clients.metrics.client_error(ClientError::PublishRate);
        return Err(Close { code: pusher::CLOSE_CLIENT_EVENTS_RATE, reason: "Client event rejected - only 10 accepted per second" });
    }
    window.publishes += 1;
    let publishing = &clients.publishing;
    let data = data.map_or("null", RawValue::get);
    if data.len() > publishing.max_message_bytes {
        return Ok(error(clients, ClientError::TooLarge, &format!("event data is {} bytes; at most {}", data.len(), publishing.max_message_bytes)));
    }
    let (data, held) = match publishing.hold(data, &topic, &clients.metrics) {
        Ok(held) => held,
        Err(refused) => return Ok(error(clients, refused.reason, &refused.message)),
    };
    let (id, registry, hub, metrics) = (publishing.message_ids.next(), publishing.registry.clone(), clients.hub.clone(), clients.metrics.clone());
    let webhooks = clients.webhooks.clone();
    let (event, channel, session, app_index) = (event.to_owned(), channel.to_owned(), conn.session.0, conn.app);
    // On a presence channel, who sent it (the protocol adds it for the others to see).
    let user = clients.presence.as_ref().filter(|_| Kind::of(&channel) == Kind::Presence).and_then(|p| p.user_of(session));
    let accepted_at = Instant::now();
    tokio::spawn(async move {
        let _held = held;
        let draft = Draft {
            id,
            publisher: CLIENTS_PUBLISHER,
            topic: Some(&topic),
            data: &data,
            accepted_at,
            except: Some(session),
            pusher: Some(PusherEvent { event: &event, channel: &channel, user_id: user.as_deref() }),
        };
        let job = Job { draft, target: Target::Topic(&topic), key: None };
        match registry.publish(&hub, &[job]).await.pop() {
            Some(Err(e)) => {
                metrics.dropped(DropReason::RegistryUnavailable, 1);
                tracing::debug!(error = %e.reason, "a Pusher client event did not reach every node");
            }
            _ => {
                metrics.pusher_events(app_index, PusherSource::Client, 1);
                if let Some(webhooks) = &webhooks {
                    webhooks.client_event(&topic, &event, &data, &pusher::socket_id(crate::session::SessionId(session)), user.as_deref());
                }
            }
        }
    });
    Ok(Handled { reply: Bytes::new(), topic_changes: 0 })
}
