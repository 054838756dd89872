//! Bytes on the wire: RFC 6455 frames (server side) and Server-Sent Events.
//!
//! A message is framed once, for both transports, when it is published; every connection
//! that receives it writes the same `Bytes`.

use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};
use serde_json::value::RawValue;

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

pub const CLOSE_NORMAL: u16 = 1000;
pub const CLOSE_GOING_AWAY: u16 = 1001;
pub const CLOSE_PROTOCOL_ERROR: u16 = 1002;
pub const CLOSE_UNSUPPORTED: u16 = 1003;
pub const CLOSE_INVALID_DATA: u16 = 1007;
pub const CLOSE_TOO_BIG: u16 = 1009;
pub const CLOSE_TRY_AGAIN_LATER: u16 = 1013;

/// The transports a client can hold a connection with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    WebSocket,
    Sse,
}

impl Transport {
    pub const ALL: [Transport; 2] = [Transport::WebSocket, Transport::Sse];

    pub fn as_str(self) -> &'static str {
        match self {
            Transport::WebSocket => "ws",
            Transport::Sse => "sse",
        }
    }

    pub fn index(self) -> usize {
        self as usize
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
    pub fn new(id: u64, topic: Option<&str>, data: &RawValue, accepted_at: Instant) -> Message {
        let topic = match topic {
            Some(t) => serde_json::to_string(t).unwrap_or_else(|_| "null".into()),
            None => "null".into(),
        };
        let envelope = format!(r#"{{"type":"message","id":"{id}","topic":{topic},"data":{}}}"#, data.get());
        Message::from_envelope(id, &envelope, accepted_at)
    }

    /// A message another node framed: `envelope` is the JSON it sent its own clients.
    pub fn from_envelope(id: u64, envelope: &str, accepted_at: Instant) -> Message {
        let ws = ws_frame(OP_TEXT, envelope.as_bytes());
        let sse = Bytes::from(format!("event: message\nid: {id}\ndata: {envelope}\n\n"));
        Message { id, ws, sse, accepted_at }
    }

    /// The JSON envelope, read back out of the WebSocket frame.
    pub fn envelope(&self) -> &[u8] {
        let header = match self.ws.get(1) {
            Some(126) => 4,
            Some(127) => 10,
            _ => 2,
        };
        &self.ws[header.min(self.ws.len())..]
    }

    pub fn bytes(&self, transport: Transport) -> &Bytes {
        match transport {
            Transport::WebSocket => &self.ws,
            Transport::Sse => &self.sse,
        }
    }
}

/// A complete, unmasked server frame (FIN set).
pub fn ws_frame(opcode: u8, payload: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(payload.len() + 10);
    buf.put_u8(0x80 | opcode);
    match payload.len() {
        n if n < 126 => buf.put_u8(n as u8),
        n if n <= u16::MAX as usize => {
            buf.put_u8(126);
            buf.put_u16(n as u16);
        }
        n => {
            buf.put_u8(127);
            buf.put_u64(n as u64);
        }
    }
    buf.put_slice(payload);
    buf.freeze()
}

pub fn ws_close(code: u16, reason: &str) -> Bytes {
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.to_be_bytes());
    // Control frame payloads are at most 125 bytes.
    payload.extend_from_slice(&reason.as_bytes()[..reason.len().min(123)]);
    ws_frame(OP_CLOSE, &payload)
}

pub fn ws_text(json: &str) -> Bytes {
    ws_frame(OP_TEXT, json.as_bytes())
}

pub fn sse_event(event: &str, json: &str) -> Bytes {
    Bytes::from(format!("event: {event}\ndata: {json}\n\n"))
}

pub const SSE_KEEPALIVE: &[u8] = b": keepalive\n\n";

/// Why a client's frame was refused; each maps to the close code sent back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolError {
    Unmasked,
    ReservedBits,
    UnknownOpcode(u8),
    BadControlFrame,
    TooBig,
    UnexpectedContinuation,
    InvalidUtf8,
}

impl ProtocolError {
    pub fn close_code(self) -> u16 {
        match self {
            ProtocolError::TooBig => CLOSE_TOO_BIG,
            ProtocolError::InvalidUtf8 => CLOSE_INVALID_DATA,
            _ => CLOSE_PROTOCOL_ERROR,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ProtocolError::Unmasked => "client frames must be masked",
            ProtocolError::ReservedBits => "reserved bits set",
            ProtocolError::UnknownOpcode(_) => "unknown opcode",
            ProtocolError::BadControlFrame => "control frame fragmented or over 125 bytes",
            ProtocolError::TooBig => "frame over the size limit",
            ProtocolError::UnexpectedContinuation => "continuation without a message to continue",
            ProtocolError::InvalidUtf8 => "text is not UTF-8",
        }
    }
}

/// One client frame found at the start of a buffer.
#[derive(Debug)]
pub struct FrameHead {
    pub fin: bool,
    pub opcode: u8,
    /// Where the (now unmasked) payload sits in the buffer.
    pub payload: std::ops::Range<usize>,
    /// Bytes of the buffer this frame used, header included.
    pub len: usize,
}

