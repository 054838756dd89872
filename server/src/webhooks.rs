//! Webhooks: events POSTed to the application (`--webhook-url`) in batches, each signed.
//!
//! Events: `topic_occupied` (a topic's first subscriber on any node) and `topic_vacated`
//! (its last gone), `member_joined` and `member_left` (presence), `client_publish` (a
//! client's own publish, when asked for in `--webhook-events`). Each is sent by one node
//! only: the one that saw it happen where the state lives (this process on the memory
//! registry; on Redis, the node whose script made the change, or the reaper that took a
//! dead node's share out).
//!
//! A batch is `{"time_ms":..,"events":[..]}` with `X-Pushline-Timestamp: <unix seconds>`
//! and `X-Pushline-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`: the
//! timestamp is signed, so an old batch replayed is told apart. Events wait in a queue of
//! at most `--webhook-queue-bytes`; one batch is out at a time, in order, tried
//! `--webhook-attempts` times with backoff. What is dropped (queue full, attempts spent,
//! shutdown) is counted by reason in `pushline_webhook_events_total`.
//!
//! Pusher channels are told in Pusher's format instead (`--pusher-webhook-url`), each app
//! in batches of its own, signed as Pusher signs them (`X-Pusher-Key`, `X-Pusher-Signature:
//! hex HMAC-SHA256(app secret, body)`): `channel_occupied`, `channel_vacated`,
//! `member_added`, `member_removed`, and `client_event` when asked for. Each destination
//! is an [`Outlet`]: its own queue, bound and sender.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hyper::header::{HeaderName, HeaderValue};
use hyper::Uri;
use serde::Serialize;
use serde_json::value::RawValue;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::application::Application;
use crate::clock;
use crate::config::Config;
pub use crate::config::EventKind;
use crate::error::Error;
use crate::telemetry::{Metrics, WebhookOutcome};

/// First wait before a batch is tried again; doubles up to [`RETRY_MOST`].
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MOST: Duration = Duration::from_secs(10);
/// Largest answer read from the application (it is not used).
const MAX_ANSWER_BYTES: usize = 4 * 1024;

#[derive(Serialize)]
struct Event<'a> {
    name: EventKind,
    topic: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    uid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    info: Option<&'a RawValue>,
    /// A client publish's message id and data, and the publishing session.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "crate::wire::json::id_as_text_some")]
    id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    session: Option<String>,
    time_ms: u64,
}

/// Where events go: native topics' to `--webhook-url`, each Pusher app's channels' to
/// `--pusher-webhook-url` in batches of that app.
pub struct Webhooks {
    native: Option<Arc<Outlet>>,
    /// By app id.
    pusher: Vec<(String, Arc<Outlet>)>,
}

/// One destination's events: what it wants, its queue and its format.
pub struct Outlet {
    wanted: Vec<EventKind>,
    pusher: bool,
    queue: Mutex<Queue>,
    /// Told when an event is queued.
    queued: Notify,
    max_bytes: usize,
    metrics: Arc<Metrics>,
}

/// A Pusher webhook event.
#[derive(Serialize)]
struct PusherEvent<'a> {
    name: &'static str,
    channel: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    user_id: Option<&'a str>,
    /// A client event's name, data (a string, as the protocol's data is), and sender.
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    socket_id: Option<&'a str>,
}

#[derive(Default)]
struct Queue {
    events: VecDeque<Box<str>>,
    bytes: usize,
}

/// Where one outlet's batches go and how they are sent.
pub struct Sender {
    pub application: Arc<Application>,
    pub url: Uri,
    pub signing: Signing,
    pub batch: usize,
    pub attempts: u32,
    pub timeout: Duration,
}

/// An outlet and the sender that empties it.
pub type Sending = (Arc<Outlet>, Sender);

/// How a batch is signed.
pub enum Signing {
    /// `X-Pushline-Timestamp` and `X-Pushline-Signature`, with `--webhook-secret`.
    Pushline(String),
    /// `X-Pusher-Key` and `X-Pusher-Signature`, with the app's key and secret.
    Pusher { key: String, secret: String },
}

