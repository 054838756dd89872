//! A client's own publishes (`{"type":"publish","topic":..,"data":..}`): checked like an
//! API publish (a right to the topic, the size limit, the node's budget) and against the
//! client's own rate, then handed to the registry on a task of their own, so the
//! connection reads on while Redis answers. Kept in the topic's history and delivered to
//! its subscribers on every node, but not to the sender's connection unless it asks
//! (`"echo":true`). Every publish gets one answer with the client's `ref`: `published`
//! once the registry took it (on the connection's queue), or `publish_failed` saying why.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use serde::Serialize;
use serde_json::value::RawValue;
use tokio::sync::OwnedSemaphorePermit;

use super::{Clients, Refused};
use crate::auth::api_keys::CLIENTS_PUBLISHER;
use crate::clock;
use crate::conn::io::Window;
use crate::conn::Conn;
use crate::hub::{self, Hub};
use crate::registry::relay::Target;
use crate::registry::{Job, Published, Registry};
use crate::session::MessageIds;
use crate::telemetry::{ClientError, DropReason, Metrics, PublishKind};
use crate::webhooks::Webhooks;
use crate::wire::{json, ws, Draft};

/// Longest `ref` a client may attach to a publish, in bytes.
const MAX_REF_BYTES: usize = 64;

/// What client publishes share with the publish API.
pub struct Publishing {
    pub registry: Arc<Registry>,
    pub message_ids: Arc<MessageIds>,
    pub max_message_bytes: usize,
    /// Queued bytes across connections above which publishes are refused.
    pub node_queue_max_bytes: usize,
    pub max_per_second: u16,
    /// `--max-publish-bytes-in-flight`, in KiB permits, shared with the publish API: what
    /// publishes being handled may hold at once, whoever sends them.
    pub bytes_in_flight: Arc<tokio::sync::Semaphore>,
}

/// A publish as the client sent it.
#[derive(Debug)]
pub struct Publish {
    pub topic: String,
    pub data: Box<RawValue>,
    /// Deliver it to the sender's own connection too.
    pub echo: bool,
    /// The client's name for it, repeated in the answer.
    pub reference: Option<String>,
}

impl PartialEq for Publish {
    fn eq(&self, other: &Publish) -> bool {
        (&self.topic, self.data.get(), self.echo, &self.reference) == (&other.topic, other.data.get(), other.echo, &other.reference)
    }
}

impl Eq for Publish {}

/// Checks `publish` and starts it; the answer is queued on `conn` when the registry has
/// taken it. `window` is the client's, with this command counted. Refused when the client
/// may not publish to the topic, the data is too large, the client is over its rate, or
/// the node is over its queue budget: then counted, and the `publish_failed` answer returned.
pub fn start(conn: &Arc<Conn>, clients: &Clients, publish: Publish, window: &mut Window) -> Option<Bytes> {
    match check(conn, clients, &publish, window) {
        Ok((data, held)) => {
            let sending = Sending {
                id: clients.publishing.message_ids.next(),
                conn: conn.clone(),
                registry: clients.publishing.registry.clone(),
                hub: clients.hub.clone(),
                metrics: clients.metrics.clone(),
                webhooks: clients.webhooks.clone(),
                accepted_at: Instant::now(),
                _held: held,
            };
            conn.begin_request();
            tokio::spawn(sending.run(publish, data));
            None
        }
        Err(refused) => {
            clients.metrics.client_error(refused.reason);
            let answer = Answer { kind: "publish_failed", id: None, topic: &publish.topic, reference: publish.reference.as_deref(), error: Some(refused.message) };
            Some(ws::text(&serde_json::to_string(&answer).unwrap_or_default()))
        }
    }
}

