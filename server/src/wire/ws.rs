//! The WebSocket codec (RFC 6455), server side, without I/O: client bytes in, events
//! out; server frames out as bytes to write. No tokio, no socket, and no allocation
//! between messages: a fragmented text message is the only thing the decoder holds,
//! and only until its last fragment.
//!
//! Every way a client can break the protocol is a [`ProtocolError`], which names the
//! close code to answer with.

use std::borrow::Cow;

use bytes::{Buf, BufMut, Bytes, BytesMut};

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

pub const CLOSE_NORMAL: u16 = 1000;
pub const CLOSE_GOING_AWAY: u16 = 1001;
pub const CLOSE_PROTOCOL_ERROR: u16 = 1002;
pub const CLOSE_INVALID_DATA: u16 = 1007;
pub const CLOSE_TOO_BIG: u16 = 1009;
pub const CLOSE_POLICY_VIOLATION: u16 = 1008;
pub const CLOSE_TRY_AGAIN_LATER: u16 = 1013;
/// Pushline's own code (4000-4999 are the application's): the client's token expired and
/// no fresh one came in time.
pub const CLOSE_TOKEN_EXPIRED: u16 = 4001;

/// Largest control frame payload (RFC 6455 5.5).
const MAX_CONTROL_PAYLOAD: usize = 125;

/// Why a client's bytes were refused; each maps to the close code sent back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolError {
    Unmasked,
    ReservedBits,
    UnknownOpcode(u8),
    /// A control frame fragmented or over 125 bytes.
    BadControlFrame,
    /// A 64-bit payload length with its most significant bit set (RFC 6455 5.2).
    BadLength,
    TooBig,
    UnexpectedContinuation,
    /// A new message began before the fragmented one was finished.
    ExpectedContinuation,
    InvalidUtf8,
    /// A close payload of one byte, or with a code no endpoint may send (RFC 6455 7.4).
    BadClose,
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
            ProtocolError::BadLength => "payload length has its most significant bit set",
            ProtocolError::TooBig => "message over the size limit",
            ProtocolError::UnexpectedContinuation => "continuation without a message to continue",
            ProtocolError::ExpectedContinuation => "new message before the fragmented one ended",
            ProtocolError::InvalidUtf8 => "text is not UTF-8",
            ProtocolError::BadClose => "close frame with a malformed or reserved code",
        }
    }
}

/// What a client's frame means to the server.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A whole text message, valid UTF-8 (reassembled if it came in fragments).
    Text(Cow<'a, str>),
    /// The first frame of a binary message; the rest of the message is discarded.
    Binary,
    Ping(&'a [u8]),
    Pong,
    /// The client closes; `code` is the one to echo (none if the client sent none).
    Close { code: Option<u16> },
}

/// One decoding step: the bytes of `buf` it used (0: the frame is not complete yet)
/// and what the frame meant, if anything (a fragment before the last means nothing yet).
#[derive(Debug)]
pub struct Decoded<'a> {
    pub used: usize,
    pub event: Option<Event<'a>>,
}

/// The message being received in fragments, if any. One word of state beside the
/// buffer: the buffer's spare niche holds the other cases.
#[derive(Debug, PartialEq, Eq)]
enum Fragmented {
    None,
    /// Text so far; every complete character in it already checked as UTF-8.
    Text(Vec<u8>),
    /// A binary message, being discarded.
    Binary,
}

/// Client frames to events. Holds only an unfinished fragmented message.
pub struct Decoder {
    fragmented: Fragmented,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new()
    }
}

/// A frame's header, read from the front of a buffer.
struct Head {
    fin: bool,
    opcode: u8,
    mask: [u8; 4],
    /// Where the payload starts.
    at: usize,
    len: usize,
}

