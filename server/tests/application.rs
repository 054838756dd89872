//! The server asking and telling the application: the connect and subscribe hooks (admit,
//! narrow, grant, refuse, time out, the concurrency cap and the circuit breaker, HTTPS)
//! and the webhooks (signed, once per event, retried, bounded when the application is
//! gone). The application is a real HTTP server written here (`common::app`).

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::app::{App, Asked, Reply};
use common::{metric, metrics, next_json, post, send_json, start, wait_metric, ws, WAIT};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A refused handshake: its status, its Retry-After, and its body's `error`.
async fn refused(addr: SocketAddr, query: &str) -> (u16, Option<u32>, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET /ws?{query} HTTP/1.1\r\nHost: localhost\r\nX-App-Session: s3cret\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut answer)).await.expect("answered in time").unwrap();
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let retry = text.lines().find_map(|l| l.strip_prefix("Retry-After: ").and_then(|v| v.trim().parse().ok()));
    let error = text.split("\r\n\r\n").nth(1).and_then(|b| serde_json::from_str::<Value>(b).ok()).map_or(String::new(), |b| b["error"].as_str().unwrap_or("").to_owned());
    (status, retry, error)
}

/// Publishes to `topic`; returns how many connections it was delivered to.
async fn publish(addr: SocketAddr, topic: &str, data: Value) -> u64 {
    let (status, body) = post(addr, "/v1/publish", json!({"topic": topic, "data": data})).await;
    assert_eq!(status, 200, "{body}");
    body["delivered"].as_u64().unwrap()
}