/// The publish's data, compacted, and its share of the bytes in flight, if it may go out.
fn check(conn: &Conn, clients: &Clients, publish: &Publish, window: &mut Window) -> Result<(String, OwnedSemaphorePermit), Refused> {
    let refused = |reason, message: String| Refused { reason, message };
    let topic = &publish.topic;
    hub::check_topic_name(topic).map_err(|e| refused(ClientError::BadTopic, e))?;
    if publish.reference.as_ref().is_some_and(|r| r.len() > MAX_REF_BYTES) {
        return Err(refused(ClientError::BadJson, format!("`ref` is over {MAX_REF_BYTES} bytes")));
    }
    {
        let auth = clients.auth.load();
        let state = conn.state();
        if state.grant.as_deref().is_some_and(|g| g.expired(clock::wall_ms())) {
            return Err(refused(ClientError::BadToken, "your token expired: send {\"type\":\"refresh\",\"token\":...} before publishing".into()));
        }
        if !auth.may_publish(&conn.uid, state.grant.as_deref(), topic) {
            return Err(refused(ClientError::Forbidden, format!("not allowed to publish to topic `{topic}`")));
        }
    }
    let publishing = &clients.publishing;
    let size = publish.data.get().len();
    if size > publishing.max_message_bytes {
        return Err(refused(ClientError::TooLarge, format!("data is {size} bytes; the limit is {}", publishing.max_message_bytes)));
    }
    // `window.second` is this second's: the command was counted in it.
    if window.publishes >= publishing.max_per_second {
        let max = publishing.max_per_second;
        return Err(refused(ClientError::PublishRate, format!("over {max} publishes per second (--max-client-publishes-per-second); not published")));
    }
    window.publishes += 1;
    if clients.metrics.over_queue_budget(publishing.node_queue_max_bytes).is_some() {
        return Err(refused(ClientError::OverBudget, "this node has too much queued for slow clients; publish later".into()));
    }
    publishing.hold(publish.data.get(), topic, &clients.metrics)
}

impl Publishing {
    /// A client's `data` compacted, with its share of `--max-publish-bytes-in-flight`
    /// held while it is published to `topic`; refused (and a refusal for room counted)
    /// when it nests too deep or the node has no room.
    pub fn hold(&self, data: &str, topic: &str, metrics: &Metrics) -> Result<(String, OwnedSemaphorePermit), Refused> {
        let data = json::compact(data).map_err(|unfit| Refused { reason: ClientError::BadJson, message: format!("data {unfit}") })?.into_owned();
        let kib = (data.len() + topic.len()).div_ceil(1024).max(1) as u32;
        let held = self.bytes_in_flight.clone().try_acquire_many_owned(kib).map_err(|_| {
            metrics.dropped(DropReason::NodeOverBudget, 1);
            let message = "publishes being handled on this node are over its budget (--max-publish-bytes-in-flight); publish later".into();
            Refused { reason: ClientError::OverBudget, message }
        })?;
        Ok((data, held))
    }
}

/// A publish on its way through the registry.
struct Sending {
    id: u64,
    conn: Arc<Conn>,
    registry: Arc<Registry>,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    /// Told of the publish once it went out, when `client_publish` is asked for.
    webhooks: Option<Arc<Webhooks>>,
    accepted_at: Instant,
    /// Its share of `--max-publish-bytes-in-flight`, given back when it is answered.
    _held: OwnedSemaphorePermit,
}

#[derive(Serialize)]
struct Answer<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    /// Set once it was published, or may have been in part.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "json::id_as_text_some")]
    id: Option<u64>,
    topic: &'a str,
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    reference: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl Sending {
    async fn run(self, publish: Publish, data: String) {
        let topic = publish.topic.as_str();
        let except = (!publish.echo).then_some(self.conn.session.0);
        let draft = Draft { id: self.id, publisher: CLIENTS_PUBLISHER, topic: Some(topic), data: &data, accepted_at: self.accepted_at, except, pusher: None };
        let job = Job { draft, target: Target::Topic(topic), key: None };
        let error = match self.registry.publish(&self.hub, &[job]).await.pop() {
            Some(Ok(Published::Delivered(..))) => {
                self.metrics.published(PublishKind::Topic);
                if let Some(webhooks) = &self.webhooks {
                    webhooks.client_publish(topic, &self.conn.uid, self.conn.session.0, self.id, &publish.data);
                }
                None
            }
            Some(Ok(Published::NotReplicated { acked, wanted, .. })) => Some(format!(
                "not_replicated: published, but its write reached {acked} of the {wanted} Redis replicas asked for in time, so it may not survive a failover"
            )),
            Some(Err(e)) => Some(format!("registry unavailable: the message may not have reached every subscriber: {}", e.reason)),
            Some(Ok(Published::Repeated(_) | Published::InProgress | Published::Mismatch)) | None => {
                Some("the registry gave no answer".to_owned())
            }
        };
        let kind = if error.is_some() { "publish_failed" } else { "published" };
        let answer = Answer { kind, id: Some(self.id), topic, reference: publish.reference.as_deref(), error };
        let answer = serde_json::to_string(&answer).unwrap_or_default();
        self.conn.answer_request(&answer, self.hub.limits(), &self.metrics);
    }
}
