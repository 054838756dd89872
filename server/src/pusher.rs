//! The Pusher Channels protocol (version 7), the parts every side of it shares: the apps
//! (`--pusher-app ID:KEY:SECRET`), channel names and the topics they are here, socket
//! ids, the frames, and the signatures (channel authorization, signed API requests).
//!
//! Pusher is an adapter over the same core as the native protocol: a channel of an app is
//! a hub topic in a namespace native clients cannot reach (`pusher:<app id>:<channel>`),
//! a Pusher connection is a `Conn` whose transport is [`Transport::Pusher`], and an event
//! is a message framed for Pusher clients ([`crate::wire::PusherEvent`]). What the
//! clients say is read in `client::pusher`; the HTTP API is `api::pusher`.
//!
//! [`Transport::Pusher`]: crate::wire::Transport::Pusher

use crate::session::SessionId;

/// Topics (and uids) starting with this are the Pusher protocol's.
pub const PREFIX: &str = "pusher:";

/// The protocol version spoken.
pub const PROTOCOL: &str = "7";
/// Most seconds of silence after which a client pings (`pusher:connection_established`).
pub const ACTIVITY_TIMEOUT: u32 = 120;
/// What the server says to a client silent for its `activity_timeout`.
pub const PING: &str = r#"{"event":"pusher:ping","data":"{}"}"#;
/// Longest channel name, in characters (all ASCII).
pub const MAX_CHANNEL: usize = 200;
/// Longest user id, in bytes (the protocol's 128 characters).
pub const MAX_USER_ID: usize = 128;
/// Client events a connection may send per second (the protocol's default).
pub const CLIENT_EVENTS_PER_SECOND: u16 = 10;

/// Close codes: 4000-4099 tell the client not to reconnect, 4100-4199 to back off,
/// 4200-4299 to reconnect at once.
pub const CLOSE_UNKNOWN_APP: u16 = 4001;
pub const CLOSE_PROTOCOL: u16 = 4007;
/// The app has as many connections as it may (`max_connections`).
pub const CLOSE_OVER_QUOTA: u16 = 4004;
/// The application ended the user's connections (`terminate_connections`); also a
/// refused origin or sign-in, as the protocol's "unauthorized".
pub const CLOSE_TERMINATED: u16 = 4009;
pub const CLOSE_OVER_CAPACITY: u16 = 4100;
pub const CLOSE_RECONNECT: u16 = 4200;
pub const CLOSE_NO_PONG: u16 = 4201;
pub const CLOSE_CLIENT_EVENTS_RATE: u16 = 4301;

pub struct App {
    pub id: String,
    pub key: String,
    pub secret: String,
    /// Whether its clients may send `client-` events on private and presence channels.
    pub client_events: bool,
    /// Most connections it may have open on a node; 0: no cap but the node's.
    pub max_connections: usize,
    /// Where its webhooks go, if not to `--pusher-webhook-url`.
    pub webhook_url: Option<String>,
    /// Origins its browser clients may connect from, lower case; empty: any.
    pub allowed_origins: Vec<String>,
}

#[cfg(test)]
impl App {
    /// App `id` with the key and secret of Pusher's documented examples, no options.
    pub fn documented(id: &str) -> App {
        App {
            id: id.into(),
            key: "278d425bdf160c739803".into(),
            secret: "7ad3773142a6692b25b8".into(),
            client_events: false,
            max_connections: 0,
            webhook_url: None,
            allowed_origins: Vec::new(),
        }
    }
}

/// An app as a `[[pusher_app]]` table of the config file writes it, with its options.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct AppTable {
    pub id: String,
    pub key: String,
    pub secret: String,
    /// Default: `--pusher-client-events`.
    #[serde(default)]
    pub client_events: Option<bool>,
    #[serde(default)]
    pub max_connections: usize,
    #[serde(default)]
    pub webhook_url: Option<String>,
    #[serde(default)]
    pub allowed_origins: Vec<String>,
}

/// The configured apps; a connection holds its app's index.
pub struct Apps {
    apps: Vec<App>,
}