/// The connect hook is asked with the client's uid, address, transport, topics and the
/// forwarded headers; it renames, narrows, grants info, or refuses with its own words.
#[tokio::test]
async fn the_connect_hook_admits_narrows_renames_and_refuses() {
    let mut app = App::start(|asked: &Asked| match asked.json()["uid"].as_str() {
        Some("mallory") => Reply::Json(403, json!({"error": "mallory is banned"})),
        Some("renamed") => Reply::Json(200, json!({"uid": "bob"})),
        Some("alice") => Reply::Json(200, json!({"topics": ["a"], "info": {"name": "Alice"}})),
        _ => Reply::Json(200, json!({})),
    })
    .await;
    let url = app.url("/connect");
    let server = start(move |c| {
        c.connect_hook = Some(url);
        c.hook_forward_headers = vec!["X-App-Session".into()];
        c.presence_topics = vec!["a".into()];
    })
    .await;
    let (mut alice, welcome) = ws(server.client, "uid=alice&topics=a,b").await;
    assert_eq!(welcome["uid"], "alice");
    let asked = app.next().await;
    assert_eq!(asked.path, "/connect");
    assert_eq!(asked.json(), json!({"uid": "alice", "claims": null, "address": "127.0.0.1", "transport": "ws", "topics": ["a", "b"], "headers": {}}));
    assert_eq!(publish(server.client, "b", json!(1)).await, 0, "narrowed: `b` was not kept");
    assert_eq!(publish(server.client, "a", json!(2)).await, 1);
    assert_eq!(next_json(&mut alice).await["data"], 2);
    let (status, body) = common::get_raw(server.client, "/v1/presence?topic=a").await;
    assert_eq!((status, &body["members"]), (200, &json!([{"uid": "alice", "info": {"name": "Alice"}}])), "the hook's info is the member's");

    let (_bob, welcome) = ws(server.client, "uid=renamed").await;
    assert_eq!(welcome["uid"], "bob");
    app.next().await;

    let (status, retry, error) = refused(server.client, "uid=mallory").await;
    assert_eq!((status, retry, error.as_str()), (403, None, "mallory is banned"));
    let asked = app.next().await;
    assert_eq!(asked.json()["headers"], json!({"x-app-session": "s3cret"}), "forwarded as asked, by lower-case name");
    let text = metrics(server.admin).await;
    assert_eq!(metric(&text, r#"pushline_hook_requests_total{hook="connect",outcome="admitted"}"#), 2.0);
    assert_eq!(metric(&text, r#"pushline_hook_requests_total{hook="connect",outcome="refused"}"#), 1.0);
    assert_eq!(metric(&text, r#"pushline_connections_refused_total{reason="forbidden"}"#), 1.0);
}

const JWT_SECRET: &str = "test-secret-of-thirty-two-bytes!";

fn token(sub: &str, topics: Value, exp_in: u64) -> String {
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + exp_in;
    let claims = json!({"sub": sub, "exp": exp, "topics": topics, "plan": "gold"});
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes())).unwrap()
}

/// With tokens, the hook sees the verified claims, may grant a topic the token does not,
/// and may bring the expiry forward; a refresh keeps what the application granted.
#[tokio::test]
async fn the_connect_hook_sees_the_claims_and_grants_what_a_refresh_keeps() {
    let expire_at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 30;
    let mut app = App::start(move |_: &Asked| Reply::Json(200, json!({"topics": ["own", "granted"], "expire_at": expire_at}))).await;
    let url = app.url("/connect");
    let server = start(move |c| {
        c.connect_hook = Some(url);
        c.jwt_secret = Some(JWT_SECRET.into());
        c.api_key = Some("an-api-key-of-at-least-32-bytes-long".into());
    })
    .await;
    let (status, _, error) = refused(server.client, "topics=own").await;
    assert_eq!((status, error.contains("missing token")), (401, true), "no token: refused before the application is asked");
    let (mut ws, _) = ws(server.client, &format!("token={}&topics=own", token("ann", json!(["own"]), 600))).await;
    let asked = app.next().await.json();
    assert_eq!((asked["uid"].as_str(), asked["claims"]["plan"].as_str(), asked["claims"]["topics"].clone()), (Some("ann"), Some("gold"), json!(["own"])));
    let key = "an-api-key-of-at-least-32-bytes-long";
    for topic in ["own", "granted"] {
        let (status, _, body) = common::post_raw(server.client, "/v1/publish", json!({"topic": topic, "data": topic}).to_string(), Some(key)).await;
        assert_eq!((status, body["delivered"].as_u64()), (200, Some(1)), "{topic}: {body}");
        assert_eq!(next_json(&mut ws).await["data"], topic);
    }
    send_json(&mut ws, json!({"type": "refresh", "token": token("ann", json!(["own"]), 600)})).await;
    let refreshed = next_json(&mut ws).await;
    assert_eq!((refreshed["type"].as_str(), refreshed["revoked"].clone()), (Some("refreshed"), json!([])), "{refreshed}");
}

/// A hook that never answers: the client gets 503 with Retry-After once --hook-timeout
/// passes, its place is given back, and the next client is served when the application is.
#[tokio::test]
async fn a_hook_that_never_answers_is_a_503_after_the_timeout_and_leaks_nothing() {
    let app = App::start(|_: &Asked| Reply::Hang).await;
    let url = app.url("/connect");
    let server = start(move |c| {
        c.connect_hook = Some(url);
        c.hook_timeout = Duration::from_millis(300);
        c.max_connections = 1;
    })
    .await;
    for _ in 0..2 {
        let (status, retry, error) = refused(server.client, "uid=ann").await;
        assert_eq!((status, retry.is_some()), (503, true), "{error}");
        assert!(error.contains("--hook-timeout"), "{error}");
    }
    app.answer(|_: &Asked| Reply::Json(200, json!({})));
    let (_ws, welcome) = ws(server.client, "uid=ann").await;
    assert_eq!(welcome["uid"], "ann", "the one place (--max-connections 1) was given back each time");
    let text = metrics(server.admin).await;
    assert_eq!(metric(&text, r#"pushline_hook_requests_total{hook="connect",outcome="timeout"}"#), 2.0);
    assert_eq!(metric(&text, r#"pushline_connections_refused_total{reason="unavailable"}"#), 2.0);
    assert_eq!(metric(&text, r#"pushline_connections{transport="ws"}"#), 1.0);
}

/// Failures in a row open the breaker: clients get 503 without the application being
/// asked; after the cooldown one question goes through, and its success closes it.
#[tokio::test]
async fn the_circuit_breaker_opens_on_failures_and_closes_when_the_application_is_back() {
    let app = App::start(|_: &Asked| Reply::Json(500, json!({"error": "database down"}))).await;
    let url = app.url("/connect");
    let server = start(move |c| {
        c.connect_hook = Some(url);
        c.hook_breaker_failures = 3;
        c.hook_breaker_cooldown = Duration::from_millis(500);
    })
    .await;
    for _ in 0..3 {
        let (status, _, error) = refused(server.client, "uid=ann").await;
        assert_eq!(status, 503, "{error}");
        assert!(error.contains("answered 500"), "{error}");
    }
    let (status, retry, error) = refused(server.client, "uid=ann").await;
    assert_eq!((status, retry), (503, Some(1)), "{error}");
    assert!(error.contains("circuit breaker open"), "{error}");
    assert_eq!(app.count.load(Ordering::SeqCst), 3, "not asked while open");
    assert_eq!(metric(&metrics(server.admin).await, r#"pushline_hook_breaker_open{hook="connect"}"#), 1.0);
    app.answer(|_: &Asked| Reply::Json(200, json!({})));
    // Until the cooldown has passed every attempt is refused unasked; the first after it
    // is the probe.
    let admitted = tokio::time::timeout(WAIT, async {
        loop {
            match tokio_tungstenite::connect_async(format!("ws://{}/ws?uid=ann", server.client)).await {
                Ok((ws, _)) => break ws,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await
    .expect("admitted once the breaker lets a probe through");
    drop(admitted);
    assert_eq!(app.count.load(Ordering::SeqCst), 4, "one probe, which closed the breaker");
    let (_ws, _) = ws(server.client, "uid=ann").await;
    assert_eq!(app.count.load(Ordering::SeqCst), 5);
    assert_eq!(metric(&metrics(server.admin).await, r#"pushline_hook_breaker_open{hook="connect"}"#), 0.0);
}

/// A storm of 5,000 connects against a slow application capped at 64 questions: it never
/// has more than 64 at once; the rest are refused 503 with Retry-After and counted.
#[tokio::test]
async fn a_connect_storm_never_exceeds_the_hook_concurrency_cap() {
    let app = App::start(|_: &Asked| Reply::Later(Duration::from_millis(20), 200, json!({}))).await;
    let url = app.url("/connect");
    let server = start(move |c| {
        c.connect_hook = Some(url);
        c.hook_max_concurrency = 64;
        c.max_handshakes = 10_000;
    })
    .await;
    let client = server.client;
    let (mut admitted, mut unavailable) = (0, 0);
    for wave in 0..10 {
        let tries: Vec<_> = (0..500)
            .map(|i| {
                tokio::spawn(async move {
                    let mut stream = tokio::net::TcpStream::connect(client).await.unwrap();
                    let request = format!("GET /ws?uid=u{wave}-{i} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n");
                    stream.write_all(request.as_bytes()).await.unwrap();
                    let mut head = [0u8; 12];
                    tokio::time::timeout(WAIT, stream.read_exact(&mut head)).await.expect("answered in time").unwrap();
                    String::from_utf8_lossy(&head[9..12]).into_owned()
                })
            })
            .collect();
        for t in tries {
            match t.await.unwrap().as_str() {
                "101" => admitted += 1,
                "503" => unavailable += 1,
                other => panic!("unexpected status {other}"),
            }
        }
    }
    assert_eq!(admitted + unavailable, 5000);
    let most = app.most_in_flight.load(Ordering::SeqCst);
    assert!(most <= 64, "the application had {most} questions at once");
    assert!(admitted >= 64 && unavailable > 0, "admitted {admitted}, refused {unavailable}");
    let text = metrics(server.admin).await;
    assert_eq!(metric(&text, r#"pushline_hook_requests_total{hook="connect",outcome="over_capacity"}"#), unavailable as f64);
    assert_eq!(app.count.load(Ordering::SeqCst), admitted, "every admitted connect was asked; no refused one was");
}

/// The subscribe hook decides the topics it is given, at connect and on subscribe; the
/// token is not asked for them. Its answers may be kept by (uid, topic).
#[tokio::test]
async fn the_subscribe_hook_decides_its_topics_and_its_answers_are_cached() {
    let mut app = App::start(|asked: &Asked| match asked.json()["topic"].as_str() {
        Some("room.1") => Reply::Json(200, json!({})),
        _ => Reply::Json(403, json!({"error": "not a member"})),
    })
    .await;
    let url = app.url("/subscribe");
    let server = start(move |c| {
        c.subscribe_hook = Some(url);
        c.subscribe_hook_topics = vec!["room.*".into()];
        c.hook_cache_ttl = Duration::from_secs(60);
    })
    .await;
    let (status, _, error) = refused(server.client, "uid=ann&topics=room.2").await;
    assert_eq!((status, error.as_str()), (403, "not a member"));
    let asked = app.next().await.json();
    assert_eq!((asked["uid"].as_str(), asked["topic"].as_str(), asked["session"].is_string()), (Some("ann"), Some("room.2"), true));

    let (mut ann, _) = ws(server.client, "uid=ann&topics=lobby").await;
    send_json(&mut ann, json!({"type": "subscribe", "topics": ["room.1", "lobby.2"]})).await;
    assert_eq!(next_json(&mut ann).await, json!({"type": "subscribed", "topics": ["room.1", "lobby.2"]}));
    send_json(&mut ann, json!({"type": "subscribe", "topics": ["room.2"]})).await;
    let answer = next_json(&mut ann).await;
    assert_eq!((answer["type"].as_str(), answer["error"].as_str(), answer["topic"].as_str()), (Some("error"), Some("not a member"), Some("room.2")));
    assert_eq!(publish(server.client, "room.1", json!("hi")).await, 1);
    assert_eq!(next_json(&mut ann).await["data"], "hi");
    assert_eq!(publish(server.client, "room.2", json!("no")).await, 0);

    // A second connection of ann: both answers come from the cache.
    let asked_before = app.count.load(Ordering::SeqCst);
    let (_second, _) = ws(server.client, "uid=ann&topics=room.1").await;
    assert_eq!(refused(server.client, "uid=ann&topics=room.2").await.0, 403);
    assert_eq!(app.count.load(Ordering::SeqCst), asked_before, "answered from --hook-cache-ttl");
    let text = metrics(server.admin).await;
    assert_eq!(metric(&text, r#"pushline_hook_requests_total{hook="subscribe",outcome="cached"}"#), 3.0, "room.2 again on the first connection, then both on the second");
}

/// A subscribe the hook is still deciding holds the client's next command: an unsubscribe
/// sent right after it comes after it, and the topic ends up left.
#[tokio::test]
async fn an_unsubscribe_sent_while_the_hook_decides_comes_after_the_subscribe() {
    let app = App::start(|_: &Asked| Reply::Later(Duration::from_millis(300), 200, json!({}))).await;
    let url = app.url("/subscribe");
    let server = start(move |c| {
        c.subscribe_hook = Some(url);
        c.subscribe_hook_topics = vec!["room.*".into()];
    })
    .await;
    let (mut ann, _) = ws(server.client, "uid=ann").await;
    send_json(&mut ann, json!({"type": "subscribe", "topics": ["room.1"]})).await;
    send_json(&mut ann, json!({"type": "unsubscribe", "topics": ["room.1"]})).await;
    assert_eq!(next_json(&mut ann).await["type"], "subscribed");
    assert_eq!(next_json(&mut ann).await["type"], "unsubscribed");
    assert_eq!(publish(server.client, "room.1", json!(1)).await, 0, "left, as the client last asked");
}

/// An https:// hook is checked against --hook-ca.
#[tokio::test]
async fn a_hook_over_https_is_checked_against_the_ca_given() {
    let dir = std::env::temp_dir().join(format!("pushline-hook-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut app = App::start_tls(&dir, |_: &Asked| Reply::Json(200, json!({"uid": "over-tls"}))).await;
    let (url, ca) = (app.url("/connect"), app.ca.clone());
    let server = start(move |c| {
        c.connect_hook = Some(url.clone());
        c.hook_ca = ca;
    })
    .await;
    let (_ws, welcome) = ws(server.client, "uid=ann").await;
    assert_eq!(welcome["uid"], "over-tls");
    app.next().await;
    // Without the CA, the system's roots do not know the application's certificate.
    let url = app.url("/connect");
    let untrusting = start(move |c| c.connect_hook = Some(url)).await;
    let (status, _, error) = refused(untrusting.client, "uid=ann").await;
    assert_eq!(status, 503, "{error}");
    assert!(error.contains("could not be asked"), "{error}");
    std::fs::remove_dir_all(&dir).ok();
}

const WEBHOOK_SECRET: &str = "webhook-secret-of-thirty-two-by!";

/// A batch's events, once its signature is checked as an application would (HMAC-SHA256
/// of "<timestamp>.<body>", with the hmac crate, not the server's code).
fn verified(asked: &Asked) -> Vec<Value> {
    use hmac::{Hmac, Mac};
    let timestamp = asked.headers["x-pushline-timestamp"].to_str().unwrap();
    let signature = asked.headers["x-pushline-signature"].to_str().unwrap().strip_prefix("sha256=").unwrap();
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(WEBHOOK_SECRET.as_bytes()).unwrap();
    mac.update(format!("{timestamp}.").as_bytes());
    mac.update(&asked.body);
    let expected: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(signature, expected, "the signature verifies");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    assert!(now.abs_diff(timestamp.parse().unwrap()) < 60, "a fresh timestamp");
    asked.json()["events"].as_array().unwrap().clone()
}

/// Events, without their times, until `n` have come.
async fn events(app: &mut App, n: usize) -> Vec<Value> {
    let mut got = Vec::new();
    while got.len() < n {
        for mut event in verified(&app.next().await) {
            event.as_object_mut().unwrap().remove("time_ms");
            got.push(event);
        }
    }
    got
}

/// On one node: topic_occupied and topic_vacated at the first subscriber and the last,
/// member_joined and member_left, and client_publish when asked, each signed.
#[tokio::test]
async fn webhooks_tell_the_application_signed_events() {
    let mut app = App::start(|_: &Asked| Reply::Json(200, json!({}))).await;
    let url = app.url("/events");
    let server = start(move |c| {
        c.webhook_url = Some(url);
        c.webhook_secret = Some(WEBHOOK_SECRET.into());
        c.webhook_events = pushline::webhooks::EventKind::ALL.to_vec();
        c.presence_topics = vec!["room".into()];
        c.client_publish_topics = vec!["room".into()];
    })
    .await;
    let (mut ann, _) = ws(server.client, "uid=ann&topics=room&info=%7B%22n%22%3A1%7D").await;
    let mut got = events(&mut app, 2).await;
    got.sort_by_key(|e| e["name"].as_str().unwrap().to_owned());
    assert_eq!(got, [json!({"name": "member_joined", "topic": "room", "uid": "ann", "info": {"n": 1}}), json!({"name": "topic_occupied", "topic": "room"})]);
    let (second, _) = ws(server.client, "uid=ann&topics=room").await;
    send_json(&mut ann, json!({"type": "publish", "topic": "room", "data": {"t": "hi"}})).await;
    let published = loop {
        let frame = next_json(&mut ann).await;
        if frame["type"] == "published" {
            break frame;
        }
    };
    let got = events(&mut app, 1).await;
    assert_eq!(got, [json!({"name": "client_publish", "topic": "room", "uid": "ann", "id": published["id"], "data": {"t": "hi"}, "session": got[0]["session"]})]);
    assert!(got[0]["session"].is_string());
    drop(second);
    drop(ann);
    let mut got = events(&mut app, 2).await;
    got.sort_by_key(|e| e["name"].as_str().unwrap().to_owned());
    assert_eq!(got, [json!({"name": "member_left", "topic": "room", "uid": "ann"}), json!({"name": "topic_vacated", "topic": "room"})], "once: ann had two connections");
    let text = metrics(server.admin).await;
    assert_eq!(metric(&text, r#"pushline_webhook_events_total{outcome="sent"}"#), 5.0);
}

/// The application answers 500 twice: the batch is sent again, and its events arrive once
/// it is taken.
#[tokio::test]
async fn a_webhook_batch_is_retried_until_the_application_takes_it() {
    let failures = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = failures.clone();
    let mut app = App::start(move |_: &Asked| match counted.fetch_add(1, Ordering::SeqCst) {
        0 | 1 => Reply::Json(500, json!({})),
        _ => Reply::Json(200, json!({})),
    })
    .await;
    let url = app.url("/events");
    let server = start(move |c| {
        c.webhook_url = Some(url);
        c.webhook_secret = Some(WEBHOOK_SECRET.into());
    })
    .await;
    let (_ann, _) = ws(server.client, "uid=ann&topics=news").await;
    let (first, second, third) = (app.next().await, app.next().await, app.next().await);
    assert_eq!(verified(&first), verified(&third), "the same events, sent again");
    assert_eq!(verified(&second).len(), 1);
    assert_eq!(wait_metric(server.admin, r#"pushline_webhook_batches_total{result="failed"}"#, |v| v == 2.0).await, 2.0);
    assert_eq!(metric(&metrics(server.admin).await, r#"pushline_webhook_events_total{outcome="sent"}"#), 1.0);
}

/// An application that is gone: events wait in a queue of --webhook-queue-bytes, and past
/// it they are dropped and counted, not held.
#[tokio::test]
async fn a_dead_application_fills_the_bounded_queue_and_drops_are_counted() {
    let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let server = start(move |c| {
        c.webhook_url = Some(format!("http://{gone}/events"));
        c.webhook_secret = Some(WEBHOOK_SECRET.into());
        c.webhook_queue_bytes = 4096;
        c.webhook_attempts = 1000;
        c.max_commands_per_second = 1000;
        c.max_topic_changes_per_minute = 10_000;
    })
    .await;
    let (mut ann, _) = ws(server.client, "uid=ann").await;
    for round in 0..20 {
        let topics: Vec<String> = (0..20).map(|i| format!("topic-{round}-{i}")).collect();
        send_json(&mut ann, json!({"type": "subscribe", "topics": topics})).await;
        next_json(&mut ann).await;
        send_json(&mut ann, json!({"type": "unsubscribe", "topics": topics})).await;
        next_json(&mut ann).await;
    }
    let text = metrics(server.admin).await;
    let (queued, dropped) = (metric(&text, "pushline_webhook_queued_bytes"), metric(&text, r#"pushline_webhook_events_total{outcome="queue_full"}"#));
    assert!(queued <= 4096.0 && queued > 3000.0, "queued {queued} bytes");
    let held = (queued / 60.0).floor();
    assert!(dropped >= 800.0 - held - 1.0, "800 events, {dropped} dropped, about {held} held");
}
