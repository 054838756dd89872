//! Published JSON made fit for the wire: nested no deeper than [`MAX_DEPTH`], every
//! number a 64-bit float can hold and every `\u` escape a whole character (serde_json
//! checks neither when it only skips over `data`, and strict decoders such as Go's and
//! serde_json's refuse a frame holding `1e400` or a lone `\ud800`, so their clients would
//! lose the message), and written without insignificant whitespace, so that a
//! pretty-printed payload still fits SSE's one `data:` line (a newline there would end
//! the event early).

use std::borrow::Cow;

/// Deepest nesting of arrays and objects a published `data` may have.
pub const MAX_DEPTH: usize = 64;

/// Why valid JSON is not fit to publish.
#[derive(Debug, PartialEq, Eq)]
pub enum Unfit {
    TooDeep,
    /// A number past what a 64-bit float holds (`1e400`).
    NumberOutOfRange,
    /// A `\u` escape of half a surrogate pair without its other half.
    LoneSurrogate,
}

impl std::fmt::Display for Unfit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unfit::TooDeep => write!(f, "nests deeper than {MAX_DEPTH} arrays and objects"),
            Unfit::NumberOutOfRange => f.write_str("holds a number a 64-bit float cannot (strict JSON decoders refuse it)"),
            Unfit::LoneSurrogate => f.write_str("holds a \\u escape of half a surrogate pair (strict JSON decoders refuse it)"),
        }
    }
}

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

/// `json` (already known to be valid JSON) checked and without whitespace between
/// tokens; borrowed when it has none.
pub fn compact(json: &str) -> Result<Cow<'_, str>, Unfit> {
    let bytes = json.as_bytes();
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    // Inside a string: the high half of a surrogate pair just escaped, wanting its low half.
    let mut high_pending = false;
    let mut first_space = None;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if in_string {
            if escaped {
                escaped = false;
                if b == b'u' {
                    let unit = bytes.get(i + 1..i + 5).and_then(|hex| std::str::from_utf8(hex).ok()).and_then(|hex| u16::from_str_radix(hex, 16).ok());
                    let Some(unit) = unit else { return Err(Unfit::LoneSurrogate) };
                    match unit {
                        0xD800..=0xDBFF if !high_pending => high_pending = true,
                        0xDC00..=0xDFFF if high_pending => high_pending = false,
                        0xD800..=0xDFFF => return Err(Unfit::LoneSurrogate),
                        _ if high_pending => return Err(Unfit::LoneSurrogate),
                        _ => {}
                    }
                    i += 5;
                    continue;
                }
                if high_pending {
                    return Err(Unfit::LoneSurrogate);
                }
            } else if b == b'\\' {
                escaped = true;
            } else if high_pending {
                return Err(Unfit::LoneSurrogate);
            } else if b == b'"' {
                in_string = false;
            }
            i += 1;
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(Unfit::TooDeep);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b' ' | b'\t' | b'\n' | b'\r' => {
                first_space.get_or_insert(i);
            }
            b'-' | b'0'..=b'9' => {
                let end = bytes[i..].iter().position(|c| !matches!(c, b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')).map_or(bytes.len(), |n| i + n);
                let number = &json[i..end];
                // Only an exponent or a run of digits past any double's can overflow one.
                if (number.len() > 300 || number.contains(['e', 'E'])) && !number.parse::<f64>().is_ok_and(f64::is_finite) {
                    return Err(Unfit::NumberOutOfRange);
                }
                i = end;
                continue;
            }
            _ => {}
        }
        i += 1;
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
        assert_eq!(compact(&deep), Err(Unfit::TooDeep));
        assert!(compact(r#""[[[[[[[[""#).is_ok(), "brackets in strings do not count");
    }

    #[test]
    fn numbers_past_a_double_and_lone_surrogates_are_refused() {
        for unfit in ["1e400", "[1, -1E309]", r#"{"a":1e+400}"#, &"9".repeat(400)] {
            assert_eq!(compact(unfit), Err(Unfit::NumberOutOfRange), "{unfit}");
        }
        for unfit in [r#""x\ud800""#, r#""\udc00""#, r#""\ud800\ud800""#, r#""\ud800x""#, r#""\ud800\n""#, r#"["\uDBFF"]"#] {
            assert_eq!(compact(unfit), Err(Unfit::LoneSurrogate), "{unfit}");
        }
        for fit in ["1e308", "-0.5e-400", "12345678901234567890", r#""\ud83d\ude00""#, r#""\u00e9\"\\""#, r#"{"e": "1e400", "E": "\\ud800"}"#] {
            assert!(compact(fit).is_ok(), "{fit}");
            // What is let through, a strict decoder reads.
            assert!(serde_json::from_str::<serde_json::Value>(fit).is_ok(), "{fit}");
        }
    }
}