impl Webhooks {
    /// The webhooks and each outlet's sender, when `--webhook-url` is set, or
    /// `--pusher-webhook-url` with the Pusher `apps`.
    pub fn from_config(config: &Config, application: Option<Arc<Application>>, apps: Option<&crate::pusher::Apps>, metrics: &Arc<Metrics>) -> Result<Option<(Arc<Webhooks>, Vec<Sending>)>, Error> {
        let Some(application) = application else { return Ok(None) };
        let outlet = |wanted: Vec<EventKind>, pusher: bool| {
            Arc::new(Outlet { wanted, pusher, queue: Mutex::default(), queued: Notify::new(), max_bytes: config.webhook_queue_bytes, metrics: metrics.clone() })
        };
        let sender = |flag, url: &str, signing| -> Result<Sender, Error> {
            Ok(Sender {
                application: application.clone(),
                url: crate::application::parse_url(flag, url)?,
                signing,
                batch: config.webhook_batch,
                attempts: config.webhook_attempts,
                timeout: config.webhook_timeout,
            })
        };
        let mut senders = Vec::new();
        let native = match (&config.webhook_url, &config.webhook_secret) {
            (Some(url), Some(secret)) => {
                let native = outlet(config.webhook_events.clone(), false);
                senders.push((native.clone(), sender("--webhook-url", url, Signing::Pushline(secret.clone()))?));
                Some(native)
            }
            _ => None,
        };
        let mut pusher = Vec::new();
        let mut wanted = vec![EventKind::TopicOccupied, EventKind::TopicVacated, EventKind::MemberJoined, EventKind::MemberLeft];
        if config.pusher_webhook_client_events {
            wanted.push(EventKind::ClientPublish);
        }
        // Each app's own webhook_url, else --pusher-webhook-url.
        for app in apps.iter().flat_map(|apps| apps.iter()) {
            let Some(url) = app.webhook_url.as_ref().or(config.pusher_webhook_url.as_ref()) else { continue };
            let app_outlet = outlet(wanted.clone(), true);
            let signing = Signing::Pusher { key: app.key.clone(), secret: app.secret.clone() };
            senders.push((app_outlet.clone(), sender("--pusher-webhook-url", url, signing)?));
            pusher.push((app.id.clone(), app_outlet));
        }
        if native.is_none() && pusher.is_empty() {
            return Ok(None);
        }
        Ok(Some((Arc::new(Webhooks { native, pusher }), senders)))
    }

    /// Whether any outlet wants `kind`.
    pub fn wants(&self, kind: EventKind) -> bool {
        self.native.iter().chain(self.pusher.iter().map(|(_, o)| o)).any(|o| o.wants(kind))
    }

    /// The outlet of `topic`'s events: its Pusher app's, or the native one; and the
    /// Pusher channel it is.
    fn outlet_of<'t>(&self, topic: &'t str) -> Option<(&Outlet, Option<&'t str>)> {
        match crate::pusher::app_and_channel(topic) {
            Some((app, channel)) => self.pusher.iter().find(|(id, _)| id == app).map(|(_, o)| (&**o, Some(channel))),
            None if topic.starts_with(crate::pusher::PREFIX) => None,
            None => self.native.as_deref().map(|o| (o, None)),
        }
    }

    /// A topic got its first subscriber, or lost its last (`occupied` false), everywhere.
    pub fn topic(&self, topic: &str, occupied: bool) {
        let name = if occupied { EventKind::TopicOccupied } else { EventKind::TopicVacated };
        match self.outlet_of(topic) {
            Some((outlet, Some(channel))) => {
                let pusher_name = if occupied { "channel_occupied" } else { "channel_vacated" };
                outlet.push_pusher(name, PusherEvent { name: pusher_name, channel, user_id: None, event: None, data: None, socket_id: None });
            }
            Some((outlet, None)) => outlet.push(Event { name, topic, uid: None, info: None, id: None, data: None, session: None, time_ms: clock::wall_ms() }),
            None => {}
        }
    }

    /// `uid` became a member of `topic` (with `info`), or stopped being one.
    pub fn member(&self, topic: &str, uid: &str, joined: bool, info: Option<&RawValue>) {
        let name = if joined { EventKind::MemberJoined } else { EventKind::MemberLeft };
        match self.outlet_of(topic) {
            Some((outlet, Some(channel))) => {
                let pusher_name = if joined { "member_added" } else { "member_removed" };
                outlet.push_pusher(name, PusherEvent { name: pusher_name, channel, user_id: Some(uid), event: None, data: None, socket_id: None });
            }
            Some((outlet, None)) => outlet.push(Event { name, topic, uid: Some(uid), info, id: None, data: None, session: None, time_ms: clock::wall_ms() }),
            None => {}
        }
    }

    /// A client published `data` to `topic` as message `id`.
    pub fn client_publish(&self, topic: &str, uid: &str, session: u64, id: u64, data: &RawValue) {
        if let Some((outlet, None)) = self.outlet_of(topic) {
            let session = Some(crate::session::SessionId(session).to_string());
            outlet.push(Event { name: EventKind::ClientPublish, topic, uid: Some(uid), info: None, id: Some(id), data: Some(data), session, time_ms: clock::wall_ms() });
        }
    }

    /// A Pusher client sent `event` with `data` (JSON) on the channel `topic` is.
    pub fn client_event(&self, topic: &str, event: &str, data: &str, socket_id: &str, user_id: Option<&str>) {
        if let Some((outlet, Some(channel))) = self.outlet_of(topic) {
            // The protocol's data is a string: the client's JSON, as text.
            let data = Some(data.to_owned());
            outlet.push_pusher(EventKind::ClientPublish, PusherEvent { name: "client_event", channel, user_id, event: Some(event), data, socket_id: Some(socket_id) });
        }
    }
}

