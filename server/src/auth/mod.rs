//! Who a client is and what it may read and publish: a JWT verified with this server's
//! keys ([`keys`]), whose `sub` is the uid, whose `topics` claim lists the topics its holder
//! may subscribe to and whose `publish` claim those it may publish to ([`crate::rights`]);
//! or, in open mode, the `?uid=` it names, reading anything. Publishing needs a right in
//! every mode: the token's, or `--client-publish-topics`.
//!
//! A token is refused, with the reason, when its header names another algorithm than its
//! key's or a critical extension, when it is not yet valid (`nbf`) or no longer valid
//! (`exp`), or when it lives longer than `--jwt-max-lifetime`.

pub mod api_keys;
pub mod keys;

use std::time::Duration;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::Validation;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::clock;
use crate::config::Config;
use crate::error::{Error, Kind};
use api_keys::ApiKeys;
use keys::Keys;
use crate::rights::Rights;

/// Every credential the server checks, read from the settings and the files they name;
/// read again on SIGHUP.
pub struct Credentials {
    pub auth: Auth,
    pub api_keys: ApiKeys,
}

impl Credentials {
    pub fn load(config: &Config) -> Result<Credentials, Error> {
        let keys = if config.open_mode() { None } else { Some(Keys::load(config.jwt_secret.as_deref(), &config.jwt_public_key)?) };
        let api_keys = ApiKeys::load(config.api_key.as_deref(), config.api_keys.as_deref())?;
        let auth = Auth::new(keys, config.jwt_max_lifetime, config.public_topics.clone(), config.client_publish_topics.clone());
        Ok(Credentials { auth, api_keys })
    }
}

/// Longest uid, in bytes.
pub const MAX_UID_BYTES: usize = 256;

/// Checks a uid a client claims, a token names or an application gives.
pub fn check_uid(uid: &str) -> Result<(), String> {
    if uid.is_empty() || uid.len() > MAX_UID_BYTES {
        return Err(format!("uid must be 1 to {MAX_UID_BYTES} bytes"));
    }
    if uid.starts_with(crate::pusher::PREFIX) {
        return Err(format!("uids starting with `{}` are Pusher connections'", crate::pusher::PREFIX));
    }
    Ok(())
}

/// Longest token accepted, in bytes: a JWT is a few hundred.
const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// What a verified token grants, for as long as it is valid.
#[derive(Debug)]
pub struct Grant {
    /// Unix seconds.
    pub expires_at: u64,
    pub rights: Rights,
    /// Topics its holder may publish to.
    pub publish: Rights,
    /// Its holder has been told it expired (once: TCP does not lose the notice).
    pub expiry_told: bool,
    /// Topics subscribed with a per-subscription token, each until that token expires.
    pub tickets: Vec<Ticket>,
    /// Topics whose ticket expired, left and not yet told to the client.
    pub revoked: Vec<String>,
}

/// A topic a per-subscription token granted, and until when (Unix seconds).
#[derive(Debug)]
pub struct Ticket {
    pub topic: String,
    pub expires_at: u64,
}

/// The expiry of a ticket held until its topic is left: granted by the application (a
/// hook), not by a token. In seconds, so that `* 1000` stays in range.
pub const HELD: u64 = u64::MAX / 1000;

impl Grant {
    /// What an open-mode connection holds once the connect hook gave it an expiry: every
    /// topic, until then; no token can refresh it.
    pub fn open_until(expires_at: u64) -> Grant {
        let rights = Rights::parse(&["*".to_owned()], "").unwrap_or_default();
        Grant { expires_at, rights, publish: Rights::default(), expiry_told: false, tickets: Vec::new(), revoked: Vec::new() }
    }

    /// Whether a ticket it holds grants `topic`.
    pub fn has_ticket(&self, topic: &str) -> bool {
        self.tickets.iter().any(|t| t.topic == topic)
    }

    /// Whether it expired by `wall_ms`.
    pub fn expired(&self, wall_ms: u64) -> bool {
        wall_ms >= self.expires_at * 1000
    }
}

pub struct Identity {
    pub uid: String,
    /// None in open mode, where every topic may be read and nothing expires.
    pub grant: Option<Grant>,
    /// What the holder shows of itself in presence topics: the token's `info` claim, or
    /// `?info=` in open mode; checked by the gateway.
    pub info: Option<Box<RawValue>>,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default)]
    topics: Vec<String>,
    #[serde(default)]
    publish: Vec<String>,
    #[serde(default)]
    info: Option<Box<RawValue>>,
}

fn refused(message: impl Into<String>) -> Error {
    Error::new(Kind::Unauthorized, message)
}

/// The claims of a token [`Auth::authenticate`] verified, as its payload holds them: what
/// the connect hook is shown.
pub fn claims_of(token: &str) -> Option<Box<RawValue>> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Whether `given` is `secret`, in time that does not depend on where they differ.
pub fn same_secret(given: &[u8], secret: &[u8]) -> bool {
    given.len() == secret.len() && given.iter().zip(secret).fold(0, |acc, (a, b)| acc | (a ^ b)) == 0
}

