//! RFC 6455 conformance, Autobahn-style (sections 1-7 and 9, and the handshake checks of
//! 4.2.1), adapted to a push server: where Autobahn expects an echo, a client here sends
//! a JSON ping and expects its pong; a binary message gets an error frame.
//!
//! Every case runs twice: through the sans-IO codec directly, and against the real
//! server over a socket. Both must give the same replies and the same close code.

mod common;

use common::*;
use pushline::client::commands::{self, Command};
use pushline::wire::ws::{self, client_frame, Decoder, Event, OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT};

const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
/// The server's default --max-client-frame-bytes.
const MAX: usize = 16 * 1024;

/// A reply the client expects.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reply {
    /// `{"type":"pong"}`, the answer to a JSON ping.
    JsonPong,
    /// A WebSocket pong carrying this payload.
    Pong(Vec<u8>),
    /// `{"type":"error",...}`.
    Error,
}

struct Case {
    id: &'static str,
    bytes: Vec<u8>,
    replies: Vec<Reply>,
    /// The close code the server answers with; None: the connection stays open.
    close: Option<u16>,
}

fn text(payload: &[u8]) -> Vec<u8> {
    client_frame(OP_TEXT, true, payload, MASK)
}

/// A JSON ping exactly `len` bytes long (at least 15), padded with spaces.
fn json_ping(len: usize) -> Vec<u8> {
    if len == 15 {
        return br#"{"type":"ping"}"#.to_vec();
    }
    let mut ping = br#"{"type":"ping""#.to_vec();
    ping.resize(len - 1, b' ');
    ping.push(b'}');
    ping
}

fn fragments(opcode: u8, payload: &[u8], size: usize) -> Vec<u8> {
    let chunks: Vec<&[u8]> = payload.chunks(size.max(1)).collect();
    let mut out = Vec::new();
    for (i, chunk) in chunks.iter().enumerate() {
        out.extend(client_frame(if i == 0 { opcode } else { OP_CONTINUATION }, i + 1 == chunks.len(), chunk, MASK));
    }
    out
}

fn case(id: &'static str, bytes: Vec<u8>, replies: Vec<Reply>, close: Option<u16>) -> Case {
    Case { id, bytes, replies, close }
}

