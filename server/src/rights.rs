//! Topic rights: sets of topics given as exact names or prefixes ending in `*`, where
//! `{sub}` stands for the holder's uid. What a token (or the public list) lets its holder
//! read, what an API key may publish to, which topics keep no history.
//!
//! A uid is written into a pattern escaped ([`topic_segment`]): every byte but ASCII
//! letters, digits, `-`, `_`, `@` and `~` becomes `%XX`. So a uid is never read as a
//! pattern (`*`), never spans a separator (`.`, `:`, `/`), and two uids never expand to
//! the same text: a pattern grants each uid topics no other uid's expansion reaches,
//! as long as in a prefix pattern every `{sub}` is followed by a character the escaping
//! never writes (`user.{sub}.*`, not `user.{sub}*`, which would give `al` all of
//! `alice`'s topics); such a pattern is refused.

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// What a uid keeps as it is in a topic name; everything else is `%XX`.
const KEPT_IN_TOPICS: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'@').remove(b'~');

/// The uid as it appears where a pattern says `{sub}`: the name an application gives
/// a uid's own topics (`user.` + `topic_segment("john.doe@example.com")` + `.inbox` is
/// `user.john%2Edoe@example%2Ecom.inbox`).
pub fn topic_segment(uid: &str) -> String {
    utf8_percent_encode(uid, KEPT_IN_TOPICS).to_string()
}

/// One right, with `{sub}` already expanded.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Pattern {
    Exact(Box<str>),
    /// Every topic that starts with this.
    Prefix(Box<str>),
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rights(Vec<Pattern>);

/// Longest pattern accepted, in bytes (topics are at most 256).
const MAX_PATTERN_BYTES: usize = 512;
/// Most patterns in one token or list.
const MAX_PATTERNS: usize = 256;

const SUB: &str = "{sub}";

/// Whether what follows a `{sub}` in a prefix pattern ends the uid's part of the topic:
/// a byte the escaping never writes (`%` it does write).
fn ends_the_uid(rest: &str) -> bool {
    rest.bytes().next().is_some_and(|b| b != b'%' && b != b'*' && !b.is_ascii_alphanumeric() && !b"-_@~".contains(&b))
}

impl Rights {
    /// Rights from `patterns` for the holder `sub`. A pattern with `*` anywhere but at its
    /// end is refused (say which), so a typo cannot grant more than meant; so is a prefix
    /// pattern where `{sub}` is not followed by a separator.
    pub fn parse(patterns: &[String], sub: &str) -> Result<Rights, String> {
        if patterns.len() > MAX_PATTERNS {
            return Err(format!("{} topic patterns; at most {MAX_PATTERNS}", patterns.len()));
        }
        let segment = topic_segment(sub);
        let rights = patterns
            .iter()
            .map(|pattern| {
                if pattern.is_empty() || pattern.len() > MAX_PATTERN_BYTES {
                    return Err(format!("topic patterns are 1 to {MAX_PATTERN_BYTES} bytes"));
                }
                let (body, prefix) = match pattern.strip_suffix('*') {
                    Some(body) => (body, true),
                    None => (pattern.as_str(), false),
                };
                if body.contains('*') {
                    return Err(format!("topic pattern `{pattern}`: `*` may only end a pattern"));
                }
                if prefix && pattern.match_indices(SUB).any(|(at, _)| !ends_the_uid(&pattern[at + SUB.len()..])) {
                    return Err(format!(
                        "topic pattern `{pattern}`: in a prefix pattern `{{sub}}` must be followed by a separator such as `.`, or one uid's topics would be another's"
                    ));
                }
                // The escaped uid holds no `*` and no `{`: expanding adds no pattern syntax.
                let expanded = body.replace(SUB, &segment);
                Ok(if prefix { Pattern::Prefix(expanded.into()) } else { Pattern::Exact(expanded.into()) })
            })
            .collect::<Result<_, _>>()?;
        Ok(Rights(rights))
    }

