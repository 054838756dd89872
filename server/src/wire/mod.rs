//! Bytes on the wire: the WebSocket codec ([`ws`]), Server-Sent Events ([`sse`]), and a
//! published [`Message`] framed for both.
//!
//! A message is framed once, for both transports, when it is published; every connection
//! that receives it writes the same `Bytes`. Nothing here does I/O.

pub mod cursor;
pub mod json;
pub mod sse;
pub mod ws;

use std::sync::OnceLock;
use std::time::Instant;

use bytes::Bytes;
use pushline_alloc::Site;
use strum::{EnumCount, IntoStaticStr, VariantArray};

use cursor::{parse_epoch, EpochText, Position, StreamKey};

/// The transports a client can hold a connection with. Label `transport` of the
/// connection metrics; its number is an argument of the `conn_open` probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, EnumCount, IntoStaticStr, VariantArray)]
pub enum Transport {
    #[strum(serialize = "ws")]
    WebSocket,
    #[strum(serialize = "sse")]
    Sse,
    /// A WebSocket speaking the Pusher Channels protocol (`/app/{key}`).
    #[strum(serialize = "pusher")]
    Pusher,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        self.into()
    }

    /// Whether it is framed as WebSocket frames.
    pub fn is_websocket(self) -> bool {
        matches!(self, Transport::WebSocket | Transport::Pusher)
    }
}

/// `bytes` as lower-case hex, as digests and signatures are written (Redis script hashes,
/// key tags, webhook and Pusher signatures).
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 0xf) as usize] as char);
    }
    out
}

/// A published message, framed for every transport.
pub struct Message {
    pub id: u64,
    /// Where it sits in its stream; None when its stream keeps no history.
    pub position: Option<Position>,
    ws: Bytes,
    /// The SSE event's head, made for the first SSE connection it goes to (most messages
    /// never meet one); each connection ends it with its own cursor.
    sse: OnceLock<Bytes>,
    /// When the publish API accepted it; delivery latency is measured from here.
    pub accepted_at: Instant,
    /// The session of the client that published it, which a topic's delivery skips (it
    /// did not ask for its own message back).
    pub except: Option<u64>,
    /// The answer to a client's own request (a publish, a presence page): never dropped
    /// to make room in a full queue.
    pub answer: bool,
    /// Not written: the connections it reaches are closed (see [`TERMINATE`]).
    pub terminates: bool,
}

/// The Pusher event that, published to a user's `#server-to-user-` topic, closes that
/// user's connections wherever they are (`terminate_connections`). No publisher can send
/// an event of that name: the API refuses `pusher` names, clients send only `client-` ones.
pub const TERMINATE: &str = "pusher_internal:terminate";

/// The envelope up to its last field: what a Redis script appends the message's position
/// to once it knows its offset (the same bytes [`Message::new`] writes).
pub fn open_envelope(id: u64, topic: Option<&str>, data: &str) -> String {
    let mut out = Vec::with_capacity(ENVELOPE_ROOM + data.len() + topic.map_or(0, str::len));
    write_open_envelope(&mut out, id, topic, data);
    // Only JSON and ASCII were written: `data` is checked JSON, the topic is escaped by serde_json.
    String::from_utf8(out).unwrap_or_default()
}

/// Bytes of an envelope besides its data and topic, with a position: enough that it is
/// written without growing its buffer.
const ENVELOPE_ROOM: usize = 128;

