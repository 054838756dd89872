//! The Pusher HTTP API (`/apps/{app_id}/...`), for the Pusher server libraries:
//! `POST /apps/{id}/events` (an event to one or many channels, `socket_id` left out),
//! `POST /apps/{id}/batch_events` (up to 10 events),
//! `POST /apps/{id}/users/{user}/terminate_connections` (every node's connections signed
//! in as the user), `GET /apps/{id}/channels` (the occupied ones), and
//! `GET /apps/{id}/channels/{name}` and, for presence channels, `.../{name}/users`, read
//! where they are known (every node's, on Redis). Every request is signed with the
//! app's secret: `auth_key`, `auth_timestamp` (within 600 s), `auth_version=1.0`,
//! `body_md5`, and `auth_signature = HMAC-SHA256(secret, "METHOD\nPATH\nsorted query")`;
//! a request that fails any of them is a 401 that says which.

use std::time::Instant;

use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use md5::{Digest, Md5};
use serde::Deserialize;

use super::{json, Api, Reply};
use crate::auth::api_keys::CLIENTS_PUBLISHER;
use crate::error::{Error, Kind};
use crate::pusher::{self, App};
use crate::registry::relay::Target;
use crate::registry::{Job, Published};
use crate::telemetry::{PublishKind, PusherSource};
use crate::wire::{Draft, PusherEvent, TERMINATE};

/// How far a request's `auth_timestamp` may be from now, in seconds.
const MAX_SKEW: u64 = 600;
/// Most channels one event goes to, and most events in a batch (the protocol's limits).
const MAX_CHANNELS: usize = 100;
const MAX_BATCH: usize = 10;
/// Most channels `GET /apps/{id}/channels` lists.
const MAX_LISTED: usize = 10_000;

#[derive(Deserialize)]
struct Event {
    name: String,
    data: String,
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    channels: Option<Vec<String>>,
    #[serde(default)]
    socket_id: Option<String>,
    /// Attributes of the channels triggered to, to answer with (`user_count`,
    /// `subscription_count`, comma-separated).
    #[serde(default)]
    info: Option<String>,
}

/// The channel attributes a request's `info` asks for.
#[derive(Clone, Copy, Default)]
struct Asked {
    user_count: bool,
    subscription_count: bool,
}

impl Asked {
    /// `info`'s attributes; an unknown one is refused, before anything is triggered.
    fn from(info: Option<&str>) -> Result<Asked, Error> {
        let mut asked = Asked::default();
        for item in info.unwrap_or_default().split(',').map(str::trim).filter(|item| !item.is_empty()) {
            match item {
                "user_count" => asked.user_count = true,
                "subscription_count" => asked.subscription_count = true,
                other => return Err(Error::bad_request(format!("info `{other}`: the attributes are user_count and subscription_count"))),
            }
        }
        Ok(asked)
    }

    fn any(self) -> bool {
        self.user_count || self.subscription_count
    }
}

/// What is known of a channel: whether anyone is subscribed, its members (a presence
/// channel's), and its subscriptions (where they are counted).
struct ChannelState {
    occupied: bool,
    users: Option<usize>,
    subscriptions: Option<usize>,
}

impl ChannelState {
    /// The attributes `asked` for that are known.
    fn attributes(&self, asked: Asked) -> serde_json::Map<String, serde_json::Value> {
        let mut out = serde_json::Map::new();
        if let (true, Some(n)) = (asked.user_count, self.users) {
            out.insert("user_count".into(), n.into());
        }
        if let (true, Some(n)) = (asked.subscription_count, self.subscriptions) {
            out.insert("subscription_count".into(), n.into());
        }
        out
    }
}

#[derive(Deserialize)]
struct Batch {
    batch: Vec<Box<serde_json::value::RawValue>>,
}

impl Event {
    /// The channels the event names, each once.
    fn channels(&self) -> Vec<&str> {
        let mut channels: Vec<&str> = self.channel.iter().chain(self.channels.iter().flatten()).map(String::as_str).collect();
        let mut seen = std::collections::HashSet::new();
        channels.retain(|c| seen.insert(*c));
        channels
    }
}

