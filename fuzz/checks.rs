//! What each fuzz target checks. One definition, used twice: by the cargo-fuzz targets in
//! `fuzz_targets/` (nightly, `cargo fuzz run <target>`), and by `cargo test` on stable,
//! which replays every input kept in `fuzz/corpus/` (`server/tests/fuzz_corpus.rs`).
//!
//! Each check takes arbitrary bytes; it must return without panicking, and the
//! invariants it asserts must hold.

use std::sync::OnceLock;
use std::time::Duration;

use pushline::client::commands;
use pushline::config::Config;
use pushline::auth::keys::Keys;
use pushline::auth::Auth;
use pushline::http::{self, ReadHead};
use pushline::registry::relay::Relay;
use pushline::wire::{json, ws};

/// Every target, by the name of its corpus directory.
pub const TARGETS: [(&str, fn(&[u8])); 7] = [
    ("ws_codec", ws_codec),
    ("http_head", http_head),
    ("client_command", client_command),
    ("relay", relay),
    ("config_file", config_file),
    ("token", token),
    ("publish_json", publish_json),
];

/// Client frames and fragments in, events or a protocol error out; what either side
/// frames reads back as it was.
pub fn ws_codec(data: &[u8]) {
    let Some((&limit, rest)) = data.split_first() else { return };
    let max = 125 + limit as usize * 64;
    let mut buf = rest.to_vec();
    let mut decoder = ws::Decoder::new();
    let mut at = 0;
    while at < buf.len() {
        match decoder.decode(&mut buf[at..], max) {
            Ok(decoded) if decoded.used == 0 => break,
            Ok(decoded) => {
                assert!(decoded.used <= rest.len() - at, "used more bytes than it was given");
                if let Some(ws::Event::Text(text)) = &decoded.event {
                    assert!(text.len() <= max, "a message over the limit got through");
                }
                at += decoded.used;
            }
            Err(e) => {
                assert!(matches!(e.close_code(), 1002 | 1007 | 1009));
                break;
            }
        }
    }
    let server = ws::frame(ws::OP_TEXT, rest);
    assert_eq!(ws::payload_of(&server), rest);
    if let (Ok(text), true) = (std::str::from_utf8(rest), rest.len() <= max) {
        let mut client = ws::client_frame(ws::OP_TEXT, true, rest, [limit, 1, 2, 3]);
        let decoded = ws::Decoder::new().decode(&mut client, max).expect("a frame the client side built");
        assert_eq!(decoded.event, Some(ws::Event::Text(text.into())));
    }
}

/// The request head reader and what routing and the handshake read from it.
pub fn http_head(data: &[u8]) {
    if let Some(ReadHead::Complete(head, used)) = http::parse(data) {
        assert!(used <= data.len());
        let _ = (head.bearer(), head.query("uid"), head.query("topics"));
        let _ = head.header_has("connection", "upgrade");
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = http::query_pairs(text);
    }
}

pub fn client_command(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = commands::parse(text);
    }
}

/// Messages between nodes: whatever decodes encodes back to itself.
pub fn relay(data: &[u8]) {
    if let Some(relay) = Relay::decode(data) {
        assert_eq!(Relay::decode(&relay.encode()).as_ref(), Some(&relay));
    }
}

pub fn config_file(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(config) = Config::with_file(text, "fuzz", vec!["pushline".into()]) {
            let _ = config.validate();
        }
    }
}

/// Client tokens, against a server with a secret.
pub fn token(data: &[u8]) {
    static AUTH: OnceLock<Auth> = OnceLock::new();
    let auth = AUTH.get_or_init(|| {
        let keys = Keys::load(Some("fuzzing-secret-of-thirty-two-byt"), &[]).expect("a secret is a key");
        Auth::new(Some(keys), Duration::from_secs(86400), vec!["public.*".into()], vec!["chat.{sub}.*".into()])
    });
    if let Ok(token) = std::str::from_utf8(data) {
        if let Ok(identity) = auth.authenticate(Some(token), None, None) {
            assert!(!identity.uid.is_empty());
            let _ = auth.may_read(&identity.uid, identity.grant.as_ref(), "public.news");
            let _ = auth.may_publish(&identity.uid, identity.grant.as_ref(), "chat.x.y");
        }
    }
}

/// Published JSON: compacting keeps its meaning and leaves no line break.
pub fn publish_json(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(value) = serde_json::from_str::<serde_json::Value>(text) else { return };
    if let Ok(compact) = json::compact(text) {
        assert!(!compact.contains('\n') && !compact.contains('\r'));
        assert_eq!(serde_json::from_str::<serde_json::Value>(&compact).expect("still JSON"), value);
    }
}