impl Apps {
    /// Apps from `ID:KEY:SECRET` specifications (`--pusher-app`) and the config file's
    /// `[[pusher_app]]` tables; `client_events` is `--pusher-client-events`.
    pub fn parse(specs: &[String], tables: &[AppTable], client_events: bool) -> Result<Apps, String> {
        let mut apps: Vec<App> = Vec::with_capacity(specs.len() + tables.len());
        let from_flags = specs.iter().map(|spec| {
            let mut parts = spec.splitn(3, ':');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(id), Some(key), Some(secret)) => Ok(AppTable {
                    id: id.to_owned(),
                    key: key.to_owned(),
                    secret: secret.to_owned(),
                    client_events: None,
                    max_connections: 0,
                    webhook_url: None,
                    allowed_origins: Vec::new(),
                }),
                _ => Err("--pusher-app is ID:KEY:SECRET".to_owned()),
            }
        });
        for table in from_flags.chain(tables.iter().cloned().map(Ok)) {
            let AppTable { id, key, secret, client_events: own_client_events, max_connections, webhook_url, allowed_origins } = table?;
            // An id of at most 40 keeps every channel's topic within a topic's 256 bytes.
            let name_ok = |s: &str, most: usize| !s.is_empty() && s.len() <= most && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
            if !name_ok(&id, 40) || !name_ok(&key, 64) {
                return Err(format!("Pusher app `{id}:{key}:..`: the id is 1 to 40 and the key 1 to 64 letters, digits, `-`, `_` or `.`"));
            }
            if secret.len() < 16 {
                return Err(format!("Pusher app `{id}`: the secret is {} bytes; use at least 16 random bytes", secret.len()));
            }
            if apps.iter().any(|a| a.id == id || a.key == key) {
                return Err(format!("Pusher app `{id}:{key}`: an app with that id or key is already configured"));
            }
            if let Some(url) = &webhook_url {
                if !url.starts_with("http://") && !url.starts_with("https://") {
                    return Err(format!("Pusher app `{id}`: webhook_url `{url}` is not an http:// or https:// URL"));
                }
            }
            let mut origins = Vec::with_capacity(allowed_origins.len());
            for origin in allowed_origins {
                match origin.as_str() {
                    // Any origin: the same as none listed.
                    "*" => {}
                    origin if is_origin(origin) => origins.push(origin.to_ascii_lowercase()),
                    origin => return Err(format!("Pusher app `{id}`: allowed_origins `{origin}` is not an origin (scheme://host[:port], no path; or `*`)")),
                }
            }
            apps.push(App { id, key, secret, client_events: own_client_events.unwrap_or(client_events), max_connections, webhook_url, allowed_origins: origins });
        }
        if apps.len() > u16::MAX as usize {
            return Err("too many Pusher apps".into());
        }
        Ok(Apps { apps })
    }

    pub fn is_empty(&self) -> bool {
        self.apps.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &App> {
        self.apps.iter()
    }

    pub fn get(&self, index: u16) -> Option<&App> {
        self.apps.get(index as usize)
    }

    pub fn by_key(&self, key: &str) -> Option<(u16, &App)> {
        self.apps.iter().enumerate().find(|(_, a)| a.key == key).map(|(i, a)| (i as u16, a))
    }

    pub fn by_id(&self, id: &str) -> Option<(u16, &App)> {
        self.apps.iter().enumerate().find(|(_, a)| a.id == id).map(|(i, a)| (i as u16, a))
    }
}

/// What kind of channel a name is, by its prefix.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Kind {
    Public,
    /// `private-` and `private-encrypted-` (whose payloads are relayed as sent).
    Private,
    Presence,
    /// `#server-to-user-<id>`: the events the application sends to a signed-in user, and
    /// how its connections are ended. Only that user's connections hold it.
    ServerToUser,
}

/// A signed-in user's channel is this and its id.
pub const SERVER_TO_USER: &str = "#server-to-user-";

impl Kind {
    /// The kind of `channel`; a cache channel (see [`is_cache`]) is the kind its
    /// prefix after `cache-` says (`private-cache-` is private).
    pub fn of(channel: &str) -> Kind {
        if channel.starts_with(SERVER_TO_USER) {
            Kind::ServerToUser
        } else if channel.starts_with("private-") {
            Kind::Private
        } else if channel.starts_with("presence-") {
            Kind::Presence
        } else {
            Kind::Public
        }
    }
}

/// Whether `text` is an origin as browsers send it: `scheme://host[:port]`, no path.
fn is_origin(text: &str) -> bool {
    text.split_once("://").is_some_and(|(scheme, rest)| {
        !scheme.is_empty() && scheme.bytes().all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b)) && !rest.is_empty() && !rest.contains(['/', '?', '#', '*'])
    })
}

impl App {
    /// Whether a browser page of `origin` may connect (origins compare without case).
    pub fn allows_origin(&self, origin: &str) -> bool {
        self.allowed_origins.is_empty() || self.allowed_origins.iter().any(|allowed| allowed.eq_ignore_ascii_case(origin))
    }
}

/// Whether `channel` is a cache channel: its last event is given to each new subscriber.
pub fn is_cache(channel: &str) -> bool {
    ["cache-", "private-cache-", "private-encrypted-cache-", "presence-cache-"].iter().any(|prefix| channel.starts_with(prefix))
}