/// An event, read only from a JSON object (serde would read a struct from an array too).
fn event(json: &[u8]) -> Result<Event, Error> {
    if !json.trim_ascii_start().starts_with(b"{") {
        return Err(Error::bad_request("an event is a JSON object"));
    }
    serde_json::from_slice(json).map_err(|e| Error::bad_request(format!("bad event: {e}")))
}

fn unauthorized(message: impl Into<String>) -> Error {
    Error::new(Kind::Unauthorized, message)
}

/// A Pusher `POST` checked on its head; its body is still to read.
pub(super) struct PusherPost<'a> {
    /// The app's place among the configured ones (its metrics' label).
    index: u16,
    app: &'a App,
    path: String,
    query: Vec<(String, String)>,
}

/// Whether `endpoint` (the path after `/apps/{id}/`) is one that takes a POST.
fn is_posted(endpoint: &str) -> bool {
    matches!(endpoint, "events" | "batch_events") || terminated_user(endpoint).is_some()
}

/// The user of `users/{user}/terminate_connections`.
fn terminated_user(endpoint: &str) -> Option<&str> {
    endpoint.strip_prefix("users/").and_then(|rest| rest.strip_suffix("/terminate_connections"))
}

fn no_endpoint(path: &str) -> Error {
    Error::new(
        Kind::NotFound,
        format!(
            "no Pusher endpoint {path}; see POST /apps/{{id}}/events, /apps/{{id}}/batch_events, /apps/{{id}}/users/{{user}}/terminate_connections, GET /apps/{{id}}/channels[/{{name}}[/users]]"
        ),
    )
}

/// Checks a request's signature against `app`'s secret: all of it but the body, which
/// the signature covers through the signed `body_md5` ([`verify_body`], once the body is
/// read). So a request no one signed is refused on its head: reading the bodies of
/// unsigned requests would let anyone who knows an app id hold the node's
/// `--max-publish-bytes-in-flight`, and every publish with it.
fn verify_head(app: &App, method: &str, path: &str, query: &[(String, String)]) -> Result<(), Error> {
    let param = |name: &str| query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    if param("auth_key") != Some(app.key.as_str()) {
        return Err(unauthorized("auth_key is not this app's key"));
    }
    if param("auth_version") != Some("1.0") {
        return Err(unauthorized("auth_version must be 1.0"));
    }
    let now = crate::clock::wall_ms() / 1000;
    match param("auth_timestamp").and_then(|t| t.parse::<u64>().ok()) {
        Some(t) if t.abs_diff(now) <= MAX_SKEW => {}
        Some(t) => return Err(unauthorized(format!("Timestamp expired: auth_timestamp {t} is more than {MAX_SKEW} s from the server's time {now}"))),
        None => return Err(unauthorized("auth_timestamp is missing, or not Unix seconds")),
    }
    let mut signed: Vec<(String, &str)> = query.iter().filter(|(k, _)| k != "auth_signature").map(|(k, v)| (k.to_ascii_lowercase(), v.as_str())).collect();
    signed.sort();
    let signed: Vec<String> = signed.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let signed = format!("{method}\n{path}\n{}", signed.join("&"));
    match param("auth_signature") {
        Some(given) if pusher::verify(&app.secret, &signed, given) => Ok(()),
        _ => Err(unauthorized("Invalid signature: auth_signature is not HMAC-SHA256 of \"METHOD\\nPATH\\nsorted query\" with the app's secret")),
    }
}

/// The body of a request whose head [`verify_head`] passed is the one signed: its MD5 is
/// the signed `body_md5`.
fn verify_body(query: &[(String, String)], body: &[u8]) -> Result<(), Error> {
    if body.is_empty() {
        return Ok(());
    }
    let md5 = crate::wire::hex(&Md5::digest(body));
    match query.iter().find(|(k, _)| k == "body_md5") {
        Some((_, given)) if *given == md5 => Ok(()),
        _ => Err(unauthorized("body_md5 is not the MD5 of the body: the body was changed, or not signed")),
    }
}

