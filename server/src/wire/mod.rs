//! Bytes on the wire: the WebSocket codec ([`ws`]), Server-Sent Events ([`sse`]), and a
//! published [`Message`] framed for both.
//!
//! A message is framed once, for both transports, when it is published; every connection
//! that receives it writes the same `Bytes`. Nothing here does I/O.

pub mod json;
pub mod sse;
pub mod ws;

use std::time::Instant;

use bytes::Bytes;
use strum::{EnumCount, IntoStaticStr, VariantArray};

/// The transports a client can hold a connection with. Label `transport` of the
/// connection metrics; its number is an argument of the `conn_open` probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, EnumCount, IntoStaticStr, VariantArray)]
pub enum Transport {
    #[strum(serialize = "ws")]
    WebSocket,
    #[strum(serialize = "sse")]
    Sse,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// A published message, framed for every transport.
pub struct Message {
    pub id: u64,
    ws: Bytes,
    sse: Bytes,
    /// When the publish API accepted it; delivery latency is measured from here.
    pub accepted_at: Instant,
}

impl Message {
    /// `data` is JSON, already checked and compacted ([`json::compact`]).
    pub fn new(id: u64, topic: Option<&str>, data: &str, accepted_at: Instant) -> Message {
        let topic = match topic {
            Some(t) => serde_json::to_string(t).unwrap_or_else(|_| "null".into()),
            None => "null".into(),
        };
        let envelope = format!(r#"{{"type":"message","id":"{id}","topic":{topic},"data":{data}}}"#);
        Message::from_envelope(id, &envelope, accepted_at)
    }

    /// A message another node framed: `envelope` is the JSON it sent its own clients.
    pub fn from_envelope(id: u64, envelope: &str, accepted_at: Instant) -> Message {
        let ws = ws::text(envelope);
        let sse = sse::event("message", Some(id), envelope);
        Message { id, ws, sse, accepted_at }
    }

    /// The JSON envelope, read back out of the WebSocket frame.
    pub fn envelope(&self) -> &[u8] {
        ws::payload_of(&self.ws)
    }

    pub fn bytes(&self, transport: Transport) -> &Bytes {
        match transport {
            Transport::WebSocket => &self.ws,
            Transport::Sse => &self.sse,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relayed_envelope_frames_the_same_bytes() {
        for len in [10, 200, 70_000] {
            let data = format!("\"{}\"", "x".repeat(len));
            let original = Message::new(42, Some("t"), &data, Instant::now());
            let envelope = std::str::from_utf8(original.envelope()).unwrap();
            let relayed = Message::from_envelope(42, envelope, Instant::now());
            assert_eq!(relayed.bytes(Transport::WebSocket), original.bytes(Transport::WebSocket));
            assert_eq!(relayed.bytes(Transport::Sse), original.bytes(Transport::Sse));
        }
    }

    #[test]
    fn message_envelope_is_framed_for_both_transports() {
        let m = Message::new(42, Some("news\"x"), r#"{"a":[1,2]}"#, Instant::now());
        let ws = m.bytes(Transport::WebSocket);
        assert_eq!(ws[0], 0x81);
        let json: serde_json::Value = serde_json::from_slice(&ws[2..]).unwrap();
        assert_eq!(json["id"], "42");
        assert_eq!(json["topic"], "news\"x");
        assert_eq!(json["data"]["a"][1], 2);
        let sse = std::str::from_utf8(m.bytes(Transport::Sse)).unwrap();
        assert!(sse.starts_with("event: message\nid: 42\ndata: {"), "{sse}");
        assert!(sse.ends_with("}\n\n"));
    }
}