/// Whether `topic` is a Pusher cache channel: its history is kept whether or not anyone
/// listens, for the next subscriber.
pub fn is_cache_topic(topic: &str) -> bool {
    channel_of_topic(topic).is_some_and(is_cache)
}

/// Bytes a channel name, a user id or an event name may be made of.
fn name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"_-=@,.;".contains(&b)
}

/// Checks a channel name: 1 to 200 of `A-Z a-z 0-9 _ - = @ , . ;`, or a signed-in user's
/// `#server-to-user-<user id>`.
pub fn check_channel(channel: &str) -> Result<(), String> {
    let name = channel.strip_prefix(SERVER_TO_USER).unwrap_or(channel);
    if name.is_empty() || channel.len() > MAX_CHANNEL || !name.bytes().all(name_byte) {
        return Err(format!("channel names are 1 to {MAX_CHANNEL} of A-Z a-z 0-9 _ - = @ , . ;"));
    }
    Ok(())
}

/// Checks a signed-in user's id: it names the user's channel, so it is made of what
/// channel names are, at most 128 bytes.
pub fn check_user_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_USER_ID || !id.bytes().all(name_byte) {
        return Err(format!("a signed-in user's id is 1 to {MAX_USER_ID} of A-Z a-z 0-9 _ - = @ , . ;"));
    }
    Ok(())
}

/// Whether `event` is a name only the protocol may give an event.
pub fn is_reserved_event(event: &str) -> bool {
    event.starts_with("pusher:") || event.starts_with("pusher_internal:")
}

/// The topic of a signed-in user's channel.
pub fn user_topic(app: &App, user: &str) -> String {
    topic(app, &format!("{SERVER_TO_USER}{user}"))
}

/// The hub topic of `channel` of `app`.
pub fn topic(app: &App, channel: &str) -> String {
    format!("{PREFIX}{}:{channel}", app.id)
}

/// The channel a Pusher topic is, whatever its app.
pub fn channel_of_topic(topic: &str) -> Option<&str> {
    app_and_channel(topic).map(|(_, channel)| channel)
}

/// The app id and the channel a Pusher topic is.
pub fn app_and_channel(topic: &str) -> Option<(&str, &str)> {
    topic.strip_prefix(PREFIX)?.split_once(':')
}

/// Whether a topic is a Pusher presence channel: its members are kept by presence.
pub fn is_presence_topic(topic: &str) -> bool {
    channel_of_topic(topic).is_some_and(|channel| Kind::of(channel) == Kind::Presence)
}

/// The channel a topic of `app` is, if it is one.
pub fn channel_of<'t>(app: &App, topic: &'t str) -> Option<&'t str> {
    topic.strip_prefix(PREFIX)?.strip_prefix(app.id.as_str())?.strip_prefix(':')
}

/// A connection's socket id, `<node>.<counter>` of its session: unique across nodes.
pub fn socket_id(session: SessionId) -> String {
    format!("{}.{}", session.node(), session.counter())
}

/// The session a socket id names.
pub fn session_of(socket_id: &str) -> Option<SessionId> {
    let (node, counter) = socket_id.split_once('.')?;
    SessionId::from_parts(node.parse().ok()?, counter.parse().ok()?)
}

/// The uid of a Pusher connection: its socket id, in the protocol's namespace.
pub fn uid(session: SessionId) -> String {
    format!("{PREFIX}{}", socket_id(session))
}

