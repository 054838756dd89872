//! Positions in streams as the wire writes them: a message's stream key, epoch and offset
//! in its envelope, and a cursor, where a client is in every stream of its connection, as
//! one line of text that fits a query string and an SSE `id:`.
//!
//! `s<since>,<stream>:<epoch>:<offset>,...`: `since` is the wall-clock millisecond the
//! client's positions start from (streams it holds no position in are resumed from
//! then); each entry is a stream key (`u.<8 hex>`, `t.<16 hex>`, `b`), its epoch (8 hex)
//! and the last offset the client has. Clients build it from the `since` of their
//! welcome or `resumed` message and the `stream`, `epoch` and `offset` of each message.

use std::fmt::{self, Write};

/// A stream as cursors and envelopes name it: short, and the same on every node. A uid
/// stream's key hashes the uid, so a cursor carried to another uid's connection is
/// recognised as foreign.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StreamKey {
    Uid(u32),
    Topic(u64),
    Broadcast,
}

/// Where a message sits in its stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    pub key: StreamKey,
    pub epoch: u32,
    /// 1 for the first message of an epoch.
    pub offset: u64,
}

/// `value`'s last `N` hex digits, lower case, zero-padded: what `{:0Nx}` writes, without
/// the formatting machinery (a push on Redis writes several).
pub fn hex_digits<const N: usize>(value: u64) -> [u8; N] {
    let mut digits = [b'0'; N];
    for (i, digit) in digits.iter_mut().rev().enumerate() {
        *digit = b"0123456789abcdef"[((value >> (4 * i)) & 0xf) as usize];
    }
    digits
}

impl StreamKey {
    /// Appends the key as cursors write it to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        match *self {
            StreamKey::Uid(hash) => {
                out.extend_from_slice(b"u.");
                out.extend_from_slice(&hex_digits::<8>(hash.into()));
            }
            StreamKey::Topic(hash) => {
                out.extend_from_slice(b"t.");
                out.extend_from_slice(&hex_digits::<16>(hash));
            }
            StreamKey::Broadcast => out.push(b'b'),
        }
    }
}

impl fmt::Display for StreamKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Hex digits are ASCII.
        match *self {
            StreamKey::Uid(hash) => write!(f, "u.{}", std::str::from_utf8(&hex_digits::<8>(hash.into())).map_err(|_| fmt::Error)?),
            StreamKey::Topic(hash) => write!(f, "t.{}", std::str::from_utf8(&hex_digits::<16>(hash)).map_err(|_| fmt::Error)?),
            StreamKey::Broadcast => f.write_str("b"),
        }
    }
}

impl StreamKey {
    pub fn parse(text: &str) -> Option<StreamKey> {
        match text.split_once('.') {
            None if text == "b" => Some(StreamKey::Broadcast),
            Some(("u", hex)) if hex.len() == 8 && is_hex(hex) => u32::from_str_radix(hex, 16).ok().map(StreamKey::Uid),
            Some(("t", hex)) if hex.len() == 16 && is_hex(hex) => u64::from_str_radix(hex, 16).ok().map(StreamKey::Topic),
            _ => None,
        }
    }
}

/// An epoch as envelopes and cursors write it, written in place.
pub struct EpochText(pub u32);

impl EpochText {
    pub fn digits(&self) -> [u8; 8] {
        hex_digits(self.0.into())
    }
}

impl fmt::Display for EpochText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(std::str::from_utf8(&self.digits()).map_err(|_| fmt::Error)?)
    }
}

/// An epoch as envelopes and cursors write it.
pub fn epoch_text(epoch: u32) -> String {
    EpochText(epoch).to_string()
}

pub fn parse_epoch(text: &str) -> Option<u32> {
    (text.len() == 8 && is_hex(text)).then(|| u32::from_str_radix(text, 16).ok()).flatten()
}

