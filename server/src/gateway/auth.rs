//! Who a client is: an HS256 JWT whose `sub` is the uid, or in open mode the `?uid=`
//! it names.

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::error::{Error, Kind};

/// Longest uid, in bytes.
pub const MAX_UID_BYTES: usize = 256;

pub struct Identity {
    pub uid: String,
}

pub enum Auth {
    /// Anyone may connect as any uid; only allowed on loopback.
    Open,
    Jwt { key: DecodingKey, validation: Validation },
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
}

impl Auth {
    pub fn new(jwt_secret: Option<&str>) -> Auth {
        match jwt_secret {
            None => Auth::Open,
            Some(secret) => {
                // Only HS256: a token naming `none` or any other algorithm is refused.
                let mut validation = Validation::new(Algorithm::HS256);
                validation.set_required_spec_claims(&["exp", "sub"]);
                validation.leeway = 0;
                Auth::Jwt { key: DecodingKey::from_secret(secret.as_bytes()), validation }
            }
        }
    }

    /// `token` from `?token=` or `Authorization: Bearer`; `uid` from `?uid=` (open mode).
    pub fn authenticate(&self, token: Option<&str>, uid: Option<&str>) -> Result<Identity, Error> {
        let refused = |message: String| Error::new(Kind::Unauthorized, message);
        let uid = match self {
            Auth::Open => uid.ok_or_else(|| refused("open mode: pass the uid as ?uid=".into()))?.to_owned(),
            Auth::Jwt { key, validation } => {
                let token = token.ok_or_else(|| refused("missing token: pass ?token= or Authorization: Bearer".into()))?;
                match jsonwebtoken::decode::<Claims>(token, key, validation) {
                    Ok(data) => data.claims.sub,
                    Err(e) => {
                        return Err(refused(match e.kind() {
                            ErrorKind::ExpiredSignature => "token expired".into(),
                            ErrorKind::InvalidSignature => "token signature does not verify".into(),
                            ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                                "token algorithm not accepted: HS256 only".into()
                            }
                            ErrorKind::MissingRequiredClaim(claim) => format!("token has no `{claim}` claim"),
                            _ => format!("invalid token: {e}"),
                        }))
                    }
                }
            }
        };
        if uid.is_empty() || uid.len() > MAX_UID_BYTES {
            return Err(refused(format!("uid must be 1 to {MAX_UID_BYTES} bytes")));
        }
        Ok(Identity { uid })
    }
}
