//! Topic rights: sets of topics given as exact names or prefixes ending in `*`, where
//! `{sub}` stands for the holder's uid. What a token (or the public list) lets its holder
//! read, what an API key may publish to, which topics keep no history.

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

impl Rights {
    /// Rights from `patterns` for the holder `sub`. A pattern with `*` anywhere but at its
    /// end is refused (say which), so a typo cannot grant more than meant.
    pub fn parse(patterns: &[String], sub: &str) -> Result<Rights, String> {
        if patterns.len() > MAX_PATTERNS {
            return Err(format!("{} topic patterns; at most {MAX_PATTERNS}", patterns.len()));
        }
        let rights = patterns
            .iter()
            .map(|pattern| {
                if pattern.is_empty() || pattern.len() > MAX_PATTERN_BYTES {
                    return Err(format!("topic patterns are 1 to {MAX_PATTERN_BYTES} bytes"));
                }
                let expanded = pattern.replace("{sub}", sub);
                match expanded.strip_suffix('*') {
                    Some(prefix) if !prefix.contains('*') => Ok(Pattern::Prefix(prefix.into())),
                    None if !expanded.contains('*') => Ok(Pattern::Exact(expanded.into())),
                    _ => Err(format!("topic pattern `{pattern}`: `*` may only end a pattern")),
                }
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
}
