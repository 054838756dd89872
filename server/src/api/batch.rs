//! `POST /v1/batch`: many publishes in one request, a JSON array or NDJSON lines, each
//! read, checked, published and answered on its own, in order.

use std::collections::HashSet;
use std::time::Instant;

use serde::de::DeserializeSeed;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::body::{is_object, Body};
use super::{Answer, Api, Checked, Failed, Refused, ENVELOPE_ALLOWANCE};
use crate::auth::api_keys::ApiKey;
use crate::error::{Error, Kind};
use crate::history::idempotency;
use crate::telemetry::PublishKind;

/// One entry of a `/v1/batch`: exactly one of `push`, `publish`, `broadcast` (the bodies
/// of those endpoints), and its own idempotency key.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchItem<'a> {
    #[serde(borrow, default)]
    push: Option<&'a RawValue>,
    #[serde(borrow, default)]
    publish: Option<&'a RawValue>,
    #[serde(borrow, default)]
    broadcast: Option<&'a RawValue>,
    #[serde(default)]
    idempotency_key: Option<String>,
}

impl Api {
    /// `/v1/batch`: a JSON array (or NDJSON lines) of items, each checked, published and
    /// answered on its own, in order; one bad item fails only itself.
    pub(super) async fn batch(&self, body: &[u8], ndjson: bool, holder: Option<&ApiKey>, accepted_at: Instant) -> Result<Answer, Error> {
        let too_many = || Error::new(Kind::PayloadTooLarge, format!("batch has more than {} items (--max-batch)", self.max_batch));
        let raw: Vec<&RawValue> = if ndjson {
            let mut raw = Vec::new();
            for (n, line) in body.split(|b| *b == b'\n').enumerate().filter(|(_, line)| !line.trim_ascii().is_empty()) {
                if raw.len() == self.max_batch {
                    return Err(too_many());
                }
                raw.push(serde_json::from_slice(line).map_err(|e| Error::bad_request(format!("line {}: bad JSON: {e}", n + 1)))?);
            }
            raw
        } else {
            // Read up to one item past the limit, so a body of a million tiny items costs
            // no more than the limit's worth.
            let mut items = serde_json::Deserializer::from_slice(body);
            let raw = Items { max: self.max_batch }.deserialize(&mut items).and_then(|raw| items.end().map(|()| raw));
            match raw {
                Ok(Some(raw)) => raw,
                Ok(None) => return Err(too_many()),
                Err(e) => return Err(Error::bad_request(format!("bad JSON: a batch is an array of items: {e}"))),
            }
        };
        if raw.is_empty() {
            return Err(Error::bad_request("a batch needs at least one item"));
        }
        let publisher = holder.map_or("", |key| key.name.as_str());
        // An item is held to what its own endpoint takes before it is read: its uids would
        // otherwise be parsed whole first.
        let limit = self.max_message_bytes + ENVELOPE_ALLOWANCE;
        let read: Vec<Result<(Body, Option<String>), Error>> = raw
            .iter()
            .map(|item| match item.get().len() {
                n if n > limit => Err(Error::new(Kind::PayloadTooLarge, format!("item is {n} bytes, over {limit} (what its own endpoint takes)"))),
                _ => read_item(item),
            })
            .collect();
        // Keys of the items checked so far: a second item with one would find the first
        // still being published.
        let mut keys = HashSet::new();
        let checked: Vec<Result<Checked, Error>> = read
            .iter()
            .zip(&raw)
            .map(|(read, item)| {
                let (body, key) = read.as_ref().map_err(Clone::clone)?;
                let key = key
                    .as_deref()
                    .map(|key| idempotency::Key::new(publisher, key, <&str>::from(body.kind()), item.get().as_bytes()))
                    .transpose()
                    .map_err(Error::bad_request)?;
                let checked = self.check(body, holder, key)?;
                if checked.key.as_ref().is_some_and(|key| !keys.insert(key.scoped.clone())) {
                    return Err(Error::bad_request("this idempotency_key is given to an earlier item of the batch"));
                }
                Ok(checked)
            })
            .collect();
        self.within_uid_cap(checked.iter().filter_map(|c| c.as_ref().ok()).map(Checked::uids).sum())?;
        let ready: Vec<&Checked> = checked.iter().filter_map(|c| c.as_ref().ok()).collect();
        let mut answers = self.run(&ready, publisher, accepted_at).await.into_iter().zip(&ready);
        // Each entry is JSON this server wrote (an answer, a refusal, a kept first answer).
        let mut body = String::with_capacity(16 + 96 * checked.len());
        body.push_str(r#"{"results":["#);
        for (i, item) in checked.iter().enumerate() {
            let answered = match item {
                Err(e) => Err(Failed::from(e.clone())),
                Ok(_) => match answers.next() {
                    Some((answer, checked)) => self.answer(checked, answer),
                    None => Err(Failed::from(Error::unavailable("the registry gave no answer"))),
                },
            };
            self.metrics.api_batch_item(answered.as_ref().map_or_else(|failed| failed.error.kind.status(), |_| 200));
            let text = answered.unwrap_or_else(|failed| refused(&failed));
            if i > 0 {
                body.push(',');
            }
            body.push_str(&text);
        }
        body.push_str("]}");
        Ok(Answer::ok(body))
    }
}

/// A batch's items, read as raw JSON up to `max`: `None` past it.
struct Items {
    max: usize,
}

impl<'de> serde::de::DeserializeSeed<'de> for Items {
    type Value = Option<Vec<&'de RawValue>>;

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Items {
    type Value = Option<Vec<&'de RawValue>>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an array of items")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            if items.len() == self.max {
                // Skipped, not kept: the rest costs parsing, no memory.
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                return Ok(None);
            }
            items.push(item);
        }
        Ok(Some(items))
    }
}

/// One batch item read: its publish and its idempotency key, or why it is refused.
fn read_item<'a>(item: &'a RawValue) -> Result<(Body<'a>, Option<String>), Error> {
    if !is_object(item.get().as_bytes()) {
        return Err(Error::bad_request("bad item: an item must be a JSON object"));
    }
    let item: BatchItem = serde_json::from_str(item.get()).map_err(|e| Error::bad_request(format!("bad item: {e}")))?;
    let (field, kind, body) = match (item.push, item.publish, item.broadcast) {
        (Some(push), None, None) => ("push", PublishKind::Push, push),
        (None, Some(publish), None) => ("publish", PublishKind::Topic, publish),
        (None, None, Some(broadcast)) => ("broadcast", PublishKind::Broadcast, broadcast),
        _ => return Err(Error::bad_request("an item holds exactly one of `push`, `publish`, `broadcast`")),
    };
    if !is_object(body.get().as_bytes()) {
        return Err(Error::bad_request(format!("bad item: `{field}` must be a JSON object")));
    }
    let body = Body::read(kind, body.get().as_bytes()).map_err(|e| Error::bad_request(format!("bad item: `{field}`: {e}")))?;
    Ok((body, item.idempotency_key))
}

/// A batch item's refusal, as its entry in the results.
fn refused(failed: &Failed) -> String {
    let refused = Refused { error: &failed.error.message, status: Some(failed.error.kind.status()), id: failed.id };
    serde_json::to_string(&refused).unwrap_or_default()
}
