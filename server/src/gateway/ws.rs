//! The WebSocket opening handshake (RFC 6455 section 4.2).

use base64::Engine;
use sha1::{Digest, Sha1};

use crate::error::{Error, Kind};
use crate::http::Head;

const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

pub(super) fn check_upgrade(head: &Head) -> Result<(), Error> {
    if head.version < 1 {
        return Err(Error::bad_request("a WebSocket handshake needs HTTP/1.1 or later (RFC 6455 4.2.1)"));
    }
    if !head.header_has("upgrade", "websocket") || !head.header_has("connection", "upgrade") {
        return Err(Error::bad_request("/ws needs a WebSocket upgrade (Upgrade: websocket, Connection: Upgrade)"));
    }
    if head.header("sec-websocket-version") != Some("13") {
        return Err(Error::new(Kind::UpgradeRequired, "WebSocket version 13 is the one supported"));
    }
    match head.header("sec-websocket-key") {
        Some(key) if base64::engine::general_purpose::STANDARD.decode(key.trim()).is_ok_and(|k| k.len() == 16) => Ok(()),
        _ => Err(Error::bad_request("Sec-WebSocket-Key missing or not 16 bytes of base64")),
    }
}

pub(super) fn accept_response(head: &Head) -> String {
    let key = head.header("sec-websocket-key").unwrap_or_default().trim();
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(GUID.as_bytes());
    let accept = base64::engine::general_purpose::STANDARD.encode(sha.finalize());
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    )
}
