//! A publish as its request spells it: the bodies of `/v1/push`, `/v1/publish` and
//! `/v1/broadcast`, read borrowing from the request, and the first checks of their fields.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::Error;
use crate::registry;
use crate::telemetry::PublishKind;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushBody<'a> {
    #[serde(borrow)]
    pub uids: Vec<Uid<'a>>,
    #[serde(borrow)]
    pub data: &'a RawValue,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishBody<'a> {
    #[serde(borrow)]
    pub topic: Cow<'a, str>,
    #[serde(borrow)]
    pub data: &'a RawValue,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BroadcastBody<'a> {
    #[serde(borrow)]
    pub data: &'a RawValue,
}

/// A uid as the body spells it: borrowed unless it has escapes to undo. (serde borrows a
/// `Cow` only as a field of its own, not inside a `Vec`.)
#[derive(Deserialize)]
pub struct Uid<'a>(#[serde(borrow)] pub Cow<'a, str>);

/// A publish as read from a request body, before it is checked.
pub enum Body<'a> {
    Push(PushBody<'a>),
    Publish(PublishBody<'a>),
    Broadcast(BroadcastBody<'a>),
}

impl<'a> Body<'a> {
    /// The body of a publish of `kind`, from `json` (already known to be an object).
    pub fn read(kind: PublishKind, json: &'a [u8]) -> Result<Body<'a>, serde_json::Error> {
        match kind {
            PublishKind::Push => serde_json::from_slice(json).map(Body::Push),
            PublishKind::Topic => serde_json::from_slice(json).map(Body::Publish),
            PublishKind::Broadcast => serde_json::from_slice(json).map(Body::Broadcast),
        }
    }

    pub fn kind(&self) -> PublishKind {
        match self {
            Body::Push(_) => PublishKind::Push,
            Body::Publish(_) => PublishKind::Topic,
            Body::Broadcast(_) => PublishKind::Broadcast,
        }
    }
}

/// Whether `json` is an object: serde would also read a struct from an array of its
/// fields in order, which is not a form this API takes.
pub fn is_object(json: &[u8]) -> bool {
    json.trim_ascii_start().first() == Some(&b'{')
}

/// The uids a push names, checked: 1 to `MAX_UID_BYTES` bytes each, at least one.
pub fn checked_uids<'a>(uids: &'a [Uid<'a>]) -> Result<Vec<&'a str>, Error> {
    if uids.is_empty() {
        return Err(Error::bad_request("uids must list at least one uid"));
    }
    // A uid no client can connect as would fill a mailbox nobody can read.
    if let Some(Uid(bad)) = uids.iter().find(|Uid(u)| u.is_empty() || u.len() > crate::auth::MAX_UID_BYTES) {
        return Err(Error::bad_request(format!("uid `{bad}` is {} bytes; uids are 1 to {} bytes", bad.len(), crate::auth::MAX_UID_BYTES)));
    }
    if let Some(Uid(bad)) = uids.iter().find(|Uid(u)| u.starts_with(crate::pusher::PREFIX)) {
        return Err(Error::bad_request(format!("uid `{bad}` is a Pusher connection's: reach it through the Pusher API")));
    }
    // A uid listed twice gets the message once.
    Ok(registry::distinct(uids.iter().map(|Uid(u)| u.as_ref())))
}
