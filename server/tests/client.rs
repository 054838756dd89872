//! What a client sees: welcome, pushes, topics, broadcast, SSE, pings, idle timeout.

mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn welcome_names_session_and_uid() {
    let t = start(|_| {}).await;
    let (_a, welcome) = ws(t.client, "uid=alice").await;
    let (_b, other) = ws(t.client, "uid=alice").await;
    assert_eq!(welcome["uid"], "alice");
    let session: u64 = welcome["session"].as_str().unwrap().parse().unwrap();
    let other: u64 = other["session"].as_str().unwrap().parse().unwrap();
    assert_ne!(session, other);
    assert_eq!(session >> 48, 0, "node id 0 is in the top bits");
}

#[tokio::test]
async fn push_reaches_every_connection_of_a_uid_with_increasing_ids() {
    let t = start(|_| {}).await;
    let (mut a1, _) = ws(t.client, "uid=alice").await;
    let (mut a2, _) = ws(t.client, "uid=alice").await;
    let (mut b, _) = ws(t.client, "uid=bob").await;

    let (status, reply) = post(t.client, "/v1/push", json!({"uids": ["alice", "nobody"], "data": {"n": 1}})).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["online"], 2);
    assert_eq!(reply["delivered"], 2);
    let (_, second) = post(t.client, "/v1/push", json!({"uids": ["alice", "bob"], "data": "two"})).await;
    assert_eq!(second["online"], 3);

    for ws in [&mut a1, &mut a2] {
        let first = next_json(ws).await;
        let stream = first["stream"].as_str().unwrap().to_owned();
        assert!(stream.starts_with("u."), "a push belongs to the uid's stream: {first}");
        let epoch = first["epoch"].clone();
        assert_eq!(
            first,
            json!({"type": "message", "id": reply["id"], "topic": null, "data": {"n": 1}, "stream": stream, "epoch": epoch, "offset": 1})
        );
        let next = next_json(ws).await;
        assert_eq!((&next["data"], &next["offset"]), (&json!("two"), &json!(2)));
        let (id1, id2): (u64, u64) = (first["id"].as_str().unwrap().parse().unwrap(), next["id"].as_str().unwrap().parse().unwrap());
        assert!(id2 > id1);
    }
    assert_eq!(next_json(&mut b).await["data"], "two", "bob got only the second push");
}

#[tokio::test]
async fn topics_subscribe_and_unsubscribe() {
    let t = start(|_| {}).await;
    let (mut at_connect, _) = ws(t.client, "uid=a&topics=news,sport").await;
    let (mut later, _) = ws(t.client, "uid=b").await;
    subscribe(&mut later, &["news"]).await;

    let (status, reply) = post(t.client, "/v1/publish", json!({"topic": "news", "data": [1, 2]})).await;
    assert_eq!(status, 200);
    assert_eq!(reply["delivered"], 2);
    for ws in [&mut at_connect, &mut later] {
        let msg = next_json(ws).await;
        assert_eq!(msg["topic"], "news");
        assert_eq!(msg["data"], json!([1, 2]));
    }

    send_json(&mut later, json!({"type": "unsubscribe", "topics": ["news"]})).await;
    assert_eq!(next_json(&mut later).await["type"], "unsubscribed");
    let (_, reply) = post(t.client, "/v1/publish", json!({"topic": "news", "data": 3})).await;
    assert_eq!(reply["delivered"], 1);
    assert_eq!(next_json(&mut at_connect).await["data"], 3);
    let (_, reply) = post(t.client, "/v1/publish", json!({"topic": "sport", "data": 4})).await;
    assert_eq!(reply["delivered"], 1);

    // `later` gets nothing more: the next frame it sees is the pong to its own ping.
    send_json(&mut later, json!({"type": "ping"})).await;
    assert_eq!(next_json(&mut later).await, json!({"type": "pong"}));
}