    pub fn allows(&self, topic: &str) -> bool {
        self.0.iter().any(|p| match p {
            Pattern::Exact(name) => **name == *topic,
            Pattern::Prefix(prefix) => topic.starts_with(&**prefix),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rights(patterns: &[&str], sub: &str) -> Rights {
        Rights::parse(&patterns.iter().map(|p| p.to_string()).collect::<Vec<_>>(), sub).unwrap()
    }

    #[test]
    fn exact_prefix_and_sub() {
        let r = rights(&["news", "sport.*", "user.{sub}.*", "dm.{sub}"], "alice");
        for allowed in ["news", "sport.", "sport.football", "user.alice.inbox", "dm.alice"] {
            assert!(r.allows(allowed), "{allowed}");
        }
        for refused in ["news2", "sport", "user.bob.inbox", "dm.bob", "dm.alice.x", "user.alice"] {
            assert!(!r.allows(refused), "{refused}");
        }
        assert!(!Rights::default().allows("news"));
    }

    #[test]
    fn a_star_only_ends_a_pattern() {
        assert!(Rights::parse(&["a*b".into()], "x").unwrap_err().contains("`a*b`"));
        assert!(Rights::parse(&["*".into()], "x").unwrap().allows("anything"));
        assert!(Rights::parse(&["".into()], "x").is_err());
    }

    /// No uid reads a topic the same pattern grants another uid, whatever bytes it holds.
    #[test]
    fn a_uid_never_widens_its_grant() {
        let uids = ["alice", "al", "*", "al*", "a.b", "a", "john", "john.doe@example.com", "{sub}", "%2A", "a%2Eb", "a,b", "a\u{1}b", "ä", "ＡＢ", "a b", "a:b", "a/b"];
        let patterns = ["dm.{sub}", "user.{sub}.*", "room.{sub}:*", "{sub}.x.*", "{sub}", "a.{sub}.{sub}"];
        for pattern in patterns {
            for owner in uids {
                let owned = rights(&[pattern], owner);
                // A topic this pattern grants `owner`: the expansion, and for a prefix one name under it.
                let granted = match &owned.0[0] {
                    Pattern::Exact(name) => name.to_string(),
                    Pattern::Prefix(prefix) => format!("{prefix}inbox"),
                };
                for other in uids.iter().filter(|u| **u != owner) {
                    assert!(!rights(&[pattern], other).allows(&granted), "`{other}` reads `{granted}` of `{owner}` through `{pattern}`");
                }
                assert!(owned.allows(&granted));
            }
        }
    }

    #[test]
    fn uids_are_escaped_where_sub_stands() {
        assert_eq!(topic_segment("john.doe@example.com"), "john%2Edoe@example%2Ecom");
        assert_eq!(topic_segment("a*{sub}%,\u{7f}ä-_~"), "a%2A%7Bsub%7D%25%2C%7F%C3%A4-_~");
        let r = rights(&["user.{sub}.*", "dm.{sub}"], "*");
        assert!(r.allows("dm.%2A") && r.allows("user.%2A.inbox"));
        assert!(!r.allows("dm.alice") && !r.allows("user.alice.inbox"), "`*` is a uid, not a wildcard");
        let john = rights(&["user.{sub}.*"], "john");
        assert!(!john.allows("user.john%2Edoe@example%2Ecom.inbox"));
    }

    #[test]
    fn sub_must_end_the_uid_part_of_a_prefix() {
        for refused in ["chat.{sub}*", "chat.{sub}x*", "chat.{sub}%*", "{sub}-*", "{sub}.{sub}*"] {
            let error = Rights::parse(&[refused.to_string()], "al").unwrap_err();
            assert!(error.contains("separator"), "{refused}: {error}");
        }
        for accepted in ["chat.{sub}.*", "chat.{sub}:*", "chat.{sub}/*", "chat.{sub}", "chat.{sub}x", "{sub}.{sub}.*"] {
            assert!(Rights::parse(&[accepted.to_string()], "al").is_ok(), "{accepted}");
        }
    }
}