fn cases() -> Vec<Case> {
    use Reply::*;
    let mut all = Vec::new();
    // 1: framing. Text of every length class, up to the limit; binary gets an error.
    for (id, len) in [("1.1.1", 15), ("1.1.2", 125), ("1.1.3", 126), ("1.1.4", 127), ("1.1.5", 128), ("1.1.6", 65535.min(MAX)), ("1.1.7", MAX)] {
        all.push(case(id, text(&json_ping(len)), vec![JsonPong], None));
    }
    for (id, len) in [("1.2.1", 0), ("1.2.2", 125), ("1.2.3", MAX)] {
        all.push(case(id, client_frame(OP_BINARY, true, &vec![0xFE; len], MASK), vec![Error], None));
    }
    // 2: pings and pongs.
    all.push(case("2.1", client_frame(OP_PING, true, b"", MASK), vec![Pong(vec![])], None));
    let p125: Vec<u8> = (0..125).map(|i| i as u8).collect();
    all.push(case("2.2", client_frame(OP_PING, true, &p125, MASK), vec![Pong(p125.clone())], None));
    all.push(case("2.3", client_frame(OP_PING, true, &[0x00, 0xff, 0xfe, 0xfd], MASK), vec![Pong(vec![0x00, 0xff, 0xfe, 0xfd])], None));
    all.push(case("2.4", client_frame(OP_PING, true, &[b'x'; 126], MASK), vec![], Some(1002)));
    all.push(case("2.5", client_frame(OP_PONG, true, b"unsolicited", MASK), vec![], None));
    let mut pong_then_ping = client_frame(OP_PONG, true, b"x", MASK);
    pong_then_ping.extend(client_frame(OP_PING, true, b"y", MASK));
    all.push(case("2.6", pong_then_ping, vec![Pong(b"y".to_vec())], None));
    let ten: Vec<u8> = (0..10).flat_map(|i| client_frame(OP_PING, true, &[i], MASK)).collect();
    all.push(case("2.7", ten, (0..10).map(|i| Pong(vec![i])).collect(), None));
    // 3: reserved bits.
    for (id, bits, opcode) in [("3.1", 0x40, OP_TEXT), ("3.2", 0x20, OP_TEXT), ("3.3", 0x10, OP_PING), ("3.4", 0x70, OP_BINARY)] {
        let mut frame = client_frame(opcode, true, b"{\"type\":\"ping\"}", MASK);
        frame[0] |= bits;
        let mut bytes = text(&json_ping(15));
        bytes.extend(frame);
        bytes.extend(text(&json_ping(15)));
        all.push(case(id, bytes, vec![JsonPong], Some(1002)));
    }
    // 4: reserved opcodes.
    for opcode in [3u8, 4, 5, 6, 7, 11, 12, 13, 14, 15] {
        let id = if opcode < 8 { "4.1" } else { "4.2" };
        let mut bytes = text(&json_ping(15));
        bytes.extend(client_frame(opcode, true, b"x", MASK));
        bytes.extend(text(&json_ping(15)));
        all.push(case(id, bytes, vec![JsonPong], Some(1002)));
    }
    // 5: fragmentation.
    all.push(case("5.1", client_frame(OP_PING, false, b"x", MASK), vec![], Some(1002)));
    all.push(case("5.2", client_frame(OP_PONG, false, b"x", MASK), vec![], Some(1002)));
    all.push(case("5.3", fragments(OP_TEXT, &json_ping(40), 20), vec![JsonPong], None));
    all.push(case("5.4", fragments(OP_TEXT, &json_ping(40), 1), vec![JsonPong], None));
    let mut interleaved = client_frame(OP_TEXT, false, br#"{"type""#, MASK);
    interleaved.extend(client_frame(OP_PING, true, b"mid", MASK));
    interleaved.extend(client_frame(OP_CONTINUATION, true, br#":"ping"}"#, MASK));
    all.push(case("5.5", interleaved, vec![Pong(b"mid".to_vec()), JsonPong], None));
    all.push(case("5.6", client_frame(OP_CONTINUATION, true, b"x", MASK), vec![], Some(1002)));
    all.push(case("5.7", client_frame(OP_CONTINUATION, false, b"x", MASK), vec![], Some(1002)));
    let mut restarted = client_frame(OP_TEXT, false, b"{", MASK);
    restarted.extend(text(&json_ping(15)));
    all.push(case("5.8", restarted, vec![], Some(1002)));
    all.push(case("5.9", fragments(OP_TEXT, &json_ping(MAX + 1), 4096), vec![], Some(1009)));
    let mut binary_hiding_a_command = client_frame(OP_BINARY, false, b"\x00", MASK);
    binary_hiding_a_command.extend(client_frame(OP_CONTINUATION, true, br#"{"type":"ping"}"#, MASK));
    all.push(case("5.10", binary_hiding_a_command, vec![Error], None));
    // 6: UTF-8.
    let greek = r#"{"type":"ping","x":"κόσμε 😀"}"#.as_bytes().to_vec();
    all.push(case("6.1", text(&greek), vec![JsonPong], None));
    for size in 1..=4 {
        all.push(case("6.2", fragments(OP_TEXT, &greek, size), vec![JsonPong], None));
    }
    for (id, bad) in [("6.3.1", &b"\xff"[..]), ("6.3.2", b"\xc0\xaf"), ("6.3.3", b"\xed\xa0\x80"), ("6.3.4", b"\xf4\x90\x80\x80"), ("6.3.5", b"\xce")] {
        let mut payload = br#"{"type":"ping","x":""#.to_vec();
        payload.extend_from_slice(bad);
        payload.extend_from_slice(br#""}"#);
        all.push(case(id, text(&payload), vec![], Some(1007)));
    }
    // Fail fast: the server closes at the fragment where the text became impossible,
    // without waiting for the rest (which never comes).
    all.push(case("6.4.1", client_frame(OP_TEXT, false, b"{\"x\":\"\xff", MASK), vec![], Some(1007)));
    let mut cut = client_frame(OP_TEXT, false, b"{\"x\":\"\xce", MASK);
    cut.extend(client_frame(OP_CONTINUATION, true, b"", MASK));
    all.push(case("6.4.2", cut, vec![], Some(1007)));
    // 7: closing.
    all.push(case("7.1", client_frame(OP_CLOSE, true, b"", MASK), vec![], Some(1000)));
    all.push(case("7.2", client_frame(OP_CLOSE, true, b"\x03\xe8bye", MASK), vec![], Some(1000)));
    all.push(case("7.3", client_frame(OP_CLOSE, true, b"\x03", MASK), vec![], Some(1002)));
    let mut reason = vec![0x03, 0xe8];
    reason.extend([b'r'; 123]);
    all.push(case("7.4", client_frame(OP_CLOSE, true, &reason, MASK), vec![], Some(1000)));
    let mut ping_then_close = client_frame(OP_PING, true, b"p", MASK);
    ping_then_close.extend(client_frame(OP_CLOSE, true, b"\x03\xe8", MASK));
    ping_then_close.extend(client_frame(OP_PING, true, b"after", MASK));
    all.push(case("7.5", ping_then_close, vec![Pong(b"p".to_vec())], Some(1000)));
    for code in [1000u16, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999] {
        all.push(case("7.7", client_frame(OP_CLOSE, true, &code.to_be_bytes(), MASK), vec![], Some(code)));
    }
    for code in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535] {
        all.push(case("7.9", client_frame(OP_CLOSE, true, &code.to_be_bytes(), MASK), vec![], Some(1002)));
    }
    all.push(case("7.5.1", client_frame(OP_CLOSE, true, b"\x03\xe8\xff\xfe", MASK), vec![], Some(1007)));
    // 9: limits and volume.
    all.push(case("9.1.1", text(&json_ping(MAX + 1)), vec![], Some(1009)));
    let mut msb = vec![0x81, 0x80 | 127];
    msb.extend_from_slice(&(1u64 << 63 | 20).to_be_bytes());
    msb.extend_from_slice(&MASK);
    all.push(case("9.1.2", msb, vec![], Some(1002)));
    all.push(case("9.2.1", (0..1000).flat_map(|_| text(&json_ping(15))).collect(), vec![JsonPong; 1000], None));
    all.push(case("9.2.2", (0..500).flat_map(|_| client_frame(OP_PING, true, &p125, MASK)).collect(), vec![Pong(p125.clone()); 500], None));
    all.push(case("9.3.1", fragments(OP_TEXT, &json_ping(MAX), 64), vec![JsonPong], None));
    all
}

/// What the codec makes of a case: the replies the server would send and its close code.
fn through_the_codec(bytes: &[u8]) -> (Vec<Reply>, Option<u16>) {
    let mut buf = bytes.to_vec();
    let mut decoder = Decoder::new();
    let (mut at, mut replies) = (0, Vec::new());
    loop {
        match decoder.decode(&mut buf[at..], MAX) {
            Err(e) => return (replies, Some(e.close_code())),
            Ok(decoded) if decoded.used == 0 => return (replies, None),
            Ok(decoded) => {
                at += decoded.used;
                match decoded.event {
                    Some(Event::Text(text)) => replies.push(match commands::parse(&text) {
                        Ok(Command::Ping) => Reply::JsonPong,
                        _ => Reply::Error,
                    }),
                    Some(Event::Binary) => replies.push(Reply::Error),
                    Some(Event::Ping(payload)) => replies.push(Reply::Pong(payload.to_vec())),
                    Some(Event::Close { code }) => return (replies, Some(code.unwrap_or(ws::CLOSE_NORMAL))),
                    Some(Event::Pong) | None => {}
                }
            }
        }
    }
}

#[test]
fn the_codec_passes_every_case() {
    for case in cases() {
        let (replies, close) = through_the_codec(&case.bytes);
        assert_eq!(replies, case.replies, "case {}: replies", case.id);
        assert_eq!(close, case.close, "case {}: close", case.id);
    }
}

#[tokio::test]
async fn the_server_passes_every_case() {
    // Volume cases send a thousand commands at once: above the per-connection limit,
    // which is not what they test.
    let t = start(|c| c.max_commands_per_second = u16::MAX).await;
    for case in cases() {
        let mut client = RawWs::open(t.client, "uid=conformance").await;
        client.send(&case.bytes).await;
        for expected in &case.replies {
            let (opcode, payload) = client.next_frame().await.unwrap_or_else(|| panic!("case {}: closed early", case.id));
            let got = match opcode {
                0x1 if payload == br#"{"type":"pong"}"# => Reply::JsonPong,
                0x1 if String::from_utf8_lossy(&payload).contains(r#""type":"error""#) => Reply::Error,
                0xA => Reply::Pong(payload),
                _ => panic!("case {}: unexpected frame {opcode:#x} {:?}", case.id, String::from_utf8_lossy(&payload)),
            };
            assert_eq!(&got, expected, "case {}", case.id);
        }
        match case.close {
            Some(code) => assert_eq!(client.expect_close().await, Some(code), "case {}: close code", case.id),
            None => {
                // Still open, and nothing else was said: the next reply is this ping's.
                client.send(&text(&json_ping(15))).await;
                let (opcode, payload) = client.next_frame().await.expect("still open");
                assert_eq!((opcode, payload.as_slice()), (1, &br#"{"type":"pong"}"#[..]), "case {}: still open", case.id);
            }
        }
    }
}

#[tokio::test]
async fn a_text_message_written_a_byte_at_a_time_is_read_whole() {
    let t = start(|_| {}).await;
    let mut client = RawWs::open(t.client, "uid=trickle").await;
    for byte in text(&json_ping(200)) {
        client.send(&[byte]).await;
    }
    let (opcode, payload) = client.next_frame().await.expect("a pong");
    assert_eq!((opcode, payload.as_slice()), (1, &br#"{"type":"pong"}"#[..]));
}

#[tokio::test]
async fn handshakes_need_http_1_1_and_a_host() {
    let t = start(|_| {}).await;
    let (status, _) = RawWs::try_handshake(t.client, "GET /ws?uid=old HTTP/1.0\r\nHost: x\r\n").await;
    assert_eq!(status, 400, "RFC 6455 4.2.1: HTTP/1.1 or later");
    let (status, _) = RawWs::try_handshake(t.client, "GET /ws?uid=nohost HTTP/1.1\r\n").await;
    assert_eq!(status, 400, "an HTTP/1.1 request without Host");
    let (status, _) = RawWs::try_handshake(t.client, "GET /ws?uid=ok HTTP/1.1\r\nHost: x\r\n").await;
    assert_eq!(status, 101);
}
