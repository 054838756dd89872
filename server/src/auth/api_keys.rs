//! Publish API keys: `--api-key` (every scope), and named keys with scopes from the file
//! named by `--api-keys`:
//!
//! ```toml
//! [[key]]
//! name = "billing"                       # shown in logs instead of the key
//! secret = "at least 32 random bytes...."
//! scopes = ["push", "publish"]           # push, publish, broadcast
//! topics = ["billing.*"]                 # publish only to these (default: any)
//! ```
//!
//! A key is compared in constant time with every configured key, and never logged.

use std::path::Path;

use serde::Deserialize;

use crate::rights::Rights;
use crate::error::Error;
use crate::telemetry::PublishKind;

/// The publisher that clients' own publishes are charged to in history
/// (`--history-max-bytes-per-key`); no API key may take the name.
pub const CLIENTS_PUBLISHER: &str = "clients";

/// Shortest key: 256 bits.
pub const MIN_KEY_BYTES: usize = 32;

pub struct ApiKey {
    pub name: String,
    secret: Box<[u8]>,
    scopes: [bool; 3],
    /// Topics this key may publish to; None: any.
    topics: Option<Rights>,
}

impl ApiKey {
    /// Whether this key may publish a message of `kind`, and, when `topic` is given,
    /// to that topic.
    pub fn allows(&self, kind: PublishKind, topic: Option<&str>) -> bool {
        self.scopes[kind as usize] && topic.is_none_or(|topic| self.topics.as_ref().is_none_or(|t| t.allows(topic)))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    key: Vec<Entry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: String,
    secret: String,
    scopes: Vec<String>,
    #[serde(default)]
    topics: Option<Vec<String>>,
}

/// Every key the publish API takes; none: open mode, no key needed.
#[derive(Default)]
pub struct ApiKeys(Vec<ApiKey>);

fn check_secret(name: &str, secret: &str) -> Result<(), String> {
    match secret.len() {
        0 => Err(format!("{name} is empty (an unset variable in the environment or file?); set a random value of at least {MIN_KEY_BYTES} bytes, e.g. `openssl rand -base64 32`")),
        n if n < MIN_KEY_BYTES => Err(format!("{name} is {n} bytes; use at least {MIN_KEY_BYTES} random bytes, e.g. `openssl rand -base64 32`")),
        _ => Ok(()),
    }
}

impl ApiKeys {
    /// `every_scope` is `--api-key`; `file` is `--api-keys`.
    pub fn load(every_scope: Option<&str>, file: Option<&Path>) -> Result<ApiKeys, Error> {
        let mut keys = Vec::new();
        if let Some(secret) = every_scope {
            check_secret("--api-key", secret).map_err(Error::config)?;
            keys.push(ApiKey { name: "api-key".into(), secret: secret.as_bytes().into(), scopes: [true; 3], topics: None });
        }
        if let Some(path) = file {
            let shown = path.display();
            let text = std::fs::read_to_string(path).map_err(|e| Error::config(format!("--api-keys: cannot read {shown}: {e}")))?;
            let file: File = toml::from_str(&text).map_err(|e| Error::config(format!("--api-keys {shown}: {e}")))?;
            if file.key.is_empty() {
                // Read as "no keys", it would leave the publish API open to anyone.
                return Err(Error::config(format!("--api-keys {shown} holds no [[key]]: the publish API would take no key; add one, or leave --api-keys out")));
            }
            for entry in file.key {
                let name = entry.name;
                // A name scopes its holder's idempotency keys (`<name>/<key>`): one with a `/`
                // could reach into another's, and `api-key` is --api-key's.
                if name.is_empty() || name.contains('/') || name == "api-key" || name == CLIENTS_PUBLISHER {
                    return Err(Error::config(format!(
                        "--api-keys {shown}: key name `{name}`: names are not empty, have no `/` and are not `api-key` (--api-key's) or `{CLIENTS_PUBLISHER}` (what clients publish)"
                    )));
                }
                check_secret(&format!("--api-keys {shown}: key `{name}`"), &entry.secret).map_err(Error::config)?;
                let mut scopes = [false; 3];
                for scope in &entry.scopes {
                    let kind = match scope.as_str() {
                        "push" => PublishKind::Push,
                        "publish" => PublishKind::Topic,
                        "broadcast" => PublishKind::Broadcast,
                        other => return Err(Error::config(format!("--api-keys {shown}: key `{name}`: unknown scope `{other}` (push, publish, broadcast)"))),
                    };
                    scopes[kind as usize] = true;
                }
                let topics = match entry.topics {
                    Some(patterns) => Some(Rights::parse(&patterns, "").map_err(|e| Error::config(format!("--api-keys {shown}: key `{name}`: {e}")))?),
                    None => None,
                };
                keys.push(ApiKey { name, secret: entry.secret.into_bytes().into(), scopes, topics });
            }
        }
        Ok(ApiKeys(keys))
    }

    pub fn is_open(&self) -> bool {
        self.0.is_empty()
    }

    /// The key `given` is, compared with every key in time that does not depend on where
    /// (or whether) one differs.
    pub fn find(&self, given: &str) -> Option<&ApiKey> {
        let given = given.as_bytes();
        let mut found = None;
        for key in &self.0 {
            if super::same_secret(given, &key.secret) && found.is_none() {
                found = Some(key);
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_keys_file_with_no_key_is_refused_not_read_as_open() {
        let dir = std::env::temp_dir().join(format!("pushline-no-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for text in ["", "key = []\n"] {
            let path = dir.join("keys.toml");
            std::fs::write(&path, text).unwrap();
            let refused = ApiKeys::load(None, Some(&path)).err().expect("refused");
            assert!(refused.message.contains("holds no [[key]]"), "{}", refused.message);
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn scopes_and_topics_bound_a_key() {
        let dir = std::env::temp_dir().join(format!("pushline-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keys.toml");
        let pusher = "p".repeat(32);
        let billing = "b".repeat(32);
        std::fs::write(&path, format!("[[key]]\nname = \"pusher\"\nsecret = \"{pusher}\"\nscopes = [\"push\"]\n\n[[key]]\nname = \"billing\"\nsecret = \"{billing}\"\nscopes = [\"publish\"]\ntopics = [\"billing.*\"]\n")).unwrap();
        let keys = ApiKeys::load(None, Some(&path)).unwrap();
        let p = keys.find(&pusher).unwrap();
        assert_eq!(p.name, "pusher");
        assert!(p.allows(PublishKind::Push, None) && !p.allows(PublishKind::Broadcast, None));
        let b = keys.find(&billing).unwrap();
        assert!(b.allows(PublishKind::Topic, Some("billing.eu")) && !b.allows(PublishKind::Topic, Some("news")));
        assert!(keys.find("nope").is_none() && keys.find(&"p".repeat(31)).is_none());
        std::fs::write(&path, "[[key]]\nname = \"x\"\nsecret = \"short\"\nscopes = [\"push\"]\n").unwrap();
        assert!(ApiKeys::load(None, Some(&path)).err().unwrap().message.contains("key `x` is 5 bytes"));
        // A name scopes idempotency keys (`name/key`): none may reach into another's.
        for name in ["a/b", "api-key", ""] {
            std::fs::write(&path, format!("[[key]]\nname = \"{name}\"\nsecret = \"{pusher}\"\nscopes = [\"push\"]\n")).unwrap();
            let refused = ApiKeys::load(None, Some(&path)).err().expect("refused").message;
            assert!(refused.contains("names are not empty, have no `/` and are not `api-key`"), "{name}: {refused}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