impl Outlet {
    pub fn wants(&self, kind: EventKind) -> bool {
        self.wanted.contains(&kind)
    }

    fn push_pusher(&self, kind: EventKind, event: PusherEvent<'_>) {
        if self.pusher && self.wants(kind) {
            if let Ok(text) = serde_json::to_string(&event) {
                self.queue_text(text);
            }
        }
    }

    fn push(&self, event: Event<'_>) {
        if self.pusher || !self.wants(event.name) {
            return;
        }
        if let Ok(text) = serde_json::to_string(&event) {
            self.queue_text(text);
        }
    }

    fn queue_text(&self, text: String) {
        {
            let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            if queue.bytes + text.len() > self.max_bytes {
                drop(queue);
                self.metrics.webhook_events(WebhookOutcome::QueueFull, 1);
                return;
            }
            queue.bytes += text.len();
            queue.events.push_back(text.into_boxed_str());
            self.metrics.webhook_queued_bytes.set(queue.bytes as f64);
        }
        self.queued.notify_one();
    }

    /// Up to `most` events from the front, and their bytes; they stay counted against the
    /// queue's bound until [`Webhooks::done`].
    fn front(&self, most: usize) -> Vec<Box<str>> {
        let queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        queue.events.iter().take(most).cloned().collect()
    }

    /// The first `n` events are done with (sent, or given up on).
    fn done(&self, n: usize) {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        for _ in 0..n {
            if let Some(event) = queue.events.pop_front() {
                queue.bytes -= event.len();
            }
        }
        self.metrics.webhook_queued_bytes.set(queue.bytes as f64);
    }

