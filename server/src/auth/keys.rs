//! The keys client tokens are verified with: an HS256 secret, and public keys (RSA, EC
//! P-256, Ed25519) from PEM files, each under a key id (`kid`). A key's type fixes the one
//! algorithm it verifies, so a token cannot choose how it is checked: an HS256 token
//! naming an RSA key's id is refused, never checked with the public key as a secret.

use std::collections::HashMap;

use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;

use crate::error::{Error, Kind};

struct Key {
    key: DecodingKey,
    algorithm: Algorithm,
}

pub struct Keys {
    /// Tokens without a `kid`.
    secret: Option<Key>,
    by_kid: HashMap<String, Key>,
}

/// The parts of a token's header read before its signature is checked.
#[derive(Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    crit: Option<serde_json::Value>,
}

fn refused(message: impl Into<String>) -> Error {
    Error::new(Kind::Unauthorized, message)
}

/// A public key from PEM text: its type (RSA, EC, Ed25519) gives its algorithm.
fn public_key(pem: &[u8]) -> Option<Key> {
    if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
        return Some(Key { key, algorithm: Algorithm::RS256 });
    }
    if let Ok(key) = DecodingKey::from_ec_pem(pem) {
        return Some(Key { key, algorithm: Algorithm::ES256 });
    }
    DecodingKey::from_ed_pem(pem).ok().map(|key| Key { key, algorithm: Algorithm::EdDSA })
}

impl Keys {
    /// `secret` verifies HS256 tokens without a `kid`; each of `public` is `KID=FILE`, a
    /// PEM public key.
    pub fn load(secret: Option<&str>, public: &[String]) -> Result<Keys, Error> {
        let mut by_kid = HashMap::new();
        for entry in public {
            let (kid, path) = entry
                .split_once('=')
                .ok_or_else(|| Error::config(format!("--jwt-public-key `{entry}`: expected KID=FILE")))?;
            let pem = std::fs::read(path).map_err(|e| Error::config(format!("--jwt-public-key {kid}: cannot read {path}: {e}")))?;
            let key = public_key(&pem).ok_or_else(|| {
                Error::config(format!("--jwt-public-key {kid}: {path} is not a PEM RSA, EC P-256 or Ed25519 public key"))
            })?;
            if by_kid.insert(kid.to_owned(), key).is_some() {
                return Err(Error::config(format!("--jwt-public-key: key id `{kid}` given twice")));
            }
        }
        let secret = secret.map(|s| Key { key: DecodingKey::from_secret(s.as_bytes()), algorithm: Algorithm::HS256 });
        Ok(Keys { secret, by_kid })
    }

    /// The key and algorithm a token must be verified with, from its header; refuses a
    /// header that names another algorithm than its key's, an unknown key id, or critical
    /// extensions (RFC 7515 4.1.11: a recipient that does not understand them must reject
    /// the token).
    pub fn for_token(&self, token: &str) -> Result<(&DecodingKey, Algorithm), Error> {
        let encoded = token.split('.').next().unwrap_or_default();
        let header: Header = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(encoded)
            .ok()
            .and_then(|json| serde_json::from_slice(&json).ok())
            .ok_or_else(|| refused("invalid token: its header is not base64url JSON with an `alg`"))?;
        if let Some(crit) = header.crit {
            return Err(refused(format!("token has critical header parameters this server does not implement: {crit}")));
        }
        let key = match &header.kid {
            Some(kid) => self.by_kid.get(kid).ok_or_else(|| refused(format!("token key id `{kid}` is not one of this server's")))?,
            None => self.secret.as_ref().ok_or_else(|| refused("token names no key id (`kid`), and this server has no shared secret"))?,
        };
        let expected = format!("{:?}", key.algorithm);
        if header.alg != expected {
            return Err(refused(format!("token algorithm not accepted: {expected} only")));
        }
        Ok((&key.key, key.algorithm))
    }
}