/// Reads a client frame's header; `Ok(None)` when `buf` does not hold it all yet.
fn head(buf: &[u8], max_payload: usize) -> Result<Option<Head>, ProtocolError> {
    let [b0, b1, ..] = *buf else { return Ok(None) };
    if b0 & 0x70 != 0 {
        return Err(ProtocolError::ReservedBits);
    }
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0F;
    let control = match opcode {
        OP_CONTINUATION | OP_TEXT | OP_BINARY => false,
        OP_CLOSE | OP_PING | OP_PONG => true,
        other => return Err(ProtocolError::UnknownOpcode(other)),
    };
    if control && (!fin || (b1 & 0x7F) as usize > MAX_CONTROL_PAYLOAD) {
        return Err(ProtocolError::BadControlFrame);
    }
    if b1 & 0x80 == 0 {
        return Err(ProtocolError::Unmasked);
    }
    let (len, at) = match b1 & 0x7F {
        126 => match buf.get(2..4) {
            Some(n) => (u16::from_be_bytes([n[0], n[1]]) as u64, 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(n) => {
                let mut len = [0u8; 8];
                len.copy_from_slice(n);
                (u64::from_be_bytes(len), 10)
            }
            None => return Ok(None),
        },
        n => (n as u64, 2),
    };
    if len >> 63 != 0 {
        return Err(ProtocolError::BadLength);
    }
    if len > max_payload as u64 {
        return Err(ProtocolError::TooBig);
    }
    let Some(mask) = buf.get(at..at + 4) else { return Ok(None) };
    Ok(Some(Head { fin, opcode, mask: [mask[0], mask[1], mask[2], mask[3]], at: at + 4, len: len as usize }))
}

/// Close codes a client may send (RFC 6455 7.4.1, 7.4.2; IANA's registry): the defined
/// ones that are not reserved for local use, and the 3000-4999 range for libraries and
/// applications.
fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

impl Decoder {
    pub const fn new() -> Decoder {
        Decoder { fragmented: Fragmented::None }
    }

    /// Between messages: it holds nothing.
    pub fn is_idle(&self) -> bool {
        matches!(self.fragmented, Fragmented::None)
    }

    /// Decodes the frame at the front of `buf`, unmasking its payload in place. A data
    /// message (all its fragments) may be at most `max_message` bytes.
    pub fn decode<'a>(&mut self, buf: &'a mut [u8], max_message: usize) -> Result<Decoded<'a>, ProtocolError> {
        let max_payload = max_message.max(MAX_CONTROL_PAYLOAD);
        let Some(head) = head(buf, max_payload)? else { return Ok(Decoded { used: 0, event: None }) };
        let end = head.at + head.len;
        if buf.len() < end {
            return Ok(Decoded { used: 0, event: None });
        }
        let payload = &mut buf[head.at..end];
        for (i, byte) in payload.iter_mut().enumerate() {
            *byte ^= head.mask[i & 3];
        }
        let payload: &'a [u8] = payload;
        let event = self.on_frame(head.fin, head.opcode, payload, max_message)?;
        Ok(Decoded { used: end, event })
    }

    fn on_frame<'a>(&mut self, fin: bool, opcode: u8, payload: &'a [u8], max_message: usize) -> Result<Option<Event<'a>>, ProtocolError> {
        match opcode {
            OP_PING => Ok(Some(Event::Ping(payload))),
            OP_PONG => Ok(Some(Event::Pong)),
            OP_CLOSE => match payload {
                [] => Ok(Some(Event::Close { code: None })),
                [_] => Err(ProtocolError::BadClose),
                [a, b, reason @ ..] => {
                    let code = u16::from_be_bytes([*a, *b]);
                    if !valid_close_code(code) {
                        return Err(ProtocolError::BadClose);
                    }
                    if std::str::from_utf8(reason).is_err() {
                        return Err(ProtocolError::InvalidUtf8);
                    }
                    Ok(Some(Event::Close { code: Some(code) }))
                }
            },
            OP_TEXT | OP_BINARY if self.fragmented != Fragmented::None => Err(ProtocolError::ExpectedContinuation),
            OP_TEXT if fin => match std::str::from_utf8(payload) {
                Ok(text) => Ok(Some(Event::Text(Cow::Borrowed(text)))),
                Err(_) => Err(ProtocolError::InvalidUtf8),
            },
            OP_TEXT => {
                let mut text = Vec::new();
                append(&mut text, payload, max_message)?;
                self.fragmented = Fragmented::Text(text);
                Ok(None)
            }
            OP_BINARY => {
                if !fin {
                    self.fragmented = Fragmented::Binary;
                }
                Ok(Some(Event::Binary))
            }
            // OP_CONTINUATION: `head` let no other opcode through.
            _ => match &mut self.fragmented {
                Fragmented::None => Err(ProtocolError::UnexpectedContinuation),
                Fragmented::Binary => {
                    if fin {
                        self.fragmented = Fragmented::None;
                    }
                    Ok(None)
                }
                Fragmented::Text(text) => {
                    append(text, payload, max_message)?;
                    if !fin {
                        return Ok(None);
                    }
                    let Fragmented::Text(text) = std::mem::replace(&mut self.fragmented, Fragmented::None) else {
                        unreachable!("matched as text above")
                    };
                    // Whole now: a sequence cut short by the last fragment fails here.
                    let text = String::from_utf8(text).map_err(|_| ProtocolError::InvalidUtf8)?;
                    Ok(Some(Event::Text(Cow::Owned(text))))
                }
            },
        }
    }
}