/// A frame: `{"event":..,"channel":..,"data":..}`; `data` is JSON (the protocol's own
/// events carry a JSON string holding JSON).
pub fn frame(event: &str, channel: Option<&str>, data: &str) -> String {
    let mut out = String::with_capacity(64 + data.len());
    out.push_str(r#"{"event":"#);
    out.push_str(&serde_json::to_string(event).unwrap_or_default());
    if let Some(channel) = channel {
        out.push_str(r#","channel":"#);
        out.push_str(&serde_json::to_string(channel).unwrap_or_default());
    }
    out.push_str(r#","data":"#);
    out.push_str(data);
    out.push('}');
    out
}

/// `pusher_internal:subscription_succeeded` for a channel with no members to list.
pub fn subscription_succeeded(channel: &str) -> String {
    frame("pusher_internal:subscription_succeeded", Some(channel), r#""{}""#)
}

/// `data` as the JSON string the protocol's events carry.
pub fn stringified(data: &serde_json::Value) -> String {
    serde_json::to_string(&data.to_string()).unwrap_or_default()
}

/// The `activity_timeout` told to clients: seconds of silence before a client pings, well
/// within `idle_timeout`, at most the protocol's 120.
pub fn activity_timeout(idle_timeout: std::time::Duration) -> u32 {
    (idle_timeout.as_secs() / 2).clamp(1, ACTIVITY_TIMEOUT as u64) as u32
}

/// `pusher:connection_established`; `activity_timeout` from [`activity_timeout`].
pub fn established(session: SessionId, activity_timeout: u32) -> String {
    let data = serde_json::json!({ "socket_id": socket_id(session), "activity_timeout": activity_timeout });
    frame("pusher:connection_established", None, &stringified(&data))
}

/// `pusher:error` with a code (None: no code).
pub fn error(code: Option<u16>, message: &str) -> String {
    frame("pusher:error", None, &serde_json::json!({ "code": code, "message": message }).to_string())
}

/// Hex HMAC-SHA256 of `text` with `secret`.
pub fn sign(secret: &str, text: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    crate::wire::hex(ring::hmac::sign(&key, text).as_ref())
}

/// Whether `signature` (lower-case hex) is the HMAC-SHA256 of `text` with `secret`,
/// checked in constant time.
pub fn verify(secret: &str, text: &str, signature: &str) -> bool {
    let hex = |b: u8| match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    };
    let bytes = signature.as_bytes();
    if bytes.len() != 64 {
        return false;
    }
    let Some(tag) = bytes.chunks(2).map(|pair| Some(hex(pair[0])? << 4 | hex(pair[1])?)).collect::<Option<Vec<u8>>>() else { return false };
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    ring::hmac::verify(&key, text.as_bytes(), &tag).is_ok()
}

/// Whether `auth` (`KEY:hex signature`) authorizes `socket_id` on `channel`: the
/// signature covers `socket_id:channel`, and `:channel_data` for a presence channel.
/// Compared in constant time.
pub fn authorized(app: &App, auth: &str, socket_id: &str, channel: &str, channel_data: Option<&str>) -> bool {
    let mut signed = format!("{socket_id}:{channel}");
    if let Some(data) = channel_data {
        signed.push(':');
        signed.push_str(data);
    }
    signed_by(app, auth, &signed)
}

/// Whether `auth` (`KEY:hex signature`) is `app`'s signature of `text`, compared in
/// constant time: a channel authorization, or a user's sign-in.
pub fn signed_by(app: &App, auth: &str, text: &str) -> bool {
    auth.split_once(':').is_some_and(|(key, signature)| key == app.key && verify(&app.secret, text, signature))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app() -> App {
        App::documented("1")
    }

    #[test]
    fn a_private_channel_signature_is_the_protocols() {
        // The example in Pusher's channel authorization documentation.
        let auth = "278d425bdf160c739803:58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4";
        assert!(authorized(&app(), auth, "1234.1234", "private-foobar", None));
        assert!(!authorized(&app(), auth, "1234.1235", "private-foobar", None));
        assert!(!authorized(&app(), auth, "1234.1234", "private-foobaz", None));
    }

    #[test]
    fn socket_ids_name_their_session_and_topics_their_channel() {
        let session = SessionId::from_parts(3, 77).unwrap();
        assert_eq!(socket_id(session), "3.77");
        assert_eq!(session_of("3.77"), Some(session));
        assert_eq!(session_of("3.x"), None);
        assert_eq!(channel_of(&app(), &topic(&app(), "private-a")), Some("private-a"));
        assert_eq!(channel_of(&app(), "pusher:12:private-a"), None);
        assert!(check_channel("private-encrypted-a=b@c,d.e;f_g").is_ok());
        assert!(check_channel("a b").is_err() && check_channel(&"a".repeat(201)).is_err());
        assert_eq!(Kind::of("presence-cache-x"), Kind::Presence);
        assert!(is_cache("presence-cache-x") && is_cache("cache-x") && !is_cache("private-x"));
        assert_eq!(Kind::of("private-encrypted-x"), Kind::Private);
        assert_eq!(Kind::of("#server-to-user-a@b.c"), Kind::ServerToUser);
        assert!(check_channel("#server-to-user-a@b.c").is_ok());
        assert!(check_channel("#server-to-user-").is_err() && check_channel("#other").is_err());
        assert!(check_user_id("a@b.c").is_ok() && check_user_id("a:b").is_err() && check_user_id("").is_err());
        assert!(is_reserved_event("pusher:x") && is_reserved_event("pusher_internal:terminate") && !is_reserved_event("client-x"));
        assert!(is_origin("https://a.example") && is_origin("http://127.0.0.1:8080"));
        assert!(!is_origin("https://a.example/") && !is_origin("*") && !is_origin("a.example") && !is_origin("https://"));
    }
}
