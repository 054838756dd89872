//! Who may read what: topic rights in tokens, public topics, per-subscription tokens,
//! expiry and refresh; public keys by `kid` and algorithm confusion; scoped API keys; the
//! admin token; origins; admission control against storms and floods; SIGHUP reload.
//! Keys are made by the test (openssl), never committed.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "test-secret-of-thirty-two-bytes!";
const KEY: &str = "test-api-key-of-thirty-two-bytes";

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

fn hs256(claims: Value) -> String {
    encode(&Header::default(), &claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
}

async fn secured(tweak: impl FnOnce(&mut pushline::Config)) -> TestServer {
    start(|c| {
        c.jwt_secret = Some(SECRET.into());
        c.api_key = Some(KEY.into());
        tweak(c);
    })
    .await
}

/// The status and error of a refused WebSocket handshake.
async fn refused(addr: std::net::SocketAddr, query: &str) -> (u16, String) {
    match tokio_tungstenite::connect_async(format!("ws://{addr}/ws?{query}")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let body = String::from_utf8(response.body().clone().unwrap_or_default()).unwrap();
            (response.status().as_u16(), serde_json::from_str::<Value>(&body).unwrap()["error"].as_str().unwrap().to_owned())
        }
        other => panic!("expected a refusal for {query}, got {:?}", other.map(|_| ())),
    }
}