/// Adds a text fragment to `text` and checks the UTF-8 it brings: from the start of the
/// last character already held (which may have been cut by the previous fragment's
/// end), so a byte that can start no character fails at once, and a sequence cut by
/// this fragment's end waits for the next one.
fn append(text: &mut Vec<u8>, payload: &[u8], max_message: usize) -> Result<(), ProtocolError> {
    if text.len() + payload.len() > max_message {
        return Err(ProtocolError::TooBig);
    }
    let mut from = text.len();
    let floor = from.saturating_sub(3);
    while from > floor && text[from - 1] & 0xC0 == 0x80 {
        from -= 1;
    }
    if from > 0 && text[from - 1] >= 0xC0 {
        from -= 1;
    }
    text.extend_from_slice(payload);
    match std::str::from_utf8(&text[from..]) {
        Ok(_) => Ok(()),
        Err(e) if e.error_len().is_none() => Ok(()),
        Err(_) => Err(ProtocolError::InvalidUtf8),
    }
}

/// Longest header of a server frame (no mask): 2 bytes and a 64-bit length.
pub const MAX_HEADER: usize = 10;

/// The header of an unmasked server frame (FIN set) of `len` payload bytes, and its length.
fn header(opcode: u8, len: usize) -> ([u8; MAX_HEADER], usize) {
    let mut header = [0u8; MAX_HEADER];
    header[0] = 0x80 | opcode;
    let used = match len {
        n if n < 126 => {
            header[1] = n as u8;
            2
        }
        n if n <= u16::MAX as usize => {
            header[1] = 126;
            header[2..4].copy_from_slice(&(n as u16).to_be_bytes());
            4
        }
        n => {
            header[1] = 127;
            header[2..].copy_from_slice(&(n as u64).to_be_bytes());
            MAX_HEADER
        }
    };
    (header, used)
}

/// A complete, unmasked server frame (FIN set).
pub fn frame(opcode: u8, payload: &[u8]) -> Bytes {
    let (header, used) = header(opcode, payload.len());
    let mut buf = BytesMut::with_capacity(used + payload.len());
    buf.put_slice(&header[..used]);
    buf.put_slice(payload);
    buf.freeze()
}

/// A control frame built on the stack: a pong is answered without an allocation.
pub struct Control {
    bytes: [u8; 2 + MAX_CONTROL_PAYLOAD],
    len: u8,
}