fn write_open_envelope(out: &mut Vec<u8>, id: u64, topic: Option<&str>, data: &str) {
    out.extend_from_slice(br#"{"type":"message","id":""#);
    out.extend_from_slice(itoa::Buffer::new().format(id).as_bytes());
    out.extend_from_slice(br#"","topic":"#);
    match topic {
        Some(topic) => {
            let _ = serde_json::to_writer(&mut *out, topic);
        }
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(br#","data":"#);
    out.extend_from_slice(data.as_bytes());
}

/// Ends an envelope opened by [`write_open_envelope`], with the message's position if it
/// has one. Written field by field: with `write!` the formatting machinery (and a String
/// for the stream key) was a fifth of framing a message.
fn write_close_envelope(out: &mut Vec<u8>, position: Option<&Position>) {
    if let Some(p) = position {
        out.extend_from_slice(br#","stream":""#);
        p.key.write_to(out);
        out.extend_from_slice(br#"","epoch":""#);
        out.extend_from_slice(&EpochText(p.epoch).digits());
        out.extend_from_slice(br#"","offset":"#);
        out.extend_from_slice(itoa::Buffer::new().format(p.offset).as_bytes());
    }
    out.push(b'}');
}

/// The position written at the end of an envelope by [`Message::new`] (or by the Redis
/// script that mirrors it).
/// Read from the end, a field at a time: every relayed message is read so, and searching
/// for the field names took ~200 ns of it (a substring searcher made per name).
pub fn envelope_position(envelope: &str) -> Option<Position> {
    let (rest, offset) = envelope.strip_suffix('}')?.rsplit_once(':')?;
    let (rest, epoch) = rest.strip_suffix(r#"","offset""#)?.rsplit_once('"')?;
    let (rest, key) = rest.strip_suffix(r#"","epoch":"#)?.rsplit_once('"')?;
    rest.ends_with(r#","stream":"#).then_some(())?;
    Some(Position { key: StreamKey::parse(key)?, epoch: parse_epoch(epoch)?, offset: offset.parse().ok()? })
}

/// A Pusher event's name and channel: a message published with them is framed as Pusher
/// clients read it, `{"event":..,"channel":..,"data":..}` (the fields after those, its id
/// and position, are ignored by them).
#[derive(Clone, Copy, Debug)]
pub struct PusherEvent<'a> {
    pub event: &'a str,
    pub channel: &'a str,
    /// A client event on a presence channel: the user who sent it.
    pub user_id: Option<&'a str>,
}

fn write_open_pusher(out: &mut Vec<u8>, id: u64, pusher: PusherEvent<'_>, data: &str) {
    out.extend_from_slice(br#"{"event":"#);
    let _ = serde_json::to_writer(&mut *out, pusher.event);
    out.extend_from_slice(br#","channel":"#);
    let _ = serde_json::to_writer(&mut *out, pusher.channel);
    out.extend_from_slice(br#","data":"#);
    out.extend_from_slice(data.as_bytes());
    if let Some(user_id) = pusher.user_id {
        out.extend_from_slice(br#","user_id":"#);
        let _ = serde_json::to_writer(&mut *out, user_id);
    }
    out.extend_from_slice(br#","id":""#);
    out.extend_from_slice(itoa::Buffer::new().format(id).as_bytes());
    out.push(b'"');
}

impl Message {
    /// `data` is JSON, already checked and compacted ([`json::compact`]).
    pub fn new(id: u64, topic: Option<&str>, data: &str, position: Option<Position>, accepted_at: Instant) -> Message {
        Message::framed(ENVELOPE_ROOM + data.len() + topic.map_or(0, str::len), |frame| write_open_envelope(frame, id, topic, data), id, position, accepted_at)
    }

    /// A Pusher event (see [`PusherEvent`]); `data` is JSON, checked.
    pub fn pusher(id: u64, pusher: PusherEvent<'_>, data: &str, position: Option<Position>, accepted_at: Instant) -> Message {
        let room = ENVELOPE_ROOM + data.len() + pusher.event.len() + pusher.channel.len();
        let message = Message::framed(room, |frame| write_open_pusher(frame, id, pusher, data), id, position, accepted_at);
        Message { terminates: pusher.event == TERMINATE, ..message }
    }

    /// A message whose envelope `open` writes up to its position, in about `room` bytes.
    fn framed(room: usize, open: impl FnOnce(&mut Vec<u8>), id: u64, position: Option<Position>, accepted_at: Instant) -> Message {
        // Written once, straight into its WebSocket frame, after room for the longest header.
        let mut frame = Vec::with_capacity(ws::MAX_HEADER + room);
        frame.resize(ws::MAX_HEADER, 0);
        open(&mut frame);
        write_close_envelope(&mut frame, position.as_ref());
        let ws = ws::text_in(frame);
        Message { id, position, ws, sse: OnceLock::new(), accepted_at, except: None, answer: false, terminates: false }
    }

    /// The answer to a client's request, as its queue carries it.
    pub fn answer(json: &str) -> Message {
        Message { answer: true, ..Message::from_envelope(0, json, None, Instant::now()) }
    }

    /// A message framed elsewhere (another node, or history): `envelope` is its JSON. An
    /// envelope that is a notice (`{"type":"gap",...`, relayed by the append script) is an
    /// SSE event of its own type.
    pub fn from_envelope(id: u64, envelope: &str, position: Option<Position>, accepted_at: Instant) -> Message {
        let ws = ws::text(envelope);
        let terminates = envelope.strip_prefix(r#"{"event":""#).is_some_and(|rest| rest.starts_with(TERMINATE) && rest[TERMINATE.len()..].starts_with('"'));
        Message { id, position, ws, sse: OnceLock::new(), accepted_at, except: None, answer: false, terminates }
    }

    /// Whether it is a notice (`gap`, ...) rather than a message: its envelope's type, as
    /// its SSE event is named.
    pub fn is_notice(&self) -> bool {
        sse_kind(self.envelope()) != "message"
    }

    /// The same message, not delivered to the topic subscriber with this session.
    pub fn except(self, session: Option<u64>) -> Message {
        Message { except: session, ..self }
    }

    /// The JSON envelope, read back out of the WebSocket frame.
    pub fn envelope(&self) -> &[u8] {
        ws::payload_of(&self.ws)
    }

    /// The bytes to write: a whole WebSocket frame, or an SSE event's head.
    pub fn bytes(&self, transport: Transport) -> &Bytes {
        match transport {
            Transport::WebSocket | Transport::Pusher => &self.ws,
            Transport::Sse => self.sse.get_or_init(|| Site::Codec.scope(|| sse::head(sse_kind(self.envelope()), self.envelope()))),
        }
    }

    /// The length of [`Message::bytes`] for `transport`, without making the SSE head.
    pub fn len(&self, transport: Transport) -> usize {
        match transport {
            Transport::WebSocket | Transport::Pusher => self.ws.len(),
            Transport::Sse => sse::head_len(sse_kind(self.envelope()), self.envelope()),
        }
    }
}

/// The SSE event an envelope is: its `type` (`message`, or a notice's: `gap`, ...).
fn sse_kind(envelope: &[u8]) -> &str {
    envelope
        .strip_prefix(br#"{"type":""#)
        .and_then(|rest| rest.iter().position(|b| *b == b'"').map(|end| &rest[..end]))
        .and_then(|kind| std::str::from_utf8(kind).ok())
        .unwrap_or("message")
}

/// A publish before its stream has given it a position: checked, not yet framed.
#[derive(Clone, Copy)]
pub struct Draft<'a> {
    pub id: u64,
    /// The API key's name that published it ("" in open mode): charged with its history.
    pub publisher: &'a str,
    pub topic: Option<&'a str>,
    /// JSON, checked and compacted.
    pub data: &'a str,
    pub accepted_at: Instant,
    /// A client's publish: its session, left out of the topic's delivery.
    pub except: Option<u64>,
    /// A Pusher event: framed for Pusher clients.
    pub pusher: Option<PusherEvent<'a>>,
}

impl Draft<'_> {
    /// A Pusher client's `client-` event: kept in no history. No Pusher client reads one
    /// back (a cache channel gives the application's last event), and kept, a client's
    /// events would push the application's out of the channel's history, and the node's.
    pub fn is_client_event(&self) -> bool {
        self.pusher.is_some_and(|pusher| pusher.event.starts_with("client-"))
    }

    pub fn frame(&self, position: Option<Position>) -> std::sync::Arc<Message> {
        let message = match self.pusher {
            None => Message::new(self.id, self.topic, self.data, position, self.accepted_at),
            Some(pusher) => Message::pusher(self.id, pusher, self.data, position, self.accepted_at),
        };
        Site::Codec.scope(|| std::sync::Arc::new(message.except(self.except)))
    }

    /// The envelope up to its position, for a Redis script to end (see [`open_envelope`]).
    pub fn open_envelope(&self) -> String {
        match self.pusher {
            None => open_envelope(self.id, self.topic, self.data),
            Some(pusher) => {
                let mut out = Vec::with_capacity(ENVELOPE_ROOM + self.data.len());
                write_open_pusher(&mut out, self.id, pusher, self.data);
                String::from_utf8(out).unwrap_or_default()
            }
        }
    }
}

/// A server message that is not a publish (`resumed`, `gap`), framed for `transport`
/// (for SSE, an event's head).
pub fn notice(transport: Transport, kind: &str, json: &str) -> Bytes {
    match transport {
        Transport::WebSocket | Transport::Pusher => ws::text(json),
        Transport::Sse => sse::head(kind, json.as_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_lower_case_two_digits_a_byte() {
        assert_eq!(hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
        assert_eq!(hex(&[]), "");
    }

    #[test]
    fn a_relayed_envelope_frames_the_same_bytes() {
        for len in [10, 200, 70_000] {
            let data = format!("\"{}\"", "x".repeat(len));
            let position = Some(Position { key: StreamKey::Topic(9), epoch: 3, offset: 7 });
            let original = Message::new(42, Some("t"), &data, position, Instant::now());
            let envelope = std::str::from_utf8(original.envelope()).unwrap();
            assert_eq!(envelope_position(envelope), position);
            let relayed = Message::from_envelope(42, envelope, position, Instant::now());
            assert_eq!(relayed.bytes(Transport::WebSocket), original.bytes(Transport::WebSocket));
            assert_eq!(relayed.bytes(Transport::Sse), original.bytes(Transport::Sse));
        }
    }

    #[test]
    fn message_envelope_is_framed_for_both_transports() {
        let m = Message::new(42, Some("news\"x"), r#"{"a":[1,2]}"#, None, Instant::now());
        let ws = m.bytes(Transport::WebSocket);
        assert_eq!(ws[0], 0x81);
        let json: serde_json::Value = serde_json::from_slice(&ws[2..]).unwrap();
        assert_eq!(json["id"], "42");
        assert_eq!(json["topic"], "news\"x");
        assert_eq!(json["data"]["a"][1], 2);
        let sse = std::str::from_utf8(m.bytes(Transport::Sse)).unwrap();
        assert!(sse.starts_with("event: message\ndata: {"), "{sse}");
        assert!(sse.ends_with("}\n"), "the connection ends the event with its cursor");
        assert_eq!(envelope_position(std::str::from_utf8(m.envelope()).unwrap()), None);
        // A position in the data is not the message's.
        let data = r#"{"stream":"t.0000000000000009","epoch":"00000003","offset":7}"#;
        for data in [data.to_owned(), format!("[{data}]"), r#""","stream":"b","epoch":"00000003","offset":7""#.to_owned()] {
            let m = Message::new(42, None, &data, None, Instant::now());
            assert_eq!(envelope_position(std::str::from_utf8(m.envelope()).unwrap()), None, "{data}");
        }
    }

    #[test]
    fn the_sse_head_is_made_when_first_asked_and_its_length_known_before() {
        let gap = Message::from_envelope(0, r#"{"type":"gap","stream":"t1","reason":"trimmed"}"#, None, Instant::now());
        let m = Message::new(7, Some("t"), "1", None, Instant::now());
        for (msg, kind) in [(&gap, "gap"), (&m, "message")] {
            assert!(msg.sse.get().is_none(), "not made for a message no SSE client got");
            let length = msg.len(Transport::Sse);
            let sse = msg.bytes(Transport::Sse).clone();
            assert_eq!((sse.len(), msg.len(Transport::WebSocket)), (length, msg.bytes(Transport::WebSocket).len()));
            assert!(sse.starts_with(format!("event: {kind}\ndata: {{").as_bytes()));
            assert_eq!(msg.bytes(Transport::Sse).as_ptr(), sse.as_ptr(), "made once");
        }
    }
}