    fn is_empty(&self) -> bool {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).events.is_empty()
    }

    /// Sends batches until `stop`; then what is queued, until `grace` runs out: what is
    /// left then is counted as dropped.
    pub async fn send(self: Arc<Self>, sender: Sender, stop: CancellationToken, grace: Duration) {
        loop {
            let queued = self.queued.notified();
            if self.is_empty() {
                tokio::select! {
                    _ = queued => {}
                    _ = stop.cancelled() => break,
                }
            }
            self.send_batch(&sender, &stop).await;
            if stop.is_cancelled() {
                break;
            }
        }
        let _ = tokio::time::timeout(grace, async {
            while !self.is_empty() {
                self.send_batch(&sender, &CancellationToken::new()).await;
            }
        })
        .await;
        let left = self.queue.lock().unwrap_or_else(|e| e.into_inner()).events.len();
        if left > 0 {
            self.metrics.webhook_events(WebhookOutcome::Shutdown, left);
            tracing::warn!(events = left, "webhook events still queued at shutdown were not sent");
        }
    }

    /// Sends the front batch, trying again with backoff up to the attempts allowed (or
    /// until `stop`, which leaves it queued).
    async fn send_batch(&self, sender: &Sender, stop: &CancellationToken) {
        let events = self.front(sender.batch);
        if events.is_empty() {
            return;
        }
        let mut body = format!("{{\"time_ms\":{},\"events\":[", clock::wall_ms());
        for (i, event) in events.iter().enumerate() {
            if i > 0 {
                body.push(',');
            }
            body.push_str(event);
        }
        body.push_str("]}");
        let body = Bytes::from(body);
        let mut wait = RETRY_FIRST;
        for attempt in 1..=sender.attempts {
            // Signed afresh each attempt: the timestamp says when it was sent.
            let headers = match &sender.signing {
                Signing::Pushline(secret) => signed(secret, &body, clock::wall_ms() / 1000).to_vec(),
                Signing::Pusher { key, secret } => pusher_signed(key, secret, &body).to_vec(),
            };
            let post = tokio::time::timeout(sender.timeout, sender.application.post(&sender.url, &headers, body.clone(), MAX_ANSWER_BYTES));
            // Stopping leaves the batch queued, for the drain within the shutdown grace.
            let answer = tokio::select! {
                answer = post => answer,
                _ = stop.cancelled() => return,
            };
            let failure = match answer {
                Ok(Ok(answer)) if (200..300).contains(&answer.status) => None,
                Ok(Ok(answer)) => Some(format!("answered {}", answer.status)),
                Ok(Err(e)) => Some(e),
                Err(_) => Some(format!("no answer within {:?} (--webhook-timeout)", sender.timeout)),
            };
            self.metrics.webhook_batch(failure.is_none());
            let Some(failure) = failure else {
                self.metrics.webhook_events(WebhookOutcome::Sent, events.len());
                return self.done(events.len());
            };
            tracing::debug!(attempt, error = %failure, "webhook batch failed");
            if attempt == sender.attempts {
                tracing::warn!(events = events.len(), attempts = attempt, error = %failure, "webhook batch given up: its events are dropped");
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.cancelled() => return,
            }
            wait = (wait * 2).min(RETRY_MOST);
        }
        self.metrics.webhook_events(WebhookOutcome::GaveUp, events.len());
        self.done(events.len());
    }
}

impl crate::hub::Occupancy for Webhooks {
    fn changed(&self, topic: &str, occupied: bool) {
        self.topic(topic, occupied);
    }
}

/// The headers Pusher signs a webhook with: its app's key, and the hex HMAC-SHA256 of
/// the body with the app's secret.
pub fn pusher_signed(key: &str, secret: &str, body: &[u8]) -> [(HeaderName, HeaderValue); 2] {
    let key_value = HeaderValue::from_str(key).unwrap_or(HeaderValue::from_static(""));
    let signature = crate::pusher::sign(secret, body);
    [
        (HeaderName::from_static("x-pusher-key"), key_value),
        (HeaderName::from_static("x-pusher-signature"), HeaderValue::from_str(&signature).unwrap_or(HeaderValue::from_static(""))),
    ]
}

/// The headers that let the application check a batch came from here, and when.
pub fn signed(secret: &str, body: &[u8], unix_seconds: u64) -> [(HeaderName, HeaderValue); 2] {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let mut context = ring::hmac::Context::with_key(&key);
    context.update(format!("{unix_seconds}.").as_bytes());
    context.update(body);
    let tag = context.sign();
    let hex = crate::wire::hex(tag.as_ref());
    let value = |text: String| HeaderValue::from_str(&text).unwrap_or(HeaderValue::from_static("0"));
    [
        (HeaderName::from_static("x-pushline-timestamp"), value(unix_seconds.to_string())),
        (HeaderName::from_static("x-pushline-signature"), value(format!("sha256={hex}"))),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_the_timestamp_and_body() {
        // `printf '1700000000.{"events":[]}' | openssl dgst -sha256 -hmac secret`
        let [(_, timestamp), (_, signature)] = signed("secret", br#"{"events":[]}"#, 1_700_000_000);
        assert_eq!(timestamp, "1700000000");
        assert_eq!(signature, "sha256=3947de27ec923573170fccda604ddfb25583ff98dc51e96cca2e11c59545026a");
    }
}