impl Control {
    /// `payload` is cut to the 125 bytes a control frame may carry (a decoded one never
    /// carries more).
    pub fn new(opcode: u8, payload: &[u8]) -> Control {
        let payload = &payload[..payload.len().min(MAX_CONTROL_PAYLOAD)];
        let mut bytes = [0u8; 2 + MAX_CONTROL_PAYLOAD];
        bytes[0] = 0x80 | opcode;
        bytes[1] = payload.len() as u8;
        bytes[2..2 + payload.len()].copy_from_slice(payload);
        Control { bytes, len: 2 + payload.len() as u8 }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

/// A close frame; the reason is cut to fit a control frame, at a character boundary.
pub fn close(code: u16, reason: &str) -> Bytes {
    let mut cut = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut payload = Vec::with_capacity(2 + cut);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..cut]);
    frame(OP_CLOSE, &payload)
}

pub fn text(json: &str) -> Bytes {
    frame(OP_TEXT, json.as_bytes())
}

/// A text frame around a payload written after `MAX_HEADER` bytes of room in `buf`: the
/// header goes at the end of that room, so the payload is never copied.
pub fn text_in(mut buf: Vec<u8>) -> Bytes {
    if buf.len() < MAX_HEADER {
        buf.resize(MAX_HEADER, 0);
    }
    let (header, used) = header(OP_TEXT, buf.len() - MAX_HEADER);
    let start = MAX_HEADER - used;
    buf[start..MAX_HEADER].copy_from_slice(&header[..used]);
    let mut frame = Bytes::from(buf);
    frame.advance(start);
    frame
}

/// The payload of a server frame built by [`frame`] (its header skipped).
pub fn payload_of(frame: &[u8]) -> &[u8] {
    let header = match frame.get(1) {
        Some(126) => 4,
        Some(127) => 10,
        _ => 2,
    };
    &frame[header.min(frame.len())..]
}