impl Api {
    /// A request to the Pusher HTTP API.
    pub(super) async fn pusher(&self, req: Request<Incoming>) -> Result<Reply, Error> {
        let path = req.uri().path().to_owned();
        let (index, app, endpoint) = self.pusher_target(&path)?;
        let query = crate::http::query_pairs(req.uri().query().unwrap_or_default())?;
        let info = |name: &str| query.iter().any(|(k, v)| k == "info" && v.split(',').any(|item| item == name));
        if endpoint == "channels" || endpoint.starts_with("channels/") {
            if req.method() != hyper::Method::GET {
                return Err(Error::new(Kind::MethodNotAllowed, "use GET"));
            }
            verify_head(app, "GET", &path, &query)?;
            let (user_count, subscription_count) = (info("user_count"), info("subscription_count"));
            let body = match endpoint.strip_prefix("channels/") {
                None => {
                    let prefix = query.iter().find(|(k, _)| k == "filter_by_prefix").map_or("", |(_, v)| v.as_str());
                    self.pusher_channels(app, prefix, user_count, subscription_count).await?
                }
                Some(channel) => match channel.strip_suffix("/users") {
                    Some(channel) => self.pusher_users(app, channel).await?,
                    None => self.pusher_channel(app, channel, user_count, subscription_count).await?,
                },
            };
            return Ok(json(StatusCode::OK, body));
        }
        match (req.method() == hyper::Method::POST, is_posted(endpoint)) {
            (true, true) => {}
            (false, true) => return Err(Error::new(Kind::MethodNotAllowed, "use POST")),
            (_, false) => return Err(no_endpoint(&path)),
        }
        let post = self.pusher_post_head(index, app, &path, query)?;
        let (body, _reading) = self.read_body(req, self.pusher_body_limit()).await?;
        self.pusher_post(post, &body).await.map(|answer| answer.into())
    }

    /// Room for a batch of events.
    pub(super) fn pusher_body_limit(&self) -> usize {
        MAX_BATCH * (self.max_message_bytes + 4096)
    }

