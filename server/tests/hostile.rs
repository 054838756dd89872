//! Hostile clients and careless publishers: what each attack costs the server is
//! bounded, and each refusal says why.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the server closes the connection (EOF or reset); returns what it sent.
async fn read_until_closed(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match tokio::time::timeout(WAIT, stream.read(&mut chunk)).await.expect("the server closes the connection in time") {
            Ok(0) | Err(_) => return String::from_utf8_lossy(&out).into_owned(),
            Ok(n) => out.extend_from_slice(&chunk[..n]),
        }
    }
}

#[tokio::test]
async fn publish_api_connections_have_timers_and_a_head_limit() {
    let t = start(|c| c.handshake_timeout = Duration::from_millis(300)).await;
    // An unfinished second request head: hyper buffers at most 16 KiB of it, then refuses.
    let mut big_head = TcpStream::connect(t.client).await.unwrap();
    big_head.write_all(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\nGET /y HTTP/1.1\r\nHost: x\r\nX-Pad: ").await.unwrap();
    let padding = vec![b'a'; 64 * 1024];
    let _ = big_head.write_all(&padding).await;
    let answered = read_until_closed(&mut big_head).await;
    assert!(answered.starts_with("HTTP/1.1 404"), "the first request is answered: {answered}");
    assert!(answered.contains("431"), "the oversized head is refused: {answered}");

    // An idle keep-alive connection is closed after the request timeout.
    let mut idle = TcpStream::connect(t.client).await.unwrap();
    idle.write_all(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let started = Instant::now();
    assert!(read_until_closed(&mut idle).await.starts_with("HTTP/1.1 404"));
    assert!(started.elapsed() < Duration::from_secs(5), "closed after {:?}", started.elapsed());

    // A body that never finishes gets 408 after the request timeout.
    let mut slow_body = TcpStream::connect(t.client).await.unwrap();
    slow_body.write_all(b"POST /v1/broadcast HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"data\":").await.unwrap();
    let answered = read_until_closed(&mut slow_body).await;
    assert!(answered.starts_with("HTTP/1.1 408"), "{answered}");
}

#[tokio::test]
async fn publish_api_connections_are_capped_and_counted() {
    let t = start(|c| c.max_api_connections = 2).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut keep = TcpStream::connect(t.client).await.unwrap();
        keep.write_all(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut reply = [0u8; 12];
        keep.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply, b"HTTP/1.1 404");
        held.push(keep);
    }
    let mut third = TcpStream::connect(t.client).await.unwrap();
    third.write_all(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let answered = read_until_closed(&mut third).await;
    assert!(answered.starts_with("HTTP/1.1 503") && answered.contains("too many publish API connections"), "{answered}");
    assert_eq!(metric(&metrics(t.admin).await, r#"pushline_connections_refused_total{reason="api_connections"}"#), 1.0);
    drop(held);
    // WebSocket clients are not held back by API connections.
    let (_ws, welcome) = ws(t.client, "uid=still-welcome").await;
    assert_eq!(welcome["uid"], "still-welcome");
}

#[tokio::test]
async fn publish_bodies_being_read_are_capped_in_bytes() {
    let t = start(|c| c.max_publish_bytes_in_flight = 3 << 20).await;
    let mut slow = Vec::new();
    for i in 0..4 {
        let mut stream = TcpStream::connect(t.client).await.unwrap();
        let head = "POST /v1/broadcast HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n{\"data\":\"";
        stream.write_all(head.as_bytes()).await.unwrap();
        if i < 3 {
            slow.push(stream);
            // Each is being read before the next arrives: the first three fit.
            let reading = (i + 1) * 1_000_000usize.div_ceil(1024) * 1024;
            wait_metric(t.admin, "pushline_publish_bytes_reading", |v| v == reading as f64).await;
        } else {
            let answered = read_until_closed(&mut stream).await;
            assert!(answered.starts_with("HTTP/1.1 503") && answered.contains("--max-publish-bytes-in-flight"), "{answered}");
        }
    }
    let dropped = metric(&metrics(t.admin).await, r#"pushline_messages_dropped_total{reason="node_over_budget"}"#);
    assert_eq!(dropped, 1.0);
}

#[tokio::test]
async fn a_refusal_before_the_body_is_read_reaches_the_client() {
    let t = start(|c| {
        c.jwt_secret = Some("test-secret-of-thirty-two-bytes!".into());
        c.api_key = Some("test-api-key-of-thirty-two-bytes".into());
    })
    .await;
    // 900 KB without a key: answered 401 before the body is read, and the client reads
    // the 401, not a reset.
    let body = json!({"data": "x".repeat(900_000)}).to_string();
    for _ in 0..5 {
        let (status, _, reply) = post_raw(t.client, "/v1/broadcast", body.clone(), None).await;
        assert_eq!(status, 401, "{reply}");
    }
}

#[tokio::test]
async fn a_client_that_pings_and_never_reads_is_held_back_not_buffered() {
    let server = Process::spawn(&[], None);
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.set_send_buffer_size(64 * 1024).unwrap();
    let stream = socket.connect(server.client).await.unwrap();
    let mut client = {
        let mut raw = RawWs::handshake_on(stream, "GET /ws?uid=flooder HTTP/1.1\r\nHost: x\r\n").await;
        raw.next_frame().await.expect("welcome");
        raw
    };
    // 50 MB of pings, never reading a pong: the server stops reading once replies back
    // up, and the client's writes stall.
    let pings: Vec<u8> = (0..4096).flat_map(|_| pushline::wire::ws::client_frame(1, true, br#"{"type":"ping"}"#, [1, 2, 3, 4])).collect();
    let mut sent = 0usize;
    while sent < 50 << 20 {
        match tokio::time::timeout(Duration::from_secs(1), client.stream.write_all(&pings)).await {
            Ok(Ok(())) => sent += pings.len(),
            _ => break,
        }
    }
    assert!(sent < 16 << 20, "the server kept reading: {sent} bytes of pings taken");
    let memory = get_json(server.admin, "/debug/memory").await;
    let per_connection: i64 = ["connection_task", "sessions", "outbound_queue", "codec"]
        .iter()
        .map(|site| memory["sites"].as_array().unwrap().iter().find(|s| s["site"] == *site).unwrap()["live_bytes"].as_i64().unwrap())
        .sum();
    assert!(per_connection < 1 << 20, "the flooder costs {per_connection} bytes");
}

#[tokio::test]
async fn a_queue_that_stays_full_is_closed_whatever_the_policy() {
    let t = start(|c| c.slow_consumer_timeout = Duration::from_millis(500)).await;
    let mut slow = slow_ws(t.client, "uid=stuck").await;
    let blob = "x".repeat(50_000);
    // More than the kernel's socket buffers take, so the queue fills and stays full.
    for i in 0..200 {
        post(t.client, "/v1/push", json!({"uids": ["stuck"], "data": {"i": i, "blob": blob}})).await;
    }
    wait_metric(t.admin, r#"pushline_connections_closed_total{transport="ws",reason="slow_consumer"}"#, |v| v == 1.0).await;
    // What it was owed is dropped and counted. Its 1013 cannot pass a pipe that stays
    // full; the socket is closed after a bounded wait, and the client sees its end.
    let text = metrics(t.admin).await;
    assert!(metric(&text, r#"pushline_messages_dropped_total{reason="queue_full"}"#) > 0.0);
    assert!(metric(&text, r#"pushline_messages_dropped_total{reason="connection_closed"}"#) > 0.0);
    use futures_util::StreamExt;
    loop {
        match tokio::time::timeout(WAIT, slow.next()).await.expect("the connection ends") {
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => break,
        }
    }
}

#[tokio::test]
async fn one_uid_holds_at_most_its_share_of_connections() {
    let t = start(|c| c.max_connections_per_uid = 2).await;
    let _a = ws(t.client, "uid=greedy").await;
    let _b = ws(t.client, "uid=greedy").await;
    let (status, third) = RawWs::try_handshake(t.client, "GET /ws?uid=greedy HTTP/1.1\r\nHost: x\r\n").await;
    assert_eq!(status, 429);
    drop(third);
    let text = metrics(t.admin).await;
    assert_eq!(metric(&text, r#"pushline_connections_refused_total{reason="max_connections_per_uid"}"#), 1.0);
    assert_eq!(metric(&text, r#"pushline_connections{transport="ws"}"#), 2.0);
    let (_other, welcome) = ws(t.client, "uid=modest").await;
    assert_eq!(welcome["uid"], "modest");
}

#[tokio::test]
async fn pretty_printed_data_reaches_sse_clients_whole() {
    let t = start(|_| {}).await;
    let (_, mut sse) = Sse::open(t.client, "uid=reader").await;
    sse.next_event().await;
    let pretty = "{\"uids\": [\"reader\"],\n \"data\": {\n   \"title\": \"two\\nlines\",\n   \"list\": [1,\n 2]\n }\n}";
    let (status, _, reply) = post_raw(t.client, "/v1/push", pretty.to_string(), None).await;
    assert_eq!(status, 200, "{reply}");
    let (event, _, data) = sse.next_event().await;
    assert_eq!(event, "message");
    assert_eq!(data["data"], json!({"title": "two\nlines", "list": [1, 2]}));
}

#[tokio::test]
async fn small_holes_are_closed() {
    let t = start(|c| c.max_topics_per_connection = 4).await;
    // A topic named a hundred times at connect is one subscription.
    let topics = vec!["t"; 100].join(",");
    let (_ws, _) = ws(t.client, &format!("uid=dup&topics={topics}")).await;
    let session = get_json(t.admin, "/debug/sessions/dup").await;
    assert_eq!(session["connections"][0]["topics"], json!(["t"]));
    // Percent-escapes that are not UTF-8 are refused, not turned into U+FFFD.
    let (status, _) = RawWs::try_handshake(t.client, "GET /ws?uid=%ff HTTP/1.1\r\nHost: x\r\n").await;
    assert_eq!(status, 400);
    // Data nested past the limit is refused.
    let deep = format!("{}{}", "[".repeat(32_000), "]".repeat(32_000));
    let (status, _, reply) = post_raw(t.client, "/v1/broadcast", format!(r#"{{"data":{deep}}}"#), None).await;
    assert_eq!(status, 400, "{reply}");
    // So is data a strict decoder would refuse, which the node would otherwise pass on
    // (found by an attack: a Go or serde client lost the whole frame).
    for (data, why) in [("[1e400]", "number"), (r#""x\ud800""#, "surrogate")] {
        let (status, _, reply) = post_raw(t.client, "/v1/push", format!(r#"{{"uids":["dup"],"data":{data}}}"#), None).await;
        assert_eq!(status, 400, "{data}: {reply}");
        assert!(reply["error"].as_str().is_some_and(|e| e.contains(why)), "{data}: {reply}");
    }
}

/// A client that writes the whole of an over-large body before it reads (Python's
/// `http.client` does) still reads its 413: the node reads and drops the rest of the body
/// before it closes (found by an attack: past 1 MiB the client got a broken pipe).
#[tokio::test]
async fn a_body_over_the_limit_written_whole_before_reading_gets_its_413() {
    let t = start(|_| {}).await;
    let body = vec![b'x'; 24 << 20];
    let mut stream = TcpStream::connect(t.client).await.unwrap();
    let head = format!("POST /v1/broadcast HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", body.len());
    stream.write_all(head.as_bytes()).await.unwrap();
    let written = stream.write_all(&body).await;
    assert!(written.is_ok(), "the node stopped reading the body it refused: {written:?}");
    let mut answer = String::new();
    tokio::time::timeout(WAIT, stream.read_to_string(&mut answer)).await.expect("answered in time").expect("read");
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("request body over"), "{answer}");
}

#[tokio::test]
async fn a_publish_while_draining_is_answered_503() {
    // The unfinished body below, and the idle kept-alive connection, must outlast the test
    // however slow the machine (they are dropped after the handshake timeout).
    let server = Process::spawn(&["--shutdown-grace", "60s", "--handshake-timeout", "60s"], None);
    let http = reqwest::Client::new();
    let publish = |data: u32| http.post(format!("http://{}/v1/broadcast", server.client)).body(json!({"data": data}).to_string()).send();
    assert_eq!(publish(1).await.unwrap().status(), 200, "a kept-alive connection to publish on");
    // A publish whose body never finishes keeps the node draining.
    let mut slow = TcpStream::connect(server.client).await.unwrap();
    slow.write_all(b"POST /v1/broadcast HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"data\":").await.unwrap();
    // Its body is being read (each connection is served on its own, so a later request
    // can be answered first): the drain has a publish to wait for.
    wait_metric(server.admin, "pushline_publish_bytes_reading", |v| v > 0.0).await;
    assert_eq!(publish(2).await.unwrap().status(), 200);
    server.signal(libc::SIGTERM);
    server.wait_log("phase=\"draining\"");
    let refused = publish(3).await.unwrap();
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "1");
    server.signal(libc::SIGKILL);
}

/// A JSON ping of `len` bytes (padded with spaces), as a masked client text frame.
fn padded_ping(len: usize) -> Vec<u8> {
    let mut ping = br#"{"type":"ping""#.to_vec();
    ping.resize(len - 1, b' ');
    ping.push(b'}');
    pushline::wire::ws::client_frame(pushline::wire::ws::OP_TEXT, true, &ping, [1, 2, 3, 4])
}

/// 100 commands in one write, past `--max-commands-per-second` (20): the server closes
/// with 1008, and the client reads the close frame, not a reset, although the server
/// never read most of what it sent.
#[tokio::test]
async fn a_client_over_its_limit_reads_the_close_frame_not_a_reset() {
    let t = start(|_| {}).await;
    let mut raw = RawWs::open(t.client, "uid=flood").await;
    raw.send(&padded_ping(1000).repeat(100)).await;
    assert_eq!(raw.expect_close().await, Some(1008));
}

/// A closing connection reads and discards what the client sends only within a bound:
/// one that keeps sending is closed all the same.
#[tokio::test]
async fn a_client_that_keeps_sending_to_a_closing_connection_is_cut_off_in_bounded_time() {
    let t = start(|_| {}).await;
    let raw = RawWs::open(t.client, "uid=hose").await;
    let (mut read, mut write) = raw.stream.into_split();
    let started = Instant::now();
    let hose = tokio::spawn(async move {
        let junk = padded_ping(1000).repeat(64);
        // Bounded: at most 30 s of writing; ends when the server is gone.
        while started.elapsed() < Duration::from_secs(30) {
            if write.write_all(&junk).await.is_err() {
                return started.elapsed();
            }
        }
        panic!("the server still took bytes after 30 s");
    });
    let mut chunk = vec![0u8; 65536];
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout(WAIT, read.read(&mut chunk)).await.expect("the server closes in time") {
            Ok(0) | Err(_) => break,
            Ok(n) => seen.extend_from_slice(&chunk[..n]),
        }
    }
    let closed_after = started.elapsed();
    // The close frame (0x88, then the code 1008) came before the end.
    let close_at = seen.windows(4).position(|w| w[0] == 0x88 && u16::from_be_bytes([w[2], w[3]]) == 1008);
    assert!(close_at.is_some(), "a 1008 close frame before the socket closed");
    // Flushing the close frame (at most 2 s) and lingering (at most 2 s), with room for a loaded machine.
    assert!(closed_after < Duration::from_secs(8), "the closing connection lived {closed_after:?}");
    let stopped = hose.await.unwrap();
    assert!(stopped < Duration::from_secs(10), "writes failed only after {stopped:?}");
}

/// A publish API connection that once sent a large body keeps no large buffer while it
/// idles: those bytes were budgeted only while they were read.
#[tokio::test]
async fn a_large_body_leaves_no_large_buffer_behind() {
    let server = Process::spawn(&[], None);
    let http_live = |memory: &serde_json::Value| {
        memory["sites"].as_array().unwrap().iter().find(|s| s["site"] == "http").unwrap()["live_bytes"].as_i64().unwrap()
    };
    let before = http_live(&get_json(server.admin, "/debug/memory").await);
    let mut stream = TcpStream::connect(server.client).await.unwrap();
    let item = format!(r#"{{"broadcast":{{"data":"{}"}}}}"#, "x".repeat(60_000));
    let body = vec![item.as_str(); 64].join("\n");
    let head = format!("POST /v1/batch HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson\r\nContent-Length: {}\r\n\r\n", body.len());
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body.as_bytes()).await.unwrap();
    let answered = responses(&mut stream, 1).await;
    let (status, _, body) = answered.first().expect("an answer");
    assert_eq!(*status, 200, "{body}");
    let kept = http_live(&get_json(server.admin, "/debug/memory").await) - before;
    assert!(kept < 256 * 1024, "an idle connection after a {} byte body keeps {kept} bytes", body.len());
    drop(stream);
}

/// A body without a Content-Length (chunked) is charged against the node's body budget as
/// it arrives, not as the largest its endpoint takes: four silent chunked batches do not
/// hold a budget every other publisher needs.
#[tokio::test]
async fn a_chunked_body_is_charged_what_it_sent() {
    let server = Process::spawn(&["--max-publish-bytes-in-flight", "4194304"], None);
    let mut silent = Vec::new();
    for _ in 0..4 {
        let mut stream = TcpStream::connect(server.client).await.unwrap();
        stream.write_all(b"POST /v1/batch HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n").await.unwrap();
        silent.push(stream);
    }
    wait_metric(server.admin, "pushline_publish_bytes_reading", |v| v >= 4.0 * 1024.0).await;
    let text = metrics(server.admin).await;
    assert_eq!(metric(&text, "pushline_publish_bytes_reading"), 4.0 * 1024.0, "a KiB each, until their bodies come");
    let (status, _, reply) = post_raw(server.client, "/v1/broadcast", json!({"data": 1}).to_string(), None).await;
    assert_eq!(status, 200, "{reply}");
    drop(silent);
    // And a chunked body is held to the budget by what it sends.
    let small = Process::spawn(&["--max-publish-bytes-in-flight", "65536"], None);
    let mut stream = TcpStream::connect(small.client).await.unwrap();
    let body = format!(r#"{{"data":"{}"}}"#, "x".repeat(70_000));
    let request = format!("POST /v1/broadcast HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n", body.len());
    stream.write_all(request.as_bytes()).await.unwrap();
    let answered = responses(&mut stream, 1).await;
    let (status, _, body) = answered.first().expect("an answer");
    assert_eq!(*status, 503, "{body}");
    assert!(body.contains("--max-publish-bytes-in-flight"), "{body}");
}
