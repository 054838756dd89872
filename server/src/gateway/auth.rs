//! Who a client is: an HS256 JWT whose `sub` is the uid, or in open mode the `?uid=`
//! it names.
//!
//! A token is refused, with the reason, when its header names another algorithm or a
//! critical extension this server does not implement, when it is not yet valid (`nbf`)
//! or no longer valid (`exp`), or when it lives longer than `--jwt-max-lifetime`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::error::{Error, Kind};

/// Longest uid, in bytes.
pub const MAX_UID_BYTES: usize = 256;

/// Longest token accepted, in bytes: a JWT is a few hundred.
const MAX_TOKEN_BYTES: usize = 8 * 1024;

pub struct Identity {
    pub uid: String,
}

pub enum Auth {
    /// Anyone may connect as any uid; only allowed on loopback.
    Open,
    Jwt { key: DecodingKey, validation: Validation, max_lifetime: Duration },
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
}

/// The parts of a token's header read before its signature is checked.
#[derive(Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    crit: Option<serde_json::Value>,
}

fn refused(message: impl Into<String>) -> Error {
    Error::new(Kind::Unauthorized, message)
}

/// Refuses a header that names anything but HS256, or critical extensions (RFC 7515
/// 4.1.11: a recipient that does not understand them must reject the token).
fn check_header(token: &str) -> Result<(), Error> {
    let encoded = token.split('.').next().unwrap_or_default();
    let header: Header = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(encoded)
        .ok()
        .and_then(|json| serde_json::from_slice(&json).ok())
        .ok_or_else(|| refused("invalid token: its header is not base64url JSON with an `alg`"))?;
    if header.alg != "HS256" {
        return Err(refused("token algorithm not accepted: HS256 only"));
    }
    if let Some(crit) = header.crit {
        return Err(refused(format!("token has critical header parameters this server does not implement: {crit}")));
    }
    Ok(())
}

fn now_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Auth {
    pub fn new(jwt_secret: Option<&str>, max_lifetime: Duration) -> Auth {
        match jwt_secret {
            None => Auth::Open,
            Some(secret) => {
                let mut validation = Validation::new(Algorithm::HS256);
                validation.set_required_spec_claims(&["exp", "sub"]);
                validation.validate_nbf = true;
                validation.leeway = 0;
                Auth::Jwt { key: DecodingKey::from_secret(secret.as_bytes()), validation, max_lifetime }
            }
        }
    }

    /// `token` from `?token=` or `Authorization: Bearer`; `uid` from `?uid=` (open mode).
    pub fn authenticate(&self, token: Option<&str>, uid: Option<&str>) -> Result<Identity, Error> {
        let uid = match self {
            Auth::Open => uid.ok_or_else(|| refused("open mode: pass the uid as ?uid="))?.to_owned(),
            Auth::Jwt { key, validation, max_lifetime } => {
                let token = token.ok_or_else(|| refused("missing token: pass ?token= or Authorization: Bearer"))?;
                if token.len() > MAX_TOKEN_BYTES {
                    return Err(refused(format!("token is over {MAX_TOKEN_BYTES} bytes")));
                }
                check_header(token)?;
                let claims = jsonwebtoken::decode::<Claims>(token, key, validation)
                    .map_err(|e| {
                        refused(match e.kind() {
                            ErrorKind::ExpiredSignature => "token expired".into(),
                            ErrorKind::ImmatureSignature => "token not valid yet (nbf is in the future)".into(),
                            ErrorKind::InvalidSignature => "token signature does not verify".into(),
                            ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                                "token algorithm not accepted: HS256 only".into()
                            }
                            ErrorKind::MissingRequiredClaim(claim) => format!("token has no `{claim}` claim"),
                            _ => format!("invalid token: {e}"),
                        })
                    })?
                    .claims;
                if claims.exp > now_s() + max_lifetime.as_secs() {
                    return Err(refused(format!(
                        "token expires more than {} from now; the most --jwt-max-lifetime allows",
                        humantime::format_duration(*max_lifetime)
                    )));
                }
                claims.sub
            }
        };
        if uid.is_empty() || uid.len() > MAX_UID_BYTES {
            return Err(refused(format!("uid must be 1 to {MAX_UID_BYTES} bytes")));
        }
        Ok(Identity { uid })
    }
}