    /// The app (its index and itself) and the endpoint a Pusher API path names; 404 when
    /// it names none.
    fn pusher_target<'p>(&self, path: &'p str) -> Result<(u16, &App, &'p str), Error> {
        let apps = self.pusher.as_deref().ok_or_else(|| Error::new(Kind::NotFound, "no Pusher apps are configured (--pusher-app)"))?;
        let mut parts = path.trim_start_matches("/apps/").splitn(2, '/');
        let (Some(id), Some(endpoint)) = (parts.next(), parts.next()) else { return Err(no_endpoint(path)) };
        let (index, app) = apps.by_id(id).ok_or_else(|| Error::new(Kind::NotFound, format!("no Pusher app {id}")))?;
        Ok((index, app, endpoint))
    }

    /// The first checks of a Pusher `POST` on its path and query alone: the app exists,
    /// the endpoint is one that takes a POST, the node is serving, the request is signed.
    pub(super) fn admit_pusher(&self, path: &str, query: &str) -> Result<PusherPost<'_>, Error> {
        let (index, app, endpoint) = self.pusher_target(path)?;
        if !is_posted(endpoint) {
            return Err(no_endpoint(path));
        }
        self.pusher_post_head(index, app, path, crate::http::query_pairs(query)?)
    }

    /// A POST to a posted endpoint of `app`, signed, taken while the node is serving; its
    /// body is read only then.
    fn pusher_post_head<'a>(&self, index: u16, app: &'a App, path: &str, query: Vec<(String, String)>) -> Result<PusherPost<'a>, Error> {
        if !self.shutdown.is_serving() {
            return Err(Error::new(Kind::ShuttingDown, "this node is shutting down; send to another"));
        }
        verify_head(app, "POST", path, &query)?;
        Ok(PusherPost { index, app, path: path.to_owned(), query })
    }

    /// A Pusher `POST` admitted on its head, answered from its `body`: its signature
    /// checked, then its events triggered or its user's connections terminated.
    pub(super) async fn pusher_post(&self, post: PusherPost<'_>, body: &[u8]) -> Result<super::Answer, Error> {
        let PusherPost { index, app, path, query } = post;
        self.not_closing()?;
        verify_body(&query, body)?;
        let endpoint = path.trim_start_matches("/apps/").split_once('/').map_or("", |(_, endpoint)| endpoint);
        if let Some(user) = terminated_user(endpoint) {
            // Some libraries percent-encode the id in the path (`@`, `,`, `;`, `=` are in
            // the user id alphabet), others send it as it is; `%` is not in it.
            let user = percent_encoding::percent_decode_str(user).decode_utf8().map_err(|_| Error::bad_request("the user id is not UTF-8 once percent-decoded"))?;
            pusher::check_user_id(&user).map_err(Error::bad_request)?;
            self.terminate(app, &user).await?;
            return Ok(super::Answer::ok("{}".into()));
        }
        let events = match endpoint {
            "events" => vec![event(body)?],
            _ => {
                if !body.trim_ascii_start().starts_with(b"{") {
                    return Err(Error::bad_request("a batch is a JSON object: {\"batch\":[..]}"));
                }
                let batch = serde_json::from_slice::<Batch>(body).map_err(|e| Error::bad_request(format!("bad batch: {e}")))?.batch;
                if batch.is_empty() {
                    return Err(Error::bad_request(format!("a batch holds 1 to {MAX_BATCH} events; this one none")));
                }
                if batch.len() > MAX_BATCH {
                    return Err(Error::new(Kind::PayloadTooLarge, format!("a batch holds at most {MAX_BATCH} events; this one {}", batch.len())));
                }
                batch.iter().map(|item| event(item.get().as_bytes())).collect::<Result<Vec<_>, _>>()?
            }
        };
        let asked = events.iter().map(|event| Asked::from(event.info.as_deref())).collect::<Result<Vec<_>, _>>()?;
        let published = self.trigger(app, &events).await?;
        self.metrics.pusher_events(index, PusherSource::Api, published);
        if !asked.iter().any(|asked| asked.any()) {
            return Ok(super::Answer::ok("{}".into()));
        }
        // Read after the events went out, as Pusher answers: the attributes of each
        // channel triggered to (`events`), or of each event's channel (`batch_events`).
        let answer = match endpoint {
            "events" => {
                let mut channels = serde_json::Map::new();
                for channel in events[0].channels() {
                    channels.insert(channel.to_owned(), self.channel_state(app, channel).await?.attributes(asked[0]).into());
                }
                serde_json::json!({ "channels": channels })
            }
            _ => {
                let mut batch = Vec::with_capacity(events.len());
                for (event, asked) in events.iter().zip(asked) {
                    let attributes = match (asked.any(), event.channels().first()) {
                        (true, Some(channel)) => self.channel_state(app, channel).await?.attributes(asked),
                        _ => serde_json::Map::new(),
                    };
                    batch.push(serde_json::Value::from(attributes));
                }
                serde_json::json!({ "batch": batch })
            }
        };
        Ok(super::Answer::ok(answer.to_string()))
    }

    fn presence_on(&self) -> Result<&crate::presence::Presence, Error> {
        self.presence.as_deref().ok_or_else(|| Error::new(Kind::NotFound, "presence is off on this server"))
    }

    /// `GET /apps/{id}/channels`: `{"channels":{"<name>":{..info}}}`, the occupied channels
    /// named from `filter_by_prefix`, at most [`MAX_LISTED`]; `user_count` is asked only of
    /// presence channels, `subscription_count` given where it is known (one node).
    async fn pusher_channels(&self, app: &App, prefix: &str, user_count: bool, subscription_count: bool) -> Result<String, Error> {
        if user_count && !prefix.starts_with("presence-") {
            return Err(Error::bad_request("info=user_count is only for presence channels: add filter_by_prefix=presence-"));
        }
        let unavailable = |e: crate::registry::Unavailable| Error::unavailable(format!("channels unavailable; retry: {}", e.reason));
        let channels = self.registry.pusher_channels(&self.hub, app, prefix, MAX_LISTED).await.map_err(unavailable)?;
        // The presence channels' counts, read together (one round trip each on Redis).
        let members = match user_count {
            true => {
                let presence = self.presence_on()?;
                let reads = channels.iter().map(|(channel, _)| async move { self.registry.presence_stats(presence, &pusher::topic(app, channel)).await.map(|stats| Some(stats.members)) });
                futures_util::future::try_join_all(reads).await.map_err(unavailable)?
            }
            false => vec![None; channels.len()],
        };
        let mut out = serde_json::Map::new();
        for ((channel, subscriptions), members) in channels.into_iter().zip(members) {
            let mut info = serde_json::Map::new();
            if let Some(members) = members {
                info.insert("user_count".into(), members.into());
            }
            if let (true, Some(n)) = (subscription_count, subscriptions) {
                info.insert("subscription_count".into(), n.into());
            }
            out.insert(channel, info.into());
        }
        Ok(serde_json::json!({ "channels": out }).to_string())
    }

    /// `GET /apps/{id}/channels/{name}`: `{"occupied":..}`, with a presence channel's
    /// `user_count` and `subscription_count`, and another's `subscription_count` when asked
    /// and known (one node).
    async fn pusher_channel(&self, app: &App, channel: &str, user_count: bool, subscription_count: bool) -> Result<String, Error> {
        pusher::check_channel(channel).map_err(Error::bad_request)?;
        let presence = pusher::Kind::of(channel) == pusher::Kind::Presence;
        if user_count && !presence {
            return Err(Error::bad_request("info=user_count is only for presence channels"));
        }
        let state = self.channel_state(app, channel).await?;
        let asked = Asked { user_count: presence, subscription_count: presence || subscription_count };
        let mut out = state.attributes(asked);
        out.insert("occupied".into(), state.occupied.into());
        Ok(serde_json::Value::from(out).to_string())
    }

    /// What is known of `channel` of `app`, on every node.
    async fn channel_state(&self, app: &App, channel: &str) -> Result<ChannelState, Error> {
        let topic = pusher::topic(app, channel);
        if pusher::Kind::of(channel) == pusher::Kind::Presence {
            let stats = self.registry.presence_stats(self.presence_on()?, &topic).await.map_err(|e| Error::unavailable(format!("presence unavailable; retry: {}", e.reason)))?;
            return Ok(ChannelState { occupied: stats.connections > 0, users: Some(stats.members), subscriptions: Some(stats.connections) });
        }
        let (occupied, subscriptions) = self.registry.pusher_channel(&self.hub, &topic).await.map_err(|e| Error::unavailable(format!("channel unavailable; retry: {}", e.reason)))?;
        Ok(ChannelState { occupied, users: None, subscriptions })
    }

    /// `GET /apps/{id}/channels/{name}/users`: `{"users":[{"id":..}]}`, the first 1,000.
    async fn pusher_users(&self, app: &App, channel: &str) -> Result<String, Error> {
        pusher::check_channel(channel).map_err(Error::bad_request)?;
        if pusher::Kind::of(channel) != pusher::Kind::Presence {
            return Err(Error::bad_request("users are listed for presence channels only"));
        }
        let page = self
            .registry
            .presence_page(self.presence_on()?, &pusher::topic(app, channel), None, crate::presence::MAX_PAGE)
            .await
            .map_err(|e| Error::unavailable(format!("presence unavailable; retry: {}", e.reason)))?;
        let users: Vec<serde_json::Value> = page.members.iter().map(|m| serde_json::json!({ "id": m.uid })).collect();
        Ok(serde_json::json!({ "users": users }).to_string())
    }

    /// Closes the connections signed in as `user`, on every node: [`TERMINATE`] goes to the
    /// user's topic like any event, and each connection it reaches closes with 4009.
    async fn terminate(&self, app: &App, user: &str) -> Result<(), Error> {
        let channel = format!("{}{user}", pusher::SERVER_TO_USER);
        let topic = pusher::topic(app, &channel);
        let draft = Draft {
            id: self.message_ids.next(),
            publisher: CLIENTS_PUBLISHER,
            topic: Some(&topic),
            data: "{}",
            accepted_at: Instant::now(),
            except: None,
            pusher: Some(PusherEvent { event: TERMINATE, channel: &channel, user_id: None }),
        };
        let job = Job { draft, target: Target::Topic(&topic), key: None };
        let published = self.registry.publish(&self.hub, &[job]).await.pop();
        match published {
            Some(Err(e)) => Err(Error::unavailable(format!("registry unavailable: the user's connections on other nodes may be open still; retry: {}", e.reason))),
            _ => Ok(()),
        }
    }

    /// Publishes each event to each of its channels; all are checked first. Returns how
    /// many (event, channel) were published.
    async fn trigger(&self, app: &App, events: &[Event]) -> Result<usize, Error> {
        let mut planned = Vec::new();
        for event in events {
            if event.name.is_empty() || event.name.len() > pusher::MAX_CHANNEL {
                return Err(Error::bad_request("event names are 1 to 200 characters"));
            }
            if pusher::is_reserved_event(&event.name) {
                return Err(Error::bad_request(format!("event `{}`: names starting pusher: or pusher_internal: are the protocol's own", event.name)));
            }
            if event.data.len() > self.max_message_bytes {
                return Err(Error::new(Kind::PayloadTooLarge, format!("event data is {} bytes; the limit is {}", event.data.len(), self.max_message_bytes)));
            }
            let channels = event.channels();
            if channels.is_empty() || channels.len() > MAX_CHANNELS || (event.channel.is_some() && event.channels.is_some()) {
                return Err(Error::bad_request(format!("name the event's `channel`, or 1 to {MAX_CHANNELS} `channels`")));
            }
            for channel in &channels {
                pusher::check_channel(channel).map_err(Error::bad_request)?;
            }
            let except = match &event.socket_id {
                Some(socket_id) => Some(pusher::session_of(socket_id).ok_or_else(|| Error::bad_request(format!("socket_id `{socket_id}` is not a socket id")))?.0),
                None => None,
            };
            // The protocol's event data is a string: framed as the JSON string it is.
            let data = serde_json::to_string(&event.data).unwrap_or_default();
            for channel in channels {
                planned.push((event, channel, pusher::topic(app, channel), except, data.clone(), self.message_ids.next()));
            }
        }
        if let Some(queued) = self.metrics.over_queue_budget(self.node_queue_max_bytes) {
            return Err(Error::new(Kind::Overloaded, format!("node has {queued} bytes queued for slow clients, over its budget; retry later")));
        }
        let accepted_at = Instant::now();
        let jobs: Vec<Job> = planned
            .iter()
            .map(|(event, channel, topic, except, data, id)| Job {
                draft: Draft {
                    id: *id,
                    publisher: CLIENTS_PUBLISHER,
                    topic: Some(topic),
                    data,
                    accepted_at,
                    except: *except,
                    pusher: Some(PusherEvent { event: &event.name, channel, user_id: None }),
                },
                target: Target::Topic(topic),
                key: None,
            })
            .collect();
        for answer in self.registry.publish(&self.hub, &jobs).await {
            match answer {
                Ok(Published::Delivered(..)) => self.metrics.published(PublishKind::Topic),
                Ok(_) => {}
                Err(e) => return Err(Error::unavailable(format!("registry unavailable: the event may not have reached every subscriber: {}", e.reason))),
            }
        }
        Ok(jobs.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_signed_as_the_protocol_says_verifies() {
        // The worked example of Pusher's HTTP API documentation ("Generating
        // authentication signatures"), with its timestamp taken as now.
        let app = App::documented("3");
        let body = br#"{"name":"foo","channels":["project-3"],"data":"{\"some\":\"data\"}"}"#;
        let md5 = crate::wire::hex(&Md5::digest(body));
        assert_eq!(md5, "ec365a775a4cd0599faeb73354201b6f");
        let now = (crate::clock::wall_ms() / 1000).to_string();
        let mut query = vec![
            ("auth_key".to_owned(), app.key.clone()),
            ("auth_timestamp".to_owned(), now.clone()),
            ("auth_version".to_owned(), "1.0".to_owned()),
            ("body_md5".to_owned(), md5.clone()),
        ];
        let signed = format!("POST\n/apps/3/events\nauth_key={}&auth_timestamp={now}&auth_version=1.0&body_md5={md5}", app.key);
        let signature = pusher::sign(&app.secret, signed.as_bytes());
        query.push(("auth_signature".to_owned(), signature));
        assert!(verify_head(&app, "POST", "/apps/3/events", &query).is_ok());
        assert!(verify_body(&query, body).is_ok());
        let changed = br#"{"name":"foo","channels":["project-4"],"data":"{\"some\":\"data\"}"}"#;
        assert!(verify_body(&query, changed).unwrap_err().message.contains("body_md5"));
        query[1].1 = "1353088179".into();
        assert!(verify_head(&app, "POST", "/apps/3/events", &query).unwrap_err().message.contains("Timestamp expired"));
    }
}