/// A frame as a client sends it (masked with `mask`): what tests, fuzzing and load
/// generators speak to the server.
pub fn client_frame(opcode: u8, fin: bool, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(if fin { 0x80 } else { 0 } | opcode);
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

#[cfg(test)]
mod tests {
    use super::*;

    const MASK: [u8; 4] = [0x11, 0x22, 0x33, 0x44];

    /// Every event in `bytes`, decoded frame by frame, or the first error.
    fn decode_all(bytes: &[u8], max: usize) -> Result<Vec<String>, ProtocolError> {
        let mut buf = bytes.to_vec();
        let mut decoder = Decoder::new();
        let mut at = 0;
        let mut events = Vec::new();
        loop {
            let decoded = decoder.decode(&mut buf[at..], max)?;
            if decoded.used == 0 {
                return Ok(events);
            }
            at += decoded.used;
            if let Some(event) = decoded.event {
                events.push(format!("{event:?}"));
            }
        }
    }

    #[test]
    fn decodes_and_unmasks_whole_frames_only() {
        for size in [0, 5, 125, 126, 300, 70_000] {
            let payload: String = (0..size).map(|i| (b'a' + (i % 26) as u8) as char).collect();
            let bytes = client_frame(OP_TEXT, true, payload.as_bytes(), MASK);
            for cut in [1, bytes.len() / 2, bytes.len() - 1] {
                if cut > 0 && cut < bytes.len() {
                    assert_eq!(decode_all(&bytes[..cut], 1 << 20).unwrap().len(), 0, "cut at {cut}");
                }
            }
            let mut buf = bytes.clone();
            let decoded = Decoder::new().decode(&mut buf, 1 << 20).unwrap();
            assert_eq!(decoded.used, bytes.len());
            assert_eq!(decoded.event, Some(Event::Text(Cow::Borrowed(payload.as_str()))));
        }
    }

    #[test]
    fn refuses_bad_frames() {
        let err = |bytes: &[u8]| decode_all(bytes, 100).unwrap_err();
        assert_eq!(err(&[0x81, 0x02, b'h', b'i']), ProtocolError::Unmasked);
        assert_eq!(err(&client_frame(OP_TEXT, true, &[b'x'; 200], MASK)), ProtocolError::TooBig);
        assert_eq!(err(&client_frame(OP_PING, false, b"x", MASK)), ProtocolError::BadControlFrame);
        let mut rsv = client_frame(OP_TEXT, true, b"x", MASK);
        rsv[0] |= 0x40;
        assert_eq!(err(&rsv), ProtocolError::ReservedBits);
        assert_eq!(err(&client_frame(0x3, true, b"x", MASK)), ProtocolError::UnknownOpcode(3));
        let mut msb = vec![0x81, 0x80 | 127];
        msb.extend_from_slice(&(1u64 << 63).to_be_bytes());
        msb.extend_from_slice(&MASK);
        assert_eq!(err(&msb), ProtocolError::BadLength);
    }

    #[test]
    fn fragments_are_reassembled_and_checked_as_they_come() {
        let mut bytes = client_frame(OP_TEXT, false, "{\"type\":\"pi".as_bytes(), MASK);
        bytes.extend(client_frame(OP_PING, true, b"mid", MASK));
        bytes.extend(client_frame(OP_CONTINUATION, true, b"ng\"}", MASK));
        assert_eq!(decode_all(&bytes, 100).unwrap(), [r#"Ping([109, 105, 100])"#, r#"Text("{\"type\":\"ping\"}")"#]);

        // "é" split across fragments is fine; 0xFF is impossible at once.
        let e = "é".as_bytes();
        let mut split = client_frame(OP_TEXT, false, &e[..1], MASK);
        split.extend(client_frame(OP_CONTINUATION, true, &e[1..], MASK));
        assert_eq!(decode_all(&split, 100).unwrap(), [r#"Text("é")"#]);
        let mut bad = client_frame(OP_TEXT, false, b"ok", MASK);
        bad.extend(client_frame(OP_CONTINUATION, false, &[0xFF], MASK));
        assert_eq!(decode_all(&bad, 100).unwrap_err(), ProtocolError::InvalidUtf8, "fails before the last fragment");
        let truncated = client_frame(OP_TEXT, false, &e[..1], MASK)
            .into_iter()
            .chain(client_frame(OP_CONTINUATION, true, b"", MASK))
            .collect::<Vec<_>>();
        assert_eq!(decode_all(&truncated, 100).unwrap_err(), ProtocolError::InvalidUtf8);

        let mut too_long = client_frame(OP_TEXT, false, &[b'a'; 60], MASK);
        too_long.extend(client_frame(OP_CONTINUATION, true, &[b'a'; 60], MASK));
        assert_eq!(decode_all(&too_long, 100).unwrap_err(), ProtocolError::TooBig);
    }

    #[test]
    fn a_binary_message_is_reported_once_and_discarded_whole() {
        let mut bytes = client_frame(OP_BINARY, false, b"\x00\x01", MASK);
        bytes.extend(client_frame(OP_CONTINUATION, false, br#"{"type":"subscribe","topics":["x"]}"#, MASK));
        bytes.extend(client_frame(OP_CONTINUATION, true, &[0xFF, 0xFE], MASK));
        bytes.extend(client_frame(OP_TEXT, true, b"after", MASK));
        assert_eq!(decode_all(&bytes, 100).unwrap(), ["Binary", r#"Text("after")"#]);
    }

    #[test]
    fn continuations_need_a_message_and_messages_need_their_end() {
        assert_eq!(decode_all(&client_frame(OP_CONTINUATION, true, b"x", MASK), 100).unwrap_err(), ProtocolError::UnexpectedContinuation);
        let mut bytes = client_frame(OP_TEXT, false, b"x", MASK);
        bytes.extend(client_frame(OP_TEXT, true, b"y", MASK));
        assert_eq!(decode_all(&bytes, 100).unwrap_err(), ProtocolError::ExpectedContinuation);
    }

    #[test]
    fn close_frames_are_checked_before_they_are_echoed() {
        let close_with = |payload: &[u8]| decode_all(&client_frame(OP_CLOSE, true, payload, MASK), 100);
        assert_eq!(close_with(b"").unwrap(), ["Close { code: None }"]);
        assert_eq!(close_with(&[0x03, 0xE8]).unwrap(), ["Close { code: Some(1000) }"]);
        assert_eq!(close_with(&[0x0F, 0xA0, b'b', b'y', b'e']).unwrap(), ["Close { code: Some(4000) }"]);
        assert_eq!(close_with(&[0x03]).unwrap_err(), ProtocolError::BadClose);
        for code in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535] {
            assert_eq!(close_with(&code.to_be_bytes()).unwrap_err(), ProtocolError::BadClose, "code {code}");
        }
        assert_eq!(close_with(&[0x03, 0xE8, 0xFF]).unwrap_err(), ProtocolError::InvalidUtf8);
    }

    #[test]
    fn server_frames_have_right_lengths() {
        assert_eq!(&frame(OP_TEXT, b"hi")[..], &[0x81, 2, b'h', b'i']);
        let f = frame(OP_TEXT, &[0; 300]);
        assert_eq!(&f[..4], &[0x81, 126, 1, 44]);
        let f = frame(OP_BINARY, &[0; 70_000]);
        assert_eq!(f[1], 127);
        assert_eq!(f.len(), 70_010);
        assert_eq!(payload_of(&f).len(), 70_000);
        let long_reason = "é".repeat(100);
        let c = close(CLOSE_NORMAL, &long_reason);
        assert!(c.len() <= 2 + MAX_CONTROL_PAYLOAD);
        assert!(std::str::from_utf8(&payload_of(&c)[2..]).is_ok(), "cut at a character boundary");
    }

    #[test]
    fn an_idle_decoder_holds_no_memory() {
        let mut bytes = client_frame(OP_TEXT, false, b"abc", MASK);
        bytes.extend(client_frame(OP_CONTINUATION, true, b"def", MASK));
        let mut decoder = Decoder::new();
        let mut buf = bytes.clone();
        let first = decoder.decode(&mut buf, 100).unwrap().used;
        assert!(matches!(&decoder.fragmented, Fragmented::Text(t) if t.capacity() > 0));
        decoder.decode(&mut buf[first..], 100).unwrap();
        assert_eq!(decoder.fragmented, Fragmented::None);
        assert_eq!(std::mem::size_of::<Decoder>(), std::mem::size_of::<Vec<u8>>(), "one word of state beside the buffer");
    }

    #[test]
    fn utf8_is_checked_across_any_fragment_boundary() {
        let text = "aé€😀b";
        for cut_every in 1..=4 {
            let chunks: Vec<&[u8]> = text.as_bytes().chunks(cut_every).collect();
            let mut bytes = Vec::new();
            for (i, chunk) in chunks.iter().enumerate() {
                let opcode = if i == 0 { OP_TEXT } else { OP_CONTINUATION };
                bytes.extend(client_frame(opcode, i + 1 == chunks.len(), chunk, MASK));
            }
            assert_eq!(decode_all(&bytes, 100).unwrap(), [format!("Text({text:?})")], "fragments of {cut_every} bytes");
        }
        // A lone continuation byte after a complete 4-byte character.
        let mut bad = client_frame(OP_TEXT, false, "😀".as_bytes(), MASK);
        bad.extend(client_frame(OP_CONTINUATION, false, &[0x80], MASK));
        assert_eq!(decode_all(&bad, 100).unwrap_err(), ProtocolError::InvalidUtf8);
    }
}