#[tokio::test]
async fn broadcast_reaches_websocket_and_sse_alike() {
    let t = start(|c| c.fanout_batch = 2).await;
    let mut sockets = Vec::new();
    for i in 0..5 {
        sockets.push(ws(t.client, &format!("uid=u{i}")).await.0);
    }
    let (status, mut sse) = Sse::open(t.client, "uid=s1").await;
    assert_eq!(status, 200);
    let (event, _, welcome) = sse.next_event().await;
    assert_eq!(event, "welcome");
    assert_eq!(welcome["uid"], "s1");

    let (_, reply) = post(t.client, "/v1/broadcast", json!({"data": {"hello": "all"}})).await;
    assert_eq!(reply["delivered"], 6);
    for ws in &mut sockets {
        let msg = next_json(ws).await;
        assert_eq!(msg["id"], reply["id"]);
        assert_eq!(msg["data"]["hello"], "all");
    }
    let (event, id, data) = sse.next_event().await;
    assert_eq!(event, "message");
    assert_eq!(data["id"], reply["id"]);
    let position = format!(",b:{}:1", data["epoch"].as_str().unwrap());
    assert!(id.unwrap().ends_with(&position), "the event's id is the connection's cursor, with the broadcast stream's position");
    assert_eq!(data["data"]["hello"], "all");
    assert_eq!(data["type"], "message");
}

#[tokio::test]
async fn sse_gets_pushes_and_topics() {
    let t = start(|_| {}).await;
    let (_, mut sse) = Sse::open(t.client, "uid=carol&topics=weather").await;
    sse.next_event().await;
    post(t.client, "/v1/push", json!({"uids": ["carol"], "data": 1})).await;
    post(t.client, "/v1/publish", json!({"topic": "weather", "data": 2})).await;
    let (_, first, one) = sse.next_event().await;
    let (_, second, two) = sse.next_event().await;
    assert_eq!((one["data"].clone(), two["data"].clone()), (json!(1), json!(2)));
    assert_eq!(two["topic"], "weather");
    assert!(two["id"].as_str().unwrap().parse::<u64>().unwrap() > one["id"].as_str().unwrap().parse::<u64>().unwrap());
    // Each event's id is the cursor so far: first the uid's stream, then the topic's too.
    let (first, second) = (first.unwrap(), second.unwrap());
    assert_eq!(first.matches(',').count(), 1, "{first}");
    assert!(second.starts_with(&first) && second.contains(",t."), "{first} then {second}");
}

#[tokio::test]
async fn json_ping_and_websocket_ping_are_answered() {
    let t = start(|_| {}).await;
    let (mut ws, _) = ws(t.client, "uid=p").await;
    send_json(&mut ws, json!({"type": "ping"})).await;
    assert_eq!(next_json(&mut ws).await, json!({"type": "pong"}));
    ws.send(Message::Ping(b"abc".to_vec().into())).await.unwrap();
    let pong = tokio::time::timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(pong, Message::Pong(b"abc".to_vec().into()));
}

#[tokio::test]
async fn server_pings_when_configured() {
    let t = start(|c| c.ping_interval = std::time::Duration::from_millis(100)).await;
    let (mut ws, _) = ws(t.client, "uid=p").await;
    let frame = tokio::time::timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap();
    assert!(matches!(frame, Message::Ping(_)), "{frame:?}");
}