pub struct Auth {
    /// None: open mode.
    keys: Option<Keys>,
    max_lifetime: Duration,
    /// Topics every authenticated client may read (`--public-topics`), `{sub}` expanded
    /// per client.
    public: Vec<String>,
    /// Topics every client may publish to (`--client-publish-topics`), likewise.
    publish: Vec<String>,
}

impl Auth {
    pub fn new(keys: Option<Keys>, max_lifetime: Duration, public: Vec<String>, publish: Vec<String>) -> Auth {
        Auth { keys, max_lifetime, public, publish }
    }

    pub fn is_open(&self) -> bool {
        self.keys.is_none()
    }

    /// `token` from `?token=` or `Authorization: Bearer`; `uid` and `info` from `?uid=` and
    /// `?info=` (open mode).
    pub fn authenticate(&self, token: Option<&str>, uid: Option<&str>, info: Option<&str>) -> Result<Identity, Error> {
        let identity = match &self.keys {
            None => {
                let uid = uid.ok_or_else(|| refused("open mode: pass the uid as ?uid="))?.to_owned();
                let info = info.map(|i| RawValue::from_string(i.to_owned())).transpose().map_err(|e| Error::bad_request(format!("?info= is not JSON: {e}")))?;
                Identity { uid, grant: None, info }
            }
            Some(_) => {
                let token = token.ok_or_else(|| refused("missing token: pass ?token= or Authorization: Bearer"))?;
                let (claims, grant) = self.verify_claims(token)?;
                Identity { uid: claims.sub, grant: Some(grant), info: claims.info }
            }
        };
        check_uid(&identity.uid).map_err(refused)?;
        Ok(identity)
    }

    /// Verifies a token: its `sub` and what it grants. In open mode every token is refused.
    pub fn verify(&self, token: &str) -> Result<(String, Grant), Error> {
        self.verify_claims(token).map(|(claims, grant)| (claims.sub, grant))
    }

    fn verify_claims(&self, token: &str) -> Result<(Claims, Grant), Error> {
        let keys = self.keys.as_ref().ok_or_else(|| refused("open mode takes no tokens"))?;
        if token.len() > MAX_TOKEN_BYTES {
            return Err(refused(format!("token is over {MAX_TOKEN_BYTES} bytes")));
        }
        let (key, algorithm) = keys.for_token(token)?;
        let mut validation = Validation::new(algorithm);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = 0;
        let claims = jsonwebtoken::decode::<Claims>(token, key, &validation)
            .map_err(|e| {
                refused(match e.kind() {
                    ErrorKind::ExpiredSignature => "token expired".into(),
                    ErrorKind::ImmatureSignature => "token not valid yet (nbf is in the future)".into(),
                    ErrorKind::InvalidSignature => "token signature does not verify".into(),
                    ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                        format!("token algorithm not accepted: {algorithm:?} only")
                    }
                    ErrorKind::MissingRequiredClaim(claim) => format!("token has no `{claim}` claim"),
                    _ => format!("invalid token: {e}"),
                })
            })?
            .claims;
        if claims.exp > clock::wall_ms() / 1000 + self.max_lifetime.as_secs() {
            return Err(refused(format!(
                "token expires more than {} from now; the most --jwt-max-lifetime allows",
                humantime::format_duration(self.max_lifetime)
            )));
        }
        let rights = Rights::parse(&claims.topics, &claims.sub).map_err(|e| refused(format!("token `topics` claim: {e}")))?;
        let publish = Rights::parse(&claims.publish, &claims.sub).map_err(|e| refused(format!("token `publish` claim: {e}")))?;
        let grant = Grant { expires_at: claims.exp, rights, publish, expiry_told: false, tickets: Vec::new(), revoked: Vec::new() };
        Ok((claims, grant))
    }

    /// Whether `uid`, holding `grant`, may read `topic`.
    pub fn may_read(&self, uid: &str, grant: Option<&Grant>, topic: &str) -> bool {
        let Some(grant) = grant else { return self.is_open() };
        grant.rights.allows(topic) || Rights::parse(&self.public, uid).is_ok_and(|public| public.allows(topic))
    }

    /// Whether `uid`, holding `grant` (None in open mode), may publish to `topic`.
    pub fn may_publish(&self, uid: &str, grant: Option<&Grant>, topic: &str) -> bool {
        grant.is_some_and(|g| g.publish.allows(topic)) || Rights::parse(&self.publish, uid).is_ok_and(|everyone| everyone.allows(topic))
    }

    /// The first of `topics` that `uid` may not read, as a refusal naming it.
    pub fn check_topics(&self, uid: &str, grant: Option<&Grant>, topics: &[String]) -> Result<(), Error> {
        match topics.iter().find(|t| !self.may_read(uid, grant, t)) {
            Some(topic) => Err(Error::new(Kind::Forbidden, format!("not allowed to read topic `{topic}`"))),
            None => Ok(()),
        }
    }
}