/// Decodes the first client frame in `buf`, unmasking its payload in place.
/// `Ok(None)` means the frame is not complete yet.
pub fn decode_client_frame(buf: &mut [u8], max_payload: usize) -> Result<Option<FrameHead>, ProtocolError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x70 != 0 {
        return Err(ProtocolError::ReservedBits);
    }
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0F;
    match opcode {
        OP_CONTINUATION | OP_TEXT | OP_BINARY => {}
        OP_CLOSE | OP_PING | OP_PONG => {
            if !fin || (b1 & 0x7F) > 125 {
                return Err(ProtocolError::BadControlFrame);
            }
        }
        other => return Err(ProtocolError::UnknownOpcode(other)),
    }
    if b1 & 0x80 == 0 {
        return Err(ProtocolError::Unmasked);
    }
    let (len, mut at) = match b1 & 0x7F {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as u64, 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut n = [0u8; 8];
            n.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(n), 10)
        }
        n => (n as u64, 2),
    };
    if len > max_payload as u64 {
        return Err(ProtocolError::TooBig);
    }
    let len = len as usize;
    if buf.len() < at + 4 + len {
        return Ok(None);
    }
    let mut mask = [0u8; 4];
    mask.copy_from_slice(&buf[at..at + 4]);
    at += 4;
    for (i, byte) in buf[at..at + len].iter_mut().enumerate() {
        *byte ^= mask[i & 3];
    }
    Ok(Some(FrameHead { fin, opcode, payload: at..at + len, len: at + len }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relayed_envelope_frames_the_same_bytes() {
        for len in [10, 200, 70_000] {
            let data = format!("\"{}\"", "x".repeat(len));
            let raw = serde_json::from_str::<&RawValue>(&data).unwrap();
            let original = Message::new(42, Some("t"), raw, Instant::now());
            let envelope = std::str::from_utf8(original.envelope()).unwrap();
            let relayed = Message::from_envelope(42, envelope, Instant::now());
            assert_eq!(relayed.bytes(Transport::WebSocket), original.bytes(Transport::WebSocket));
            assert_eq!(relayed.bytes(Transport::Sse), original.bytes(Transport::Sse));
        }
    }

    fn masked(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mask = [0x11, 0x22, 0x33, 0x44];
        let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xFFFF => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
        out
    }

    #[test]
    fn decodes_and_unmasks() {
        for size in [0, 5, 125, 126, 300, 70_000] {
            let payload: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            let mut buf = masked(OP_TEXT, true, &payload);
            let total = buf.len();
            for cut in [1, total / 2, total - 1] {
                if cut < total && cut > 0 {
                    assert!(decode_client_frame(&mut buf[..cut].to_vec(), 1 << 20).unwrap().is_none());
                }
            }
            let head = decode_client_frame(&mut buf, 1 << 20).unwrap().unwrap();
            assert!(head.fin);
            assert_eq!(head.opcode, OP_TEXT);
            assert_eq!(head.len, total);
            assert_eq!(&buf[head.payload], &payload[..]);
        }
    }

    #[test]
    fn refuses_bad_frames() {
        let mut unmasked = vec![0x81, 0x02, b'h', b'i'];
        assert_eq!(decode_client_frame(&mut unmasked, 100).unwrap_err(), ProtocolError::Unmasked);
        let mut big = masked(OP_TEXT, true, &[0; 200]);
        assert_eq!(decode_client_frame(&mut big, 100).unwrap_err(), ProtocolError::TooBig);
        let mut fragmented_ping = masked(OP_PING, false, b"x");
        assert_eq!(decode_client_frame(&mut fragmented_ping, 100).unwrap_err(), ProtocolError::BadControlFrame);
        let mut rsv = masked(OP_TEXT, true, b"x");
        rsv[0] |= 0x40;
        assert_eq!(decode_client_frame(&mut rsv, 100).unwrap_err(), ProtocolError::ReservedBits);
        let mut op = masked(0x3, true, b"x");
        assert_eq!(decode_client_frame(&mut op, 100).unwrap_err(), ProtocolError::UnknownOpcode(3));
    }

    #[test]
    fn static_pong_is_a_text_frame() {
        assert_eq!(crate::conn::PONG, &ws_text(r#"{"type":"pong"}"#)[..]);
    }

    #[test]
    fn server_frames_have_right_lengths() {
        assert_eq!(&ws_frame(OP_TEXT, b"hi")[..], &[0x81, 2, b'h', b'i']);
        let f = ws_frame(OP_TEXT, &[0; 300]);
        assert_eq!(&f[..4], &[0x81, 126, 1, 44]);
        let f = ws_frame(OP_BINARY, &[0; 70_000]);
        assert_eq!(f[1], 127);
        assert_eq!(f.len(), 70_010);
    }

    #[test]
    fn message_envelope_is_framed_for_both_transports() {
        let data = RawValue::from_string(r#"{"a":[1,2]}"#.into()).unwrap();
        let m = Message::new(42, Some("news\"x"), &data, Instant::now());
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