#[tokio::test]
async fn silent_client_is_closed_after_idle_timeout() {
    let t = start(|c| c.idle_timeout = std::time::Duration::from_millis(300)).await;
    let (mut talker, _) = ws(t.client, "uid=talker").await;
    let (mut silent, _) = ws(t.client, "uid=silent").await;
    let close = tokio::time::timeout(WAIT, async {
        loop {
            // The talker keeps sending while the silent one waits for its close frame.
            tokio::select! {
                frame = silent.next() => return frame,
                _ = tokio::time::sleep(std::time::Duration::from_millis(50)) => {
                    send_json(&mut talker, json!({"type": "ping"})).await;
                    assert_eq!(next_json(&mut talker).await["type"], "pong");
                }
            }
        }
    })
    .await
    .expect("closed within the wait");
    match close {
        Some(Ok(Message::Close(Some(frame)))) => {
            assert_eq!(frame.code, CloseCode::Normal);
            assert_eq!(frame.reason.as_str(), "idle timeout");
        }
        other => panic!("expected a close frame, got {other:?}"),
    }
    wait_metric(t.admin, r#"pushline_connections_closed_total{transport="ws",reason="idle_timeout"}"#, |v| v == 1.0).await;
    send_json(&mut talker, json!({"type": "ping"})).await;
    assert_eq!(next_json(&mut talker).await["type"], "pong", "the talker is still connected");
}

/// A Pusher client that never answers is pinged once per `activity_timeout` of silence,
/// then closed as the protocol closes it (4201) at `--idle-timeout`. (It was pinged at
/// every sweep: four times a second here.)
#[tokio::test]
async fn a_silent_pusher_client_is_pinged_once_per_activity_timeout_then_closed() {
    let t = start(|c| {
        c.idle_timeout = std::time::Duration::from_secs(4);
        c.pusher_app = vec!["7:key7:secret-of-app-seven".into()];
    })
    .await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/app/key7?protocol=7", t.client)).await.expect("pusher connects");
    let established = next_json(&mut ws).await;
    assert_eq!(established["data"].as_str().map(|d| d.contains(r#""activity_timeout":2"#)), Some(true), "{established}");
    let mut pings = 0;
    let close = loop {
        match tokio::time::timeout(WAIT, ws.next()).await.expect("closed within the wait") {
            Some(Ok(Message::Text(text))) => {
                assert!(text.contains("pusher:ping"), "{text}");
                pings += 1;
            }
            Some(Ok(Message::Close(frame))) => break frame,
            other => panic!("expected a pusher:ping or the close, got {other:?}"),
        }
    };
    assert_eq!(close.map(|f| u16::from(f.code)), Some(4201));
    assert_eq!(pings, 1, "pinged once in the 2 s between its activity timeout and its idle timeout");
}

#[tokio::test]
async fn bad_client_frames_get_an_error_and_keep_the_connection() {
    let t = start(|_| {}).await;
    let (mut ws, _) = ws(t.client, "uid=x").await;
    ws.send(Message::Text("{not json".into())).await.unwrap();
    let error = next_json(&mut ws).await;
    assert_eq!(error["type"], "error");
    assert!(error["error"].as_str().unwrap().starts_with("bad JSON"), "{error}");
    send_json(&mut ws, json!({"type": "dance"})).await;
    assert!(next_json(&mut ws).await["error"].as_str().unwrap().contains("unknown type `dance`"));
    ws.send(Message::Binary(vec![1, 2, 3].into())).await.unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "error");
    send_json(&mut ws, json!({"type": "ping"})).await;
    assert_eq!(next_json(&mut ws).await["type"], "pong");
    let text = metrics(t.admin).await;
    assert_eq!(metric(&text, r#"pushline_client_errors_total{reason="bad_json"}"#), 1.0);
    assert_eq!(metric(&text, r#"pushline_client_errors_total{reason="unknown_type"}"#), 1.0);
    assert_eq!(metric(&text, r#"pushline_client_errors_total{reason="binary_frame"}"#), 1.0);
}

#[tokio::test]
async fn oversized_client_frame_closes_with_1009() {
    let t = start(|c| c.max_client_frame_bytes = 1024).await;
    let (mut ws, _) = ws(t.client, "uid=x").await;
    ws.send(Message::Text("x".repeat(5000).into())).await.unwrap();
    match tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), 1009),
        other => panic!("expected close 1009, got {other:?}"),
    }
    wait_metric(t.admin, r#"pushline_connections_closed_total{transport="ws",reason="protocol_error"}"#, |v| v == 1.0).await;
}

#[tokio::test]
async fn client_close_is_echoed_and_unregisters() {
    let t = start(|_| {}).await;
    let (mut ws, _) = ws(t.client, "uid=leaver&topics=t").await;
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
    wait_metric(t.admin, r#"pushline_connections{transport="ws"}"#, |v| v == 0.0).await;
    let (_, reply) = post(t.client, "/v1/push", json!({"uids": ["leaver"], "data": 1})).await;
    assert_eq!(reply["online"], 0);
    let (_, reply) = post(t.client, "/v1/publish", json!({"topic": "t", "data": 1})).await;
    assert_eq!(reply["delivered"], 0);
}

/// Writes `bytes` and then ends the stream (FIN) in one TCP segment: corked, the bytes wait
/// for the FIN to go out with them, so the server reads both at once.
async fn send_then_end(stream: &mut tokio::net::TcpStream, bytes: &[u8]) {
    use std::os::fd::AsRawFd;
    use tokio::io::AsyncWriteExt;
    let on: libc::c_int = 1;
    // SAFETY: TCP_CORK takes an int, read from `on` for `size_of::<c_int>()` bytes.
    let corked = unsafe { libc::setsockopt(stream.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_CORK, (&on as *const libc::c_int).cast(), std::mem::size_of::<libc::c_int>() as libc::socklen_t) };
    assert_eq!(corked, 0, "TCP_CORK: {}", std::io::Error::last_os_error());
    stream.write_all(bytes).await.unwrap();
    stream.shutdown().await.unwrap();
}

/// Bytes and the end of the stream read at once: the connection still closes, as the
/// client's, whatever the bytes were (a pong, half a frame, a ping), on WebSocket and SSE.
/// (Served from an edge-triggered epoll set, the end of file behind the bytes raises no
/// edge of its own.)
#[tokio::test]
async fn bytes_then_the_end_of_the_stream_close_the_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t = start(|_| {}).await;
    let frames: [&[u8]; 3] = [&[0x8A, 0x80, 1, 2, 3, 4], &[0x81, 0x85, 1, 2], &[0x89, 0x80, 1, 2, 3, 4]];
    let mut held = Vec::new();
    for (i, bytes) in frames.iter().enumerate() {
        let mut raw = RawWs::open(t.client, &format!("uid=eof{i}")).await;
        send_then_end(&mut raw.stream, bytes).await;
        held.push(raw);
    }
    let mut sse = tokio::net::TcpStream::connect(t.client).await.unwrap();
    sse.write_all(b"GET /sse?uid=eofsse HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("event: welcome") {
        let mut chunk = [0u8; 1024];
        let n = tokio::time::timeout(WAIT, sse.read(&mut chunk)).await.expect("welcome in time").unwrap();
        assert!(n > 0, "closed before its welcome");
        seen.extend_from_slice(&chunk[..n]);
    }
    send_then_end(&mut sse, b"anything").await;
    wait_metric(t.admin, r#"pushline_connections_closed_total{transport="ws",reason="client"}"#, |v| v == 3.0).await;
    wait_metric(t.admin, r#"pushline_connections_closed_total{transport="sse",reason="client"}"#, |v| v == 1.0).await;
    wait_metric(t.admin, r#"pushline_connections{transport="ws"}"#, |v| v == 0.0).await;
    drop((held, sse));
}

/// Reads until a frame of `kind`; returns it and what came before it.
async fn until_type(ws: &mut Ws, kind: &str) -> (serde_json::Value, Vec<serde_json::Value>) {
    let mut before = Vec::new();
    loop {
        let msg = next_json(ws).await;
        if msg["type"] == kind {
            return (msg, before);
        }
        before.push(msg);
    }
}

/// Client publishes in open mode, to topics `--client-publish-topics` lists: every
/// subscriber gets it, the sender only its `published` answer (with its `ref`) unless it
/// asks for an echo; it is kept in the topic's history; a topic outside the list, data over
/// the size limit and publishes over the rate are refused, counted and never delivered.
#[tokio::test]
async fn a_client_publishes_to_the_topics_it_may_and_is_not_sent_its_own_message() {
    let t = start(|c| {
        c.client_publish_topics = vec!["chat.*".into()];
        c.max_client_publishes_per_second = 3;
        c.max_commands_per_second = 100;
        c.max_message_bytes = 64;
    })
    .await;
    let (mut alice, _) = ws(t.client, "uid=alice&topics=chat.room").await;
    let (mut bob, welcome) = ws(t.client, "uid=bob&topics=chat.room,other").await;
    let since = welcome["since"].as_str().unwrap().to_owned();

    send_json(&mut alice, json!({"type": "publish", "topic": "chat.room", "data": {"text": "hi"}, "ref": "m1"})).await;
    let got = next_json(&mut bob).await;
    assert_eq!((got["type"].as_str(), got["topic"].as_str(), &got["data"]), (Some("message"), Some("chat.room"), &json!({"text": "hi"})), "{got}");
    let answer = next_json(&mut alice).await;
    assert_eq!((answer["type"].as_str(), answer["ref"].as_str(), answer["topic"].as_str()), (Some("published"), Some("m1"), Some("chat.room")), "{answer}");
    assert_eq!(answer["id"], got["id"], "the answer names the message");

    // The sender's next frame is the next message on the topic, not its own.
    let (status, _) = post(t.client, "/v1/publish", json!({"topic": "chat.room", "data": "from the api"})).await;
    assert_eq!(status, 200);
    assert_eq!(next_json(&mut alice).await["data"], "from the api");
    assert_eq!(next_json(&mut bob).await["data"], "from the api");

    send_json(&mut alice, json!({"type": "publish", "topic": "chat.room", "data": 2, "echo": true})).await;
    let (own, _) = until_type(&mut alice, "message").await;
    assert_eq!(own["data"], 2, "asked for, the sender gets its own message");
    assert_eq!(next_json(&mut bob).await["data"], 2);

    for (topic, data) in [("other", json!("no right")), ("chat.room", json!("x".repeat(100)))] {
        send_json(&mut alice, json!({"type": "publish", "topic": topic, "data": data})).await;
        let (refused, _) = until_type(&mut alice, "publish_failed").await;
        assert!(refused["error"].as_str().unwrap().contains(if topic == "other" { "not allowed to publish" } else { "the limit is 64" }), "{refused}");
    }
    let mut answers = Vec::new();
    for n in 0..20 {
        send_json(&mut alice, json!({"type": "publish", "topic": "chat.room", "data": n, "ref": n.to_string()})).await;
    }
    while answers.len() < 20 {
        let msg = next_json(&mut alice).await;
        if msg["type"] == "published" || msg["type"] == "publish_failed" {
            answers.push(msg);
        }
    }
    let published = answers.iter().filter(|a| a["type"] == "published").count();
    let mut refs: Vec<u64> = answers.iter().map(|a| a["ref"].as_str().unwrap().parse().unwrap()).collect();
    refs.sort();
    assert_eq!(refs, (0..20).collect::<Vec<_>>(), "one answer per publish, with its ref");
    // 3 per clock second, the two above included: at least one of the burst goes, and a
    // burst that crosses into the next second gets that second's 3 too.
    assert!((1..=6).contains(&published), "3 per second: {answers:?}");
    let text = metrics(t.admin).await;
    assert_eq!(metric(&text, r#"pushline_client_errors_total{reason="publish_rate"}"#), (20 - published) as f64);
    assert_eq!(metric(&text, r#"pushline_client_errors_total{reason="forbidden"}"#), 1.0);
    assert_eq!(metric(&text, r#"pushline_client_errors_total{reason="too_large"}"#), 1.0);

    // Bob gets exactly what was published: nothing refused reached him.
    let mut got = Vec::new();
    while got.len() < published {
        got.push(next_json(&mut bob).await["data"].clone());
    }
    let accepted: Vec<_> = answers.iter().filter(|a| a["type"] == "published").map(|a| json!(a["ref"].as_str().unwrap().parse::<u64>().unwrap())).collect();
    assert_eq!(got, accepted);

    // Kept in history: a client resuming from before reads them all, its own included.
    let (mut again, _) = ws(t.client, &format!("uid=bob&topics=chat.room&cursor=s{since}")).await;
    let (resumed, replayed) = until_type(&mut again, "resumed").await;
    assert_eq!(resumed["recovered"], true, "{resumed}");
    let data: Vec<_> = replayed.iter().map(|m| m["data"].clone()).collect();
    assert_eq!(data.len(), 3 + published, "{data:?}");
    assert_eq!(data[0], json!({"text": "hi"}));
}

/// Open mode without `--client-publish-topics`: no client may publish.
#[tokio::test]
async fn open_mode_lets_no_client_publish_unless_told_which_topics() {
    let t = start(|_| {}).await;
    let (mut alice, _) = ws(t.client, "uid=alice&topics=room").await;
    send_json(&mut alice, json!({"type": "publish", "topic": "room", "data": 1})).await;
    let refused = next_json(&mut alice).await;
    assert_eq!((refused["type"].as_str(), refused["topic"].as_str()), (Some("publish_failed"), Some("room")), "{refused}");
    assert!(refused["error"].as_str().unwrap().contains("not allowed to publish to topic `room`"), "{refused}");
    for bad in [json!({"type": "publish", "topic": "room"}), json!({"type": "publish", "data": 1})] {
        send_json(&mut alice, bad).await;
        assert!(next_json(&mut alice).await["error"].as_str().unwrap().contains("needs a `topic` and `data`"));
    }
}

/// `?info=` as a query value.
fn info_query(info: &serde_json::Value) -> String {
    info.to_string().bytes().map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02X}") }).collect()
}

async fn presence_server(max_members: usize) -> TestServer {
    start(|c| {
        c.presence_topics = vec!["room.*".into()];
        c.presence_batch = std::time::Duration::from_millis(30);
        c.presence_events_max_members = max_members;
    })
    .await
}

/// A uid is one member however many connections it has: it joins with its first and
/// leaves with its last, and subscribers are told each once, with its info.
#[tokio::test]
async fn presence_tells_subscribers_when_a_uid_joins_and_leaves_once() {
    let t = presence_server(1000).await;
    let (mut watcher, _) = ws(t.client, "uid=carol&topics=room.1").await;
    let (joined, _) = until_type(&mut watcher, "join").await;
    assert_eq!(joined["uid"], "carol", "{joined}");
    let info = json!({"name": "Alice", "color": "red"});
    let (alice_1, _) = ws(t.client, &format!("uid=alice&topics=room.1&info={}", info_query(&info))).await;
    let joined = next_json(&mut watcher).await;
    assert_eq!(joined, json!({"type": "join", "topic": "room.1", "uid": "alice", "info": info}));
    let (mut alice_2, _) = ws(t.client, "uid=alice").await;
    subscribe(&mut alice_2, &["room.1"]).await;
    let (_bob, _) = ws(t.client, "uid=bob&topics=room.1").await;
    assert_eq!(next_json(&mut watcher).await["uid"], "bob", "alice's second connection is not a second join");
    drop(alice_1);
    // Closed once the counts hold one connection less; then a join shows no leave came first.
    let deadline = std::time::Instant::now() + WAIT;
    while get_json(t.client, "/v1/presence/stats?topic=room.1").await != json!({"topic": "room.1", "members": 3, "connections": 3}) {
        assert!(std::time::Instant::now() < deadline, "alice's first connection never left");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let (_dave, _) = ws(t.client, "uid=dave&topics=room.1").await;
    assert_eq!(next_json(&mut watcher).await["uid"], "dave", "alice's first connection closing is not a leave");
    alice_2.send(Message::text(json!({"type": "unsubscribe", "topics": ["room.1"]}).to_string())).await.unwrap();
    let left = next_json(&mut watcher).await;
    assert_eq!(left, json!({"type": "leave", "topic": "room.1", "uid": "alice"}), "alice left with her last connection");
    let text = metrics(t.admin).await;
    assert_eq!(metric(&text, "pushline_presence_members"), 3.0);
    assert_eq!(metric(&text, r#"pushline_presence_events_total{kind="leave"}"#), 1.0);
}

/// Members page by page from a cursor, each once; the counts are exact; changes that meet
/// in one batch go out as one frame, and only the counts above the members limit.
#[tokio::test]
async fn presence_pages_every_member_once_and_coalesces_what_changes_together() {
    let t = presence_server(100).await;
    let (mut watcher, _) = ws(t.client, "uid=watcher&topics=room.big").await;
    until_type(&mut watcher, "join").await;
    let mut members = Vec::new();
    for i in 0..150 {
        members.push(ws(t.client, &format!("uid=m{i:03}&topics=room.big")).await.0);
    }
    let stats = loop {
        let stats = get_json(t.client, "/v1/presence/stats?topic=room.big").await;
        if stats["members"] == 151 {
            break stats;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    assert_eq!(stats["connections"], 151);
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    // Presence frames that come while paging.
    let mut events = Vec::new();
    loop {
        let query = match &cursor {
            Some(c) => json!({"type": "presence", "topic": "room.big", "limit": 40, "cursor": c}),
            None => json!({"type": "presence", "topic": "room.big", "limit": 40}),
        };
        send_json(&mut watcher, query).await;
        let (page, before) = until_type(&mut watcher, "presence").await;
        events.extend(before);
        assert_eq!(page["count"], 151);
        seen.extend(page["members"].as_array().unwrap().iter().map(|m| m["uid"].as_str().unwrap().to_owned()));
        match page["cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!((seen.len(), sorted.len()), (151, 151), "each member once");
    let (status, page) = get_raw(t.client, "/v1/presence?topic=room.big&limit=1000").await;
    assert_eq!((status, page["members"].as_array().map(Vec::len)), (200, Some(151)));

    // 150 joins in a few frames, not 150: lists while the topic is small, counts only
    // once it is over 100 members.
    events.reverse();
    let (mut frames, mut joined, mut counted) = (0, 0, 0);
    while joined < 150 {
        let event = match events.pop() {
            Some(event) => event,
            None => next_json(&mut watcher).await,
        };
        joined += match event["type"].as_str() {
            Some("presence_count") => {
                counted += 1;
                event["joined"].as_u64().unwrap()
            }
            Some("presence_diff") => {
                assert!(event["members"].as_u64().unwrap() <= 100, "{event}");
                event["joined"].as_array().unwrap().len() as u64
            }
            Some("join") => 1,
            _ => panic!("{event}"),
        };
        frames += 1;
    }
    assert!(frames < 150 && counted > 0, "{frames} frames for 150 joins, {counted} of them counts");
    drop(members);
    let mut left = 0;
    while left < 150 {
        let event = next_json(&mut watcher).await;
        left += match event["type"].as_str() {
            Some("presence_count") => event["left"].as_u64().unwrap(),
            Some("presence_diff") => event["left"].as_array().unwrap().len() as u64,
            Some("leave") => 1,
            _ => panic!("{event}"),
        };
    }
    assert_eq!(get_json(t.client, "/v1/presence/stats?topic=room.big").await["members"], 1);
}

/// Info must be a JSON object within --presence-info-bytes; a topic outside
/// --presence-topics has no presence.
#[tokio::test]
async fn presence_refuses_bad_info_and_topics_without_presence() {
    let t = presence_server(1000).await;
    let deep = format!("{{\"a\":{}1{}}}", "[".repeat(130), "]".repeat(130));
    let refused = [
        ("[1]".to_owned(), "must be a JSON object"),
        (info_query(&json!({"x": "y".repeat(600)})), "at most 512"),
        ("{".into(), "not JSON"),
        // Each parses as raw JSON, but not as JSON a reader takes whole: refused at the door.
        ("%7B%22a%22%3A%22%5Cud800%22%7D".into(), "not JSON every reader can take"),
        ("%7B%22a%22%3A1e999%7D".into(), "not JSON every reader can take"),
        (deep.bytes().map(|b| format!("%{b:02X}")).collect(), "not JSON every reader can take"),
    ];
    for (info, why) in refused {
        match tokio_tungstenite::connect_async(format!("ws://{}/ws?uid=a&info={info}", t.client)).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                let body = String::from_utf8(response.body().clone().unwrap_or_default()).unwrap();
                assert_eq!(response.status(), 400, "{body}");
                assert!(body.contains(why), "{body}");
            }
            other => panic!("{info}: expected a refusal, got {:?}", other.map(|_| ())),
        }
    }
    let (mut client, _) = ws(t.client, "uid=a&topics=news").await;
    send_json(&mut client, json!({"type": "presence", "topic": "news"})).await;
    assert!(next_json(&mut client).await["error"].as_str().unwrap().contains("not a presence topic"));
    let (status, body) = get_raw(t.client, "/v1/presence/stats?topic=news").await;
    assert_eq!(status, 404, "{body}");
}

/// More publishes than a client may have handled at once (8), sent back to back and
/// followed by nothing: every one is published and answered, without a further frame to
/// wake the connection.
#[tokio::test]
async fn publishes_past_the_in_flight_bound_are_answered_without_more_input() {
    let t = start(|c| {
        c.client_publish_topics = vec!["chat".into()];
        c.max_client_publishes_per_second = 100;
    })
    .await;
    let (mut listener, _) = ws(t.client, "uid=listener&topics=chat").await;
    let (mut sender, _) = ws(t.client, "uid=sender").await;
    let frames: Vec<Message> = (0..20).map(|n| Message::text(json!({"type": "publish", "topic": "chat", "data": n, "ref": n.to_string()}).to_string())).collect();
    sender.send_all(&mut futures_util::stream::iter(frames.into_iter().map(Ok))).await.unwrap();
    let mut answered = Vec::new();
    while answered.len() < 20 {
        let answer = next_json(&mut sender).await;
        assert_eq!(answer["type"], "published", "{answer}");
        answered.push(answer["ref"].as_str().unwrap().parse::<u64>().unwrap());
    }
    answered.sort();
    assert_eq!(answered, (0..20).collect::<Vec<_>>());
    for _ in 0..20 {
        assert_eq!(next_json(&mut listener).await["type"], "message");
    }
}

/// A client that reads nothing while others fill its queue still gets one answer per
/// publish when it reads again: answers are never what drop-oldest drops.
#[tokio::test]
async fn every_publish_is_answered_even_when_the_clients_queue_is_full() {
    let t = start(|c| {
        c.client_publish_topics = vec!["busy".into()];
        c.queue_max_messages = 4;
    })
    .await;
    let (mut quiet, _) = ws(t.client, "uid=quiet&topics=busy").await;
    let noise = json!({"topic": "busy", "data": "x".repeat(60_000)});
    // More than the socket buffers hold: the rest waits in its queue of 4, dropping the oldest.
    for _ in 0..300 {
        assert_eq!(post(t.client, "/v1/publish", noise.clone()).await.0, 200);
    }
    for n in 0..6 {
        send_json(&mut quiet, json!({"type": "publish", "topic": "busy", "data": n, "ref": n.to_string()})).await;
    }
    // Published once counted (without echo, the client gets none of them back), and
    // answered into the full queue.
    wait_metric(t.admin, r#"pushline_messages_published_total{kind="topic"}"#, |n| n >= 306.0).await;
    for _ in 0..20 {
        post(t.client, "/v1/publish", noise.clone()).await;
    }
    let mut refs = Vec::new();
    let mut dropped_told = false;
    while refs.len() < 6 {
        let msg = next_json(&mut quiet).await;
        match msg["type"].as_str() {
            Some("published") => refs.push(msg["ref"].as_str().unwrap().parse::<u64>().unwrap()),
            Some("gap") => dropped_told = true,
            _ => {}
        }
    }
    refs.sort();
    assert_eq!(refs, (0..6).collect::<Vec<_>>());
    assert!(dropped_told, "the noise was dropped to make room, and the client told");
}

/// 10,000 members in one topic, on a server in a process of its own (the file table holds
/// both sides of 10,000 connections only split in two): the counts are exact, a page walk
/// returns each member once, and 50 more joining cost each subscriber one `presence_count`
/// frame per batch, however many joined in it.
#[tokio::test]
async fn ten_thousand_members_are_counted_paged_once_and_told_in_coalesced_frames() {
    let server = Process::spawn(&["--presence-topics", "room.big", "--presence-batch", "100ms"], None);
    let mut members = Vec::with_capacity(10_050);
    for chunk in 0..100 {
        let queries: Vec<String> = (0..100).map(|i| format!("uid=m{:05}&topics=room.big", chunk * 100 + i)).collect();
        let opened = futures_util::future::join_all(queries.iter().map(|q| RawWs::open(server.client, q))).await;
        members.extend(opened);
    }
    let stats = loop {
        let stats = get_json(server.client, "/v1/presence/stats?topic=room.big").await;
        if stats["members"] == 10_000 {
            break stats;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(stats["connections"], 10_000);
    let (mut seen, mut cursor) = (Vec::with_capacity(10_000), String::new());
    loop {
        let page = get_json(server.client, &format!("/v1/presence?topic=room.big&limit=1000&cursor={cursor}")).await;
        assert_eq!(page["count"], 10_000);
        seen.extend(page["members"].as_array().unwrap().iter().map(|m| m["uid"].as_str().unwrap().to_owned()));
        match page["cursor"].as_str() {
            Some(next) => cursor = next.to_owned(),
            None => break,
        }
    }
    let expected: Vec<String> = (0..10_000).map(|i| format!("m{i:05}")).collect();
    assert_eq!(seen, expected, "every member once, in uid order");

    let mut watcher = RawWs::open(server.client, "uid=watcher&topics=room.big").await;
    // The watcher's own join, told to it (and everyone) as a count.
    let own = serde_json::from_slice::<serde_json::Value>(&watcher.next_frame().await.unwrap().1).unwrap();
    assert_eq!((own["type"].as_str(), own["members"].as_u64()), (Some("presence_count"), Some(10_001)), "{own}");
    let queries: Vec<String> = (0..50).map(|i| format!("uid=late{i:02}&topics=room.big")).collect();
    let late = futures_util::future::join_all(queries.iter().map(|q| RawWs::open(server.client, q))).await;
    let (mut frames, mut joined) = (0, 0);
    while joined < 50 {
        let frame = serde_json::from_slice::<serde_json::Value>(&watcher.next_frame().await.unwrap().1).unwrap();
        assert_eq!(frame["type"], "presence_count", "above --presence-events-max-members only counts: {frame}");
        frames += 1;
        joined += frame["joined"].as_u64().unwrap();
    }
    assert!(frames <= 5, "50 joins reached the watcher in {frames} frames: one per batch they spanned");
    drop((members, late));
}
