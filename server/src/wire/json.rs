//! Published JSON made fit for the wire: nested no deeper than [`MAX_DEPTH`], and
//! written without insignificant whitespace, so that a pretty-printed payload still
//! fits SSE's one `data:` line (a newline there would end the event early).

use std::borrow::Cow;

/// Deepest nesting of arrays and objects a published `data` may have.
pub const MAX_DEPTH: usize = 64;

#[derive(Debug, PartialEq, Eq)]
pub struct TooDeep;

/// A message id in an answer, as a string, as envelopes write it: it takes all 64 bits,
/// more than a JavaScript number holds exactly.
pub fn id_as_text<S: serde::Serializer>(id: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(id)
}

/// As [`id_as_text`], for an id an answer may not have.
pub fn id_as_text_some<S: serde::Serializer>(id: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
    match id {
        Some(id) => id_as_text(id, s),
        None => s.serialize_none(),
    }
}

/// `json` (already known to be valid JSON) without whitespace between tokens; borrowed
/// when it has none.
pub fn compact(json: &str) -> Result<Cow<'_, str>, TooDeep> {
    let bytes = json.as_bytes();
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    let mut first_space = None;
    for (i, &b) in bytes.iter().enumerate() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(TooDeep);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b' ' | b'\t' | b'\n' | b'\r' => {
                first_space.get_or_insert(i);
            }
            _ => {}
        }
    }
    let Some(first) = first_space else { return Ok(Cow::Borrowed(json)) };
    let mut out = String::with_capacity(json.len());
    out.push_str(&json[..first]);
    let (mut in_string, mut escaped) = (false, false);
    for c in json[first..].chars() {
        if in_string {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
        } else if matches!(c, ' ' | '\t' | '\n' | '\r') {
            continue;
        } else if c == '"' {
            in_string = true;
        }
        out.push(c);
    }
    Ok(Cow::Owned(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whitespace_goes_but_strings_keep_theirs() {
        let pretty = "{\n  \"a\" : [1, 2],\r\n\t\"b\": \"x y\\\" \\n z\"\n}";
        assert_eq!(compact(pretty).unwrap(), r#"{"a":[1,2],"b":"x y\" \n z"}"#);
        assert!(matches!(compact(r#"{"a":1}"#).unwrap(), Cow::Borrowed(_)));
        let round: serde_json::Value = serde_json::from_str(&compact(pretty).unwrap()).unwrap();
        assert_eq!(round, serde_json::from_str::<serde_json::Value>(pretty).unwrap());
    }

    #[test]
    fn depth_is_capped() {
        let ok = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert!(compact(&ok).is_ok());
        let deep = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        assert_eq!(compact(&deep), Err(TooDeep));
        assert!(compact(r#""[[[[[[[[""#).is_ok(), "brackets in strings do not count");
    }
}