/// Only hex digits: `from_str_radix` also takes a leading `+`, which no cursor is written with.
fn is_hex(text: &str) -> bool {
    text.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A decimal number written with digits only (no sign, as the server writes them).
fn number(text: &str) -> Option<u64> {
    (!text.is_empty() && text.bytes().all(|b| b.is_ascii_digit())).then(|| text.parse().ok()).flatten()
}

/// Longest cursor accepted, in bytes.
pub const MAX_CURSOR_BYTES: usize = 6 * 1024;
/// Most positions in one cursor.
pub const MAX_POSITIONS: usize = 256;

/// The longest cursor the server can write for a connection on `topics` topics (its
/// uid's stream and the broadcast stream too), every offset at its largest.
pub fn longest(topics: usize) -> usize {
    let since = 1 + u64::MAX.to_string().len();
    let position = 1 + "t.".len() + 16 + 1 + 8 + 1 + u64::MAX.to_string().len();
    since + (topics + 2) * position
}

/// The most topics a connection may hold for its cursor to fit in [`MAX_CURSOR_BYTES`].
pub fn most_topics() -> usize {
    (0..).take_while(|n| longest(*n) <= MAX_CURSOR_BYTES).last().unwrap_or(0)
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cursor {
    /// Wall-clock ms; None: the client asks for nothing before its positions.
    pub since_ms: Option<u64>,
    pub positions: Vec<Position>,
}

impl Cursor {
    pub fn parse(text: &str) -> Result<Cursor, String> {
        if text.len() > MAX_CURSOR_BYTES {
            return Err(format!("cursor is {} bytes; at most {MAX_CURSOR_BYTES}", text.len()));
        }
        let mut cursor = Cursor::default();
        for (i, part) in text.split(',').enumerate() {
            if let Some(since) = part.strip_prefix('s').filter(|_| i == 0) {
                cursor.since_ms = Some(number(since).ok_or_else(|| format!("cursor `since` is not a number: `{since}`"))?);
                continue;
            }
            let bad = || format!("cursor position `{part}` is not `<stream>:<epoch>:<offset>`");
            let mut fields = part.split(':');
            let (Some(key), Some(epoch), Some(offset), None) = (fields.next(), fields.next(), fields.next(), fields.next()) else {
                return Err(bad());
            };
            let key = StreamKey::parse(key).ok_or_else(|| format!("cursor names no stream this server knows: `{key}`"))?;
            let epoch = parse_epoch(epoch).ok_or_else(bad)?;
            let offset = number(offset).ok_or_else(bad)?;
            if cursor.positions.iter().any(|p| p.key == key) {
                return Err(format!("cursor names stream `{key}` twice"));
            }
            if cursor.positions.len() == MAX_POSITIONS {
                return Err(format!("cursor holds more than {MAX_POSITIONS} positions"));
            }
            cursor.positions.push(Position { key, epoch, offset });
        }
        Ok(cursor)
    }

    pub fn position(&self, key: StreamKey) -> Option<&Position> {
        self.positions.iter().find(|p| p.key == key)
    }

    /// Appends the cursor's text to `out`.
    pub fn write(since_ms: u64, positions: &[Position], out: &mut String) {
        let _ = write!(out, "s{since_ms}");
        for p in positions {
            let _ = write!(out, ",{}:{}:{}", p.key, epoch_text(p.epoch), p.offset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_epochs_round_trip_as_text() {
        for key in [StreamKey::Uid(7), StreamKey::Topic(u64::MAX), StreamKey::Broadcast] {
            assert_eq!(StreamKey::parse(&key.to_string()), Some(key));
        }
        assert_eq!(StreamKey::parse("u.123"), None);
        assert_eq!(StreamKey::parse("x.12345678"), None);
        assert_eq!(parse_epoch(&epoch_text(0xdead_beef)), Some(0xdead_beef));
    }

    #[test]
    fn hex_digits_are_what_formatting_writes() {
        for value in [0, 1, 0xabc, 0xdead_beef, u64::MAX] {
            assert_eq!(hex_digits::<16>(value), *format!("{value:016x}").as_bytes());
            assert_eq!(hex_digits::<8>(value & 0xffff_ffff), *format!("{:08x}", value & 0xffff_ffff).as_bytes());
        }
        assert_eq!(StreamKey::Uid(0xab).to_string(), "u.000000ab");
        assert_eq!(StreamKey::Topic(0xab).to_string(), "t.00000000000000ab");
        assert_eq!(epoch_text(0xab), "000000ab");
    }

    #[test]
    fn round_trips() {
        let positions = vec![
            Position { key: StreamKey::Uid(0xabcd), epoch: 7, offset: 41 },
            Position { key: StreamKey::Topic(u64::MAX), epoch: u32::MAX, offset: 1 },
            Position { key: StreamKey::Broadcast, epoch: 0, offset: 9 },
        ];
        let mut text = String::new();
        Cursor::write(1_764_000_000_000, &positions, &mut text);
        assert_eq!(text, "s1764000000000,u.0000abcd:00000007:41,t.ffffffffffffffff:ffffffff:1,b:00000000:9");
        assert_eq!(Cursor::parse(&text), Ok(Cursor { since_ms: Some(1_764_000_000_000), positions }));
    }

    #[test]
    fn bad_input_says_what_is_wrong() {
        for (text, says) in [
            ("s12x", "not a number"),
            ("b:00000000", "is not `<stream>"),
            ("q.1:00000000:1", "no stream"),
            ("b:zz:1", "is not `<stream>"),
            ("b:00000000:-1", "is not `<stream>"),
            ("b:00000000:1,b:00000000:2", "twice"),
            ("s1,s2", "is not `<stream>"),
            ("b:00000000:+1", "is not `<stream>"),
            ("s+1", "not a number"),
            ("b:+0000000:1", "is not `<stream>"),
            ("u.+0000001:00000000:1", "no stream"),
            ("t.+000000000000001:00000000:1", "no stream"),
            ("b:00000000:", "is not `<stream>"),
        ] {
            let error = Cursor::parse(text).unwrap_err();
            assert!(error.contains(says), "{text}: {error}");
        }
        assert!(Cursor::parse(&"b:00000000:1,".repeat(1000)).unwrap_err().contains("bytes"));
    }
}