#[tokio::test]
async fn tokens_grant_topics_by_name_pattern_and_sub_and_the_public_list_adds_to_them() {
    let t = secured(|c| c.public_topics = vec!["news.*".into()]).await;
    let token = hs256(json!({"sub": "alice", "exp": now() + 60, "topics": ["chat", "team.blue.*", "user.{sub}.*"]}));
    let (mut ws, _) = ws(t.client, &format!("token={token}&topics=chat,news.world")).await;
    for allowed in ["team.blue.ops", "user.alice.inbox", "news.sport"] {
        subscribe(&mut ws, &[allowed]).await;
    }
    for forbidden in ["team.red.ops", "user.bob.inbox", "chat2", "secret"] {
        send_json(&mut ws, json!({"type": "subscribe", "topics": ["chat", forbidden]})).await;
        let reply = next_json(&mut ws).await;
        assert_eq!(reply["type"], "error", "{forbidden}: {reply}");
        assert_eq!(reply["error"], format!("not allowed to read topic `{forbidden}`"));
    }
    // The connection stays, and reads what it may.
    post_raw(t.client, "/v1/publish", json!({"topic": "user.alice.inbox", "data": 1}).to_string(), Some(KEY)).await;
    assert_eq!(next_json(&mut ws).await["topic"], "user.alice.inbox");

    let (status, why) = refused(t.client, &format!("token={token}&topics=chat,secret")).await;
    assert_eq!((status, why.as_str()), (403, "not allowed to read topic `secret`"));
    let text = metrics(t.admin).await;
    assert_eq!(metric(&text, r#"pushline_connections_refused_total{reason="forbidden"}"#), 1.0);
    assert_eq!(metric(&text, r#"pushline_client_errors_total{reason="forbidden"}"#), 4.0);
}

#[tokio::test]
async fn a_subscription_token_grants_one_more_topic_to_its_own_uid() {
    let t = secured(|_| {}).await;
    let (mut ws, _) = ws(t.client, &format!("token={}", hs256(json!({"sub": "carol", "exp": now() + 60})))).await;
    let ticket = hs256(json!({"sub": "carol", "exp": now() + 30, "topics": ["match.42"]}));
    send_json(&mut ws, json!({"type": "subscribe", "topics": ["match.42"], "token": ticket})).await;
    assert_eq!(next_json(&mut ws).await["type"], "subscribed");
    let someone_elses = hs256(json!({"sub": "mallory", "exp": now() + 30, "topics": ["match.43"]}));
    send_json(&mut ws, json!({"type": "subscribe", "topics": ["match.43"], "token": someone_elses})).await;
    let reply = next_json(&mut ws).await;
    assert!(reply["error"].as_str().unwrap().contains("is for `mallory`"), "{reply}");
}

#[tokio::test]
async fn an_expired_token_is_refreshed_or_the_connection_closes_with_4001() {
    // The sweeper runs every quarter of the grace (375 ms here).
    let t = secured(|c| c.token_refresh_grace = Duration::from_millis(1500)).await;
    // Expires within the next two seconds.
    let expiring = |sub: &str, topics: Value| hs256(json!({"sub": sub, "exp": now() + 1, "topics": topics}));
    let (mut kept, _) = ws(t.client, &format!("token={}&topics=a,b", expiring("dave", json!(["a", "b"])))).await;
    let (mut dropped, _) = ws(t.client, &format!("token={}", expiring("erin", json!([])))).await;
    let notice = next_json(&mut kept).await;
    assert_eq!((notice["type"].as_str(), notice["grace_ms"].as_u64()), (Some("token_expired"), Some(1500)), "{notice}");
    let fresh = hs256(json!({"sub": "dave", "exp": now() + 3600, "topics": ["a"]}));
    send_json(&mut kept, json!({"type": "refresh", "token": fresh})).await;
    let refreshed = loop {
        let reply = next_json(&mut kept).await;
        if reply["type"] != "token_expired" {
            break reply;
        }
    };
    assert_eq!(refreshed["type"], "refreshed", "{refreshed}");
    assert_eq!(refreshed["revoked"], json!(["b"]), "the fresh token's rights apply from now");

    let mut notices = 0;
    let close = loop {
        match tokio::time::timeout(WAIT, dropped.next()).await.expect("closed in time") {
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(Message::Text(text))) if text.contains("token_expired") => notices += 1,
            Some(Ok(_)) => continue,
            other => panic!("expected a close, got {other:?}"),
        }
    };
    assert_eq!(close.map(|f| u16::from(f.code)), Some(4001));
    assert_eq!(notices, 1, "told once in the grace, not at every sweep");
    // Still here, past the grace.
    send_json(&mut kept, json!({"type": "ping"})).await;
    assert_eq!(next_json(&mut kept).await["type"], "pong");
}

/// A key pair made with openssl: (private PEM, public PEM file).
fn key_pair(dir: &Path, name: &str, algorithm: &[&str]) -> (Vec<u8>, PathBuf) {
    let private = dir.join(format!("{name}.key"));
    let public = dir.join(format!("{name}.pub"));
    let run = |args: &[&str]| {
        let out = Command::new("openssl").args(args).output().unwrap_or_else(|e| {
            panic!("cannot run openssl ({e}): install it with `apt-get install -y openssl` (scripts/test does this as root)")
        });
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let mut args = vec!["genpkey"];
    args.extend(algorithm);
    args.extend(["-out", private.to_str().unwrap()]);
    run(&args);
    run(&["pkey", "-in", private.to_str().unwrap(), "-pubout", "-out", public.to_str().unwrap()]);
    (std::fs::read(&private).unwrap(), public)
}

#[tokio::test]
async fn public_keys_by_kid_and_no_algorithm_confusion() {
    let dir = std::env::temp_dir().join(format!("pushline-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (rsa, rsa_pub) = key_pair(&dir, "rsa", &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]);
    let (ec, ec_pub) = key_pair(&dir, "ec", &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]);
    let (ed, ed_pub) = key_pair(&dir, "ed", &["-algorithm", "ED25519"]);
    let keys = vec![
        format!("r1={}", rsa_pub.display()),
        format!("e1={}", ec_pub.display()),
        format!("d1={}", ed_pub.display()),
    ];
    let t = start(|c| {
        c.jwt_public_key = keys;
        c.api_key = Some(KEY.into());
    })
    .await;
    let claims = json!({"sub": "frank", "exp": now() + 60});
    let signed = |alg: Algorithm, kid: &str, key: EncodingKey| {
        let mut header = Header::new(alg);
        header.kid = Some(kid.into());
        encode(&header, &claims, &key).unwrap()
    };
    for token in [
        signed(Algorithm::RS256, "r1", EncodingKey::from_rsa_pem(&rsa).unwrap()),
        signed(Algorithm::ES256, "e1", EncodingKey::from_ec_pem(&ec).unwrap()),
        signed(Algorithm::EdDSA, "d1", EncodingKey::from_ed_pem(&ed).unwrap()),
    ] {
        let (_ws, welcome) = ws(t.client, &format!("token={token}")).await;
        assert_eq!(welcome["uid"], "frank");
    }
    // The RSA public key used as an HS256 secret, naming the RSA key's id.
    let confused = signed(Algorithm::HS256, "r1", EncodingKey::from_secret(&std::fs::read(&rsa_pub).unwrap()));
    let (status, why) = refused(t.client, &format!("token={confused}")).await;
    assert_eq!((status, why.as_str()), (401, "token algorithm not accepted: RS256 only"));
    let wrong_key = signed(Algorithm::ES256, "e1", EncodingKey::from_ec_pem(&key_pair(&dir, "ec2", &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]).0).unwrap());
    assert_eq!(refused(t.client, &format!("token={wrong_key}")).await.1, "token signature does not verify");
    let unknown = signed(Algorithm::EdDSA, "d9", EncodingKey::from_ed_pem(&ed).unwrap());
    assert_eq!(refused(t.client, &format!("token={unknown}")).await.1, "token key id `d9` is not one of this server's");
    let no_kid = encode(&Header::new(Algorithm::EdDSA), &claims, &EncodingKey::from_ed_pem(&ed).unwrap()).unwrap();
    assert!(refused(t.client, &format!("token={no_kid}")).await.1.contains("no shared secret"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn api_keys_are_scoped() {
    let dir = std::env::temp_dir().join(format!("pushline-api-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("keys.toml");
    let (pusher, billing) = ("p".repeat(32), "b".repeat(32));
    std::fs::write(&file, format!(
        "[[key]]\nname = \"pusher\"\nsecret = \"{pusher}\"\nscopes = [\"push\"]\n\n[[key]]\nname = \"billing\"\nsecret = \"{billing}\"\nscopes = [\"publish\"]\ntopics = [\"billing.*\"]\n"
    )).unwrap();
    let t = start(|c| {
        c.jwt_secret = Some(SECRET.into());
        c.api_keys = Some(file.clone());
    })
    .await;
    let call = |path: &'static str, body: Value, key: &str| {
        let key = key.to_owned();
        async move { post_raw(t.client, path, body.to_string(), Some(&key)).await }
    };
    assert_eq!(call("/v1/push", json!({"uids": ["x"], "data": 1}), &pusher).await.0, 200);
    let (status, _, reply) = call("/v1/broadcast", json!({"data": 1}), &pusher).await;
    assert_eq!((status, reply["error"].as_str()), (403, Some("API key `pusher` may not broadcast")));
    assert_eq!(call("/v1/publish", json!({"topic": "billing.eu", "data": 1}), &billing).await.0, 200);
    let (status, _, reply) = call("/v1/publish", json!({"topic": "news", "data": 1}), &billing).await;
    assert_eq!((status, reply["error"].as_str()), (403, Some("API key `billing` may not publish to topic `news`")));
    assert_eq!(call("/v1/push", json!({"uids": ["x"], "data": 1}), &billing).await.0, 403);
    assert_eq!(call("/v1/push", json!({"uids": ["x"], "data": 1}), KEY).await.0, 401);
    // A batch is checked item by item: what the key may not do fails alone.
    let items = json!([
        {"push": {"uids": ["x"], "data": 1}},
        {"broadcast": {"data": 2}},
        {"publish": {"topic": "billing.eu", "data": 3}},
    ]);
    let (status, _, reply) = call("/v1/batch", items.clone(), &pusher).await;
    assert_eq!(status, 200, "{reply}");
    let errors: Vec<Option<&str>> = reply["results"].as_array().unwrap().iter().map(|r| r["error"].as_str()).collect();
    assert_eq!(errors, [None, Some("API key `pusher` may not broadcast"), Some("API key `pusher` may not publish to topic `billing.eu`")], "{reply}");
    let (status, _, reply) = call("/v1/batch", items.clone(), &billing).await;
    let statuses: Vec<Option<u64>> = reply["results"].as_array().unwrap().iter().map(|r| r["status"].as_u64()).collect();
    assert_eq!((status, statuses), (200, vec![Some(403), Some(403), None]), "{reply}");
    assert_eq!(call("/v1/batch", items, KEY).await.0, 401, "a wrong key refuses the whole batch");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn the_admin_token_guards_every_admin_route() {
    let token = "admin-token-of-thirty-two-bytes!";
    let t = start(|c| c.admin_token = Some(token.into())).await;
    let get = |path: &str, auth: Option<&str>| {
        let mut request = reqwest::Client::new().get(format!("http://{}{path}", t.admin));
        if let Some(auth) = auth {
            request = request.bearer_auth(auth);
        }
        async move { request.send().await.unwrap().status().as_u16() }
    };
    for path in ["/debug/connections", "/debug/stats", "/metrics"] {
        assert_eq!(get(path, None).await, 401, "{path}");
        assert_eq!(get(path, Some("wrong-token-of-thirty-two-bytes!")).await, 401, "{path}");
        assert_eq!(get(path, Some(token)).await, 200, "{path}");
    }
    // The dashboard page holds no data; it asks for the token to read the endpoints.
    assert_eq!(get("/", None).await, 200);
    assert_eq!(get("/assets/uplot.min.js", None).await, 200);

    let mut config = pushline::Config::for_loopback();
    config.jwt_secret = Some(SECRET.into());
    config.api_key = Some(KEY.into());
    config.admin_listen = "0.0.0.0:0".parse().unwrap();
    let refused = pushline::Server::start(config).await.err().expect("a public admin listener needs a token");
    assert!(refused.message.contains("set --admin-token"), "{refused}");
}

#[tokio::test]
async fn admission_control_against_storms_and_floods() {
    let t = start(|c| {
        c.allowed_origins = vec!["https://app.example".into()];
        c.max_connect_rate = 5;
        c.max_connections_per_ip = 3;
        c.max_commands_per_second = 5;
    })
    .await;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let with_origin = |origin: &str| {
        let mut request = format!("ws://{}/ws?uid=o", t.client).into_client_request().unwrap();
        request.headers_mut().insert("origin", origin.parse().unwrap());
        request
    };
    match tokio_tungstenite::connect_async(with_origin("https://evil.example")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => assert_eq!(response.status(), 403),
        other => panic!("foreign origin accepted: {:?}", other.map(|_| ())),
    }
    let (mut good, _) = tokio_tungstenite::connect_async(with_origin("https://app.example")).await.expect("allowed origin");
    next_json(&mut good).await;

    // Three per address: the fourth from 127.0.0.1 is refused.
    let _two = (ws(t.client, "uid=a").await, ws(t.client, "uid=b").await);
    let (status, why) = refused(t.client, "uid=c").await;
    assert_eq!(status, 429, "{why}");
    // The bucket (5 per second) is spent by now: a burst is refused with Retry-After.
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let (status, raw) = RawWs::try_handshake(t.client, "GET /ws?uid=burst HTTP/1.1\r\nHost: x\r\n").await;
        drop(raw);
        statuses.push(status);
    }
    assert!(statuses.contains(&503), "{statuses:?}");
    let text = metrics(t.admin).await;
    assert!(metric(&text, r#"pushline_connections_refused_total{reason="connect_rate"}"#) >= 1.0);
    assert!(metric(&text, r#"pushline_connections_refused_total{reason="max_connections_per_ip"}"#) >= 1.0);
    assert_eq!(metric(&text, r#"pushline_connections_refused_total{reason="forbidden"}"#), 1.0);

    // Commands past five per second close the connection with 1008. The eight go out in
    // one write: sent one by one, the last could reach a socket the server had already
    // closed after the sixth, and the client's next write would fail with EPIPE.
    for _ in 0..8 {
        good.feed(Message::Text(json!({"type": "ping"}).to_string().into())).await.expect("buffered");
    }
    good.flush().await.expect("sent");
    let close = loop {
        match tokio::time::timeout(WAIT, good.next()).await.expect("closed in time") {
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => continue,
            other => panic!("expected a close, got {other:?}"),
        }
    };
    assert_eq!(close.map(|f| u16::from(f.code)), Some(1008));
}

#[tokio::test]
async fn sighup_reloads_credentials_without_dropping_connections() {
    let dir = std::env::temp_dir().join(format!("pushline-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("pushline.toml");
    let (old, new) = ("old-secret-of-thirty-two-bytes!!", "new-secret-of-thirty-two-bytes!!");
    std::fs::write(&file, format!("jwt_secret = \"{old}\"\napi_key = \"{KEY}\"\n")).unwrap();
    let server = Process::spawn(&["--config", file.to_str().unwrap()], None);
    let token = |secret: &str, sub: &str| encode(&Header::default(), &json!({"sub": sub, "exp": now() + 60}), &EncodingKey::from_secret(secret.as_bytes())).unwrap();
    let (mut before, _) = ws(server.client, &format!("token={}", token(old, "g"))).await;
    std::fs::write(&file, format!("jwt_secret = \"{new}\"\napi_key = \"{KEY}\"\n")).unwrap();
    server.signal(libc::SIGHUP);
    server.wait_log("reloaded client token keys");
    let (_after, welcome) = ws(server.client, &format!("token={}", token(new, "h"))).await;
    assert_eq!(welcome["uid"], "h");
    assert_eq!(refused(server.client, &format!("token={}", token(old, "i"))).await.0, 401);
    send_json(&mut before, json!({"type": "ping"})).await;
    assert_eq!(next_json(&mut before).await["type"], "pong", "the old connection stays up");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The CORS headers of an SSE response to a page on `origin`.
async fn sse_cors(addr: std::net::SocketAddr, query: &str, origin: &str) -> (u16, Option<String>, Option<String>) {
    let response = reqwest::Client::new().get(format!("http://{addr}/sse?{query}")).header("Origin", origin).send().await.unwrap();
    let header = |name: &str| response.headers().get(name).map(|v| v.to_str().unwrap().to_owned());
    (response.status().as_u16(), header("access-control-allow-origin"), header("access-control-allow-credentials"))
}

#[tokio::test]
async fn sse_answers_cors_for_the_origins_it_allows() {
    let open = start(|_| {}).await;
    let page = "http://127.0.0.1:5555";
    assert_eq!(sse_cors(open.client, "uid=a", page).await, (200, Some(page.into()), None), "open mode: any origin, no credentials");

    let token = hs256(json!({"sub": "a", "exp": now() + 60}));
    let listed = secured(|c| c.allowed_origins = vec!["https://app.example".into()]).await;
    let query = format!("token={token}");
    assert_eq!(
        sse_cors(listed.client, &query, "https://app.example").await,
        (200, Some("https://app.example".into()), Some("true".into())),
        "a listed origin, with credentials"
    );
    assert_eq!(sse_cors(listed.client, &query, "https://evil.example").await.0, 403);

    let unlisted = secured(|_| {}).await;
    assert_eq!(sse_cors(unlisted.client, &query, page).await, (200, None, None), "none listed: same-origin only, so no CORS answer");
}

/// A uid is escaped where `{sub}` stands (README, Topic rights): whatever bytes it holds,
/// a token reads only its own expansion of each pattern, never a topic the same pattern
/// grants another uid; at connect, on subscribe, with a subscription token, after a
/// refresh, and through `--public-topics`.
#[tokio::test]
async fn a_uid_holding_pattern_or_separator_bytes_reads_only_its_own_topics() {
    use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
    let t = secured(|c| {
        c.public_topics = vec!["room.{sub}.*".into(), "news".into()];
        c.max_commands_per_second = 1000;
    })
    .await;
    let uids = ["*", "al*", "john", "a.b", "{sub}", "%41", "a,b", "ctl\u{1}\u{7f}", "ünï"];
    // Other users, each holding topics under the same patterns.
    let others = ["alice", "al", "a", "A", "john.doe@example.com", "ctl"];
    let segment = pushline::rights::topic_segment;
    let query_escape = |topic: &str| utf8_percent_encode(topic, NON_ALPHANUMERIC).to_string();
    for uid in uids {
        let mine = segment(uid);
        assert!(!mine.contains(['*', '.', ',', '{', '}']) && mine.is_ascii(), "{uid}: {mine}");
        let token = hs256(json!({"sub": uid, "exp": now() + 60, "topics": ["dm.{sub}", "user.{sub}.*", "{sub}.*"]}));
        // Connect: its own topics and the public ones, by their escaped names; not another's.
        let own = format!("dm.{mine},user.{mine}.inbox,room.{mine}.x,news");
        let (mut ws, welcome) = ws(t.client, &format!("token={token}&topics={}", query_escape(&own))).await;
        assert_eq!(welcome["uid"], uid);
        let theirs: Vec<String> = others
            .iter()
            .map(|o| segment(o))
            .flat_map(|o| [format!("dm.{o}"), format!("user.{o}.inbox"), format!("room.{o}.secret"), format!("{o}.x")])
            .collect();
        let (status, why) = refused(t.client, &format!("token={token}&topics={}", query_escape(&theirs[0]))).await;
        assert_eq!((status, why), (403, format!("not allowed to read topic `{}`", theirs[0])), "{uid}");
        // Subscribe: the same.
        for forbidden in &theirs {
            send_json(&mut ws, json!({"type": "subscribe", "topics": [forbidden]})).await;
            let reply = next_json(&mut ws).await;
            assert_eq!(reply["error"], format!("not allowed to read topic `{forbidden}`"), "{uid} subscribing to {forbidden}: {reply}");
        }
        subscribe(&mut ws, &[&format!("{mine}.anything")]).await;
        // A subscription token: its `{sub}` is escaped too.
        let ticket = hs256(json!({"sub": uid, "exp": now() + 30, "topics": ["match.{sub}"]}));
        send_json(&mut ws, json!({"type": "subscribe", "topics": ["match.alice"], "token": ticket})).await;
        assert_eq!(next_json(&mut ws).await["type"], "error", "{uid}");
        send_json(&mut ws, json!({"type": "subscribe", "topics": [format!("match.{mine}")], "token": ticket})).await;
        assert_eq!(next_json(&mut ws).await["type"], "subscribed", "{uid}");
        // A refresh keeps what the fresh token grants under the same escaping.
        let fresh = hs256(json!({"sub": uid, "exp": now() + 60, "topics": ["dm.{sub}"]}));
        send_json(&mut ws, json!({"type": "refresh", "token": fresh})).await;
        let refreshed = next_json(&mut ws).await;
        assert_eq!(refreshed["type"], "refreshed", "{uid}: {refreshed}");
        let revoked: Vec<String> = serde_json::from_value(refreshed["revoked"].clone()).unwrap();
        assert!(!revoked.contains(&format!("dm.{mine}")) && revoked.contains(&format!("user.{mine}.inbox")), "{uid}: {revoked:?}");
        // And what is published to its own topic reaches it.
        post_raw(t.client, "/v1/publish", json!({"topic": format!("dm.{mine}"), "data": uid}).to_string(), Some(KEY)).await;
        let message = next_json(&mut ws).await;
        assert_eq!((message["topic"].as_str(), message["data"].as_str()), (Some(format!("dm.{mine}").as_str()), Some(uid)));
    }
}

/// A prefix pattern whose `{sub}` runs straight into the `*` would give `al` every topic
/// of `alice`: refused in a token and at start in `--public-topics`.
#[tokio::test]
async fn a_prefix_pattern_must_end_the_uid_with_a_separator() {
    let t = secured(|_| {}).await;
    let token = hs256(json!({"sub": "al", "exp": now() + 60, "topics": ["chat.{sub}*"]}));
    let (status, why) = refused(t.client, &format!("token={token}")).await;
    assert_eq!(status, 401);
    assert!(why.contains("`chat.{sub}*`") && why.contains("separator"), "{why}");
    let mut config = pushline::Config::for_loopback();
    config.jwt_secret = Some(SECRET.into());
    config.public_topics = vec!["room.{sub}*".into()];
    let error = config.validate().unwrap_err().to_string();
    assert!(error.contains("separator"), "{error}");
}

/// What a per-subscription token grants ends when it expires: the topic is left and the
/// client told; and a connection whose own token expired subscribes to nothing until it
/// sends a fresh one.
#[tokio::test]
async fn expired_tokens_grant_no_new_subscriptions_and_tickets_end_with_their_token() {
    // A short grace makes the sweeper look often (a quarter of it).
    let t = secured(|c| c.token_refresh_grace = Duration::from_millis(1500)).await;
    let (mut client, _) = ws(t.client, &format!("token={}&topics=news", hs256(json!({"sub": "gil", "exp": now() + 60, "topics": ["news"]})))).await;
    let ticket = hs256(json!({"sub": "gil", "exp": now() + 1, "topics": ["match.42"]}));
    send_json(&mut client, json!({"type": "subscribe", "topics": ["match.42"], "token": ticket})).await;
    assert_eq!(next_json(&mut client).await["type"], "subscribed");
    let notice = next_json(&mut client).await;
    assert_eq!(notice, json!({"type": "unsubscribed", "topics": ["match.42"], "reason": "subscription token expired"}));
    post_raw(t.client, "/v1/publish", json!({"topic": "match.42", "data": "late"}).to_string(), Some(KEY)).await;
    post_raw(t.client, "/v1/publish", json!({"topic": "news", "data": "kept"}).to_string(), Some(KEY)).await;
    assert_eq!(next_json(&mut client).await["data"], "kept", "match.42 no longer reaches it");

    let (mut lapsed, _) = ws(t.client, &format!("token={}", hs256(json!({"sub": "hal", "exp": now() + 1, "topics": ["room.*"]})))).await;
    assert_eq!(next_json(&mut lapsed).await["type"], "token_expired");
    send_json(&mut lapsed, json!({"type": "subscribe", "topics": ["room.b"]})).await;
    let reply = next_json(&mut lapsed).await;
    assert!(reply["error"].as_str().unwrap().starts_with("your token expired"), "{reply}");
}

/// A token's `publish` claim grants the topics its holder may publish to, `{sub}`
/// expanded; reading a topic grants no publishing, and an expired token publishes nothing.
#[tokio::test]
async fn a_tokens_publish_claim_grants_what_its_holder_may_publish() {
    // The sweeper, which finds expired tokens, runs every quarter of the grace.
    let t = secured(|c| c.token_refresh_grace = Duration::from_millis(1500)).await;
    let token = hs256(json!({"sub": "alice", "exp": now() + 2, "topics": ["room.*"], "publish": ["room.{sub}.*"]}));
    let (mut alice, _) = ws(t.client, &format!("token={token}&topics=room.alice.desk")).await;
    send_json(&mut alice, json!({"type": "publish", "topic": "room.alice.desk", "data": "typing", "echo": true})).await;
    let mut seen = vec![next_json(&mut alice).await, next_json(&mut alice).await];
    seen.sort_by_key(|m| m["type"].as_str().unwrap().to_owned());
    assert_eq!((seen[0]["type"].as_str(), seen[0]["data"].as_str(), seen[1]["type"].as_str()), (Some("message"), Some("typing"), Some("published")), "{seen:?}");
    for forbidden in ["room.bob.desk", "room.alice", "room.alice%2Edesk"] {
        send_json(&mut alice, json!({"type": "publish", "topic": forbidden, "data": 1})).await;
        let refused = next_json(&mut alice).await;
        assert!(refused["error"].as_str().unwrap().contains("not allowed to publish"), "{forbidden}: {refused}");
    }
    // Once the token expires, nothing more is published until it is refreshed.
    let expired = next_json_within(&mut alice, Duration::from_secs(5)).await;
    assert_eq!(expired["type"], "token_expired", "{expired}");
    send_json(&mut alice, json!({"type": "publish", "topic": "room.alice.desk", "data": 2})).await;
    let refused = next_json(&mut alice).await;
    assert!(refused["error"].as_str().unwrap().contains("token expired"), "{refused}");
}

/// Who may see a presence topic's members: a client that may read the topic, by its own
/// token or by a per-subscription token it subscribed with; no one else.
#[tokio::test]
async fn presence_pages_go_to_clients_that_may_read_the_topic() {
    let t = secured(|c| c.presence_topics = vec!["match.*".into()]).await;
    let token = hs256(json!({"sub": "fan", "exp": now() + 60, "topics": ["news"]}));
    let (mut fan, _) = ws(t.client, &format!("token={token}")).await;
    let ticket = hs256(json!({"sub": "fan", "exp": now() + 60, "topics": ["match.42"]}));
    send_json(&mut fan, json!({"type": "subscribe", "topics": ["match.42"], "token": ticket})).await;
    assert_eq!(next_json(&mut fan).await["type"], "subscribed");
    send_json(&mut fan, json!({"type": "presence", "topic": "match.42"})).await;
    let page = loop {
        let frame = next_json(&mut fan).await;
        if frame["type"] == "presence" {
            break frame;
        }
    };
    assert_eq!((page["count"].as_u64(), page["members"][0]["uid"].as_str()), (Some(1), Some("fan")), "{page}");
    send_json(&mut fan, json!({"type": "presence", "topic": "match.43"})).await;
    let refused = loop {
        let frame = next_json(&mut fan).await;
        if frame["type"] == "error" {
            break frame;
        }
    };
    assert!(refused["error"].as_str().unwrap().contains("not allowed to read topic `match.43`"), "{refused}");
}
