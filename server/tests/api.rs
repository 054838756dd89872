//! The publish API refuses bad input with a status and a reason, and loses nothing it accepted.

mod common;

use common::*;
use serde_json::json;

#[tokio::test]
async fn bad_requests_say_what_is_wrong() {
    let t = start(|c| {
        c.max_message_bytes = 1000;
        c.queue_max_bytes = 4096;
    })
    .await;
    let cases: &[(&str, String, u16, &str)] = &[
        ("/v1/push", "{not json".into(), 400, "bad JSON"),
        ("/v1/push", json!({"data": 1}).to_string(), 400, "missing field `uids`"),
        ("/v1/push", json!({"uids": [], "data": 1}).to_string(), 400, "uids must list at least one uid"),
        ("/v1/push", json!({"uids": ["a", ""], "data": 1}).to_string(), 400, "uid `` is 0 bytes; uids are 1 to 256 bytes"),
        ("/v1/push", json!({"uids": ["u".repeat(257)], "data": 1}).to_string(), 400, "is 257 bytes; uids are 1 to 256 bytes"),
        ("/v1/push", json!({"uids": ["a"]}).to_string(), 400, "missing field `data`"),
        ("/v1/publish", json!({"data": 1}).to_string(), 400, "missing field `topic`"),
        ("/v1/publish", json!({"topic": "", "data": 1}).to_string(), 400, "topic names are 1 to 256 bytes"),
        ("/v1/broadcast", json!({"data": 1, "extra": 2}).to_string(), 400, "unknown field `extra`"),
        ("/v1/broadcast", r#"{"data": tru}"#.into(), 400, "bad JSON"),
        ("/v1/broadcast", json!({"data": "x".repeat(2000)}).to_string(), 413, "data is 2002 bytes; the limit is 1000"),
        ("/v1/broadcast", "x".repeat(2 * 1024 * 1024), 413, "request body over"),
        ("/v1/nothing", json!({}).to_string(), 404, "no endpoint /v1/nothing"),
    ];
    for (path, body, status, error) in cases {
        let (got, _, reply) = post_raw(t.client, path, body.clone(), None).await;
        assert_eq!(got, *status, "{path} {body:.60}: {reply}");
        let message = reply["error"].as_str().unwrap();
        assert!(message.contains(error), "{path}: {message:?} should contain {error:?}");
    }
    let response = reqwest::get(format!("http://{}/v1/push", t.client)).await.unwrap();
    assert_eq!(response.status(), 405);
    let text = metrics(t.admin).await;
    assert_eq!(metric(&text, r#"pushline_messages_published_total{kind="broadcast"}"#), 0.0, "nothing was published");
}

#[tokio::test]
async fn admin_endpoints_live_only_on_the_admin_port() {
    let t = start(|_| {}).await;
    assert_eq!(reqwest::get(format!("http://{}/healthz", t.admin)).await.unwrap().status(), 200);
    assert_eq!(reqwest::get(format!("http://{}/readyz", t.admin)).await.unwrap().status(), 200);
    for path in ["/metrics", "/healthz", "/debug/memory", "/debug/pprof/heap", "/debug/connections"] {
        let status = reqwest::get(format!("http://{}{path}", t.client)).await.unwrap().status();
        assert_eq!(status, 404, "{path} must not be served on the public port");
    }
}

#[tokio::test]
async fn metrics_count_what_happened() {
    let t = start(|_| {}).await;
    let (mut a, _) = ws(t.client, "uid=a&topics=x").await;
    let (_, mut sse) = Sse::open(t.client, "uid=b").await;
    sse.next_event().await;
    post(t.client, "/v1/push", json!({"uids": ["a"], "data": 1})).await;
    post(t.client, "/v1/publish", json!({"topic": "x", "data": 2})).await;
    post(t.client, "/v1/broadcast", json!({"data": 3})).await;
    for _ in 0..3 {
        next_json(&mut a).await;
    }
    sse.next_event().await;
    wait_metric(t.admin, "pushline_messages_delivered_total", |v| v == 4.0).await;
    let text = metrics(t.admin).await;
    for (series, value) in [
        (r#"pushline_connections{transport="ws"}"#, 1.0),
        (r#"pushline_connections{transport="sse"}"#, 1.0),
        (r#"pushline_connections_opened_total{transport="ws"}"#, 1.0),
        (r#"pushline_messages_published_total{kind="push"}"#, 1.0),
        (r#"pushline_messages_published_total{kind="topic"}"#, 1.0),
        (r#"pushline_messages_published_total{kind="broadcast"}"#, 1.0),
        (r#"pushline_api_requests_total{route="push",status="200"}"#, 1.0),
        ("pushline_delivery_latency_seconds_count", 4.0),
        ("pushline_outbound_queued_bytes", 0.0),
    ] {
        assert_eq!(metric(&text, series), value, "{series}\n{text}");
    }
    assert!(text.contains(r#"pushline_delivery_latency_seconds_bucket{le="0.1"}"#), "latency is a histogram");
}

/// POSTs `body` to `/v1/batch` as `content_type`; the status and the answer.
async fn batch(addr: std::net::SocketAddr, body: String, content_type: &str, idempotency_key: Option<&str>) -> (u16, serde_json::Value) {
    let mut req = reqwest::Client::new().post(format!("http://{addr}/v1/batch")).body(body).header("content-type", content_type);
    if let Some(key) = idempotency_key {
        req = req.header("idempotency-key", key);
    }
    let response = req.send().await.expect("request sent");
    let status = response.status().as_u16();
    (status, response.json().await.expect("a JSON answer"))
}

#[tokio::test]
async fn a_batch_publishes_each_item_and_answers_each_in_order() {
    let t = start(|c| {
        c.max_message_bytes = 1000;
        c.max_batch = 5;
        c.max_push_uids = 5;
    })
    .await;
    let (mut a, _) = ws(t.client, "uid=a&topics=x").await;
    let (mut b, _) = ws(t.client, "uid=b").await;
    let items = json!([
        {"push": {"uids": ["a", "a"], "data": 1}},
        {"push": {"uids": [], "data": 2}},
        {"publish": {"topic": "x", "data": 3}},
        {"publish": {"topic": "x", "data": "y".repeat(2000)}},
        {"broadcast": {"data": 5}},
    ]);
    let (status, answer) = batch(t.client, items.to_string(), "application/json", None).await;
    assert_eq!(status, 200, "{answer}");
    let results = answer["results"].as_array().expect("results");
    assert_eq!(results.len(), 5, "{answer}");
    assert_eq!((results[0]["online"].as_u64(), results[0]["delivered"].as_u64(), results[0]["stored"].as_u64()), (Some(1), Some(1), Some(1)), "{answer}");
    assert_eq!((results[1]["status"].as_u64(), results[1]["error"].as_str()), (Some(400), Some("uids must list at least one uid")));
    assert_eq!((results[2]["delivered"].as_u64(), results[2].get("online")), (Some(1), None), "{answer}");
    assert_eq!(results[3]["status"], 413, "{answer}");
    assert!(results[3]["error"].as_str().unwrap().contains("data is 2002 bytes; the limit is 1000"), "{answer}");
    assert_eq!(results[4]["delivered"], 2, "{answer}");
    let ids: Vec<u64> = [0, 2, 4].iter().map(|i| results[*i]["id"].as_str().unwrap().parse().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids follow the items' order: {ids:?}");
    for (want, id) in [1, 3, 5].into_iter().zip(&ids) {
        let got = next_json(&mut a).await;
        assert_eq!((got["data"].as_u64(), got["id"].as_str()), (Some(want), Some(id.to_string().as_str())), "in order, once each");
    }
    assert_eq!(next_json(&mut b).await["data"], 5);

    // Each item with its own idempotency key: a retried batch publishes nothing again.
    let keyed = json!([{"push": {"uids": ["a"], "data": 7}, "idempotency_key": "k7"}, {"push": {"uids": ["a"], "data": 8}}]);
    let (_, first) = batch(t.client, keyed.to_string(), "application/json", None).await;
    let (_, again) = batch(t.client, keyed.to_string(), "application/json", None).await;
    assert_eq!(again["results"][0], first["results"][0], "the first answer, again");
    assert_ne!(again["results"][1]["id"], first["results"][1]["id"], "an item without a key is published again");
    let reused = json!([{"push": {"uids": ["a"], "data": 9}, "idempotency_key": "k7"}]);
    let (_, answer) = batch(t.client, reused.to_string(), "application/json", None).await;
    assert_eq!(answer["results"][0]["status"], 422, "{answer}");
    for want in [7, 8, 8] {
        assert_eq!(next_json(&mut a).await["data"], want, "7 once, 8 twice, 9 never");
    }

    // NDJSON: one item per line; blank lines are skipped.
    let lines = "{\"push\":{\"uids\":[\"b\"],\"data\":10}}\n\n{\"push\":{\"uids\":[\"b\"],\"data\":11}}\n";
    let (status, answer) = batch(t.client, lines.into(), "application/x-ndjson", None).await;
    assert_eq!((status, answer["results"].as_array().map(Vec::len)), (200, Some(2)), "{answer}");
    assert_eq!(next_json(&mut b).await["data"], 10);
    assert_eq!(next_json(&mut b).await["data"], 11);

    // Refusals of the whole request name what is wrong, and publish nothing.
    let six = json!([{"broadcast": {"data": 1}}, {"broadcast": {"data": 1}}, {"broadcast": {"data": 1}}, {"broadcast": {"data": 1}}, {"broadcast": {"data": 1}}, {"broadcast": {"data": 1}}]);
    let cases: &[(String, &str, Option<&str>, u16, &str)] = &[
        (six.to_string(), "application/json", None, 413, "batch has more than 5 items (--max-batch)"),
        (format!("{}\n", six.as_array().unwrap().iter().map(|i| i.to_string()).collect::<Vec<_>>().join("\n")), "Application/X-NDJSON; charset=utf-8", None, 413, "more than 5 items"),
        ("[{\"broadcast\":{\"data\":1}},".into(), "application/json", None, 400, "bad JSON"),
        ("{\"broadcast\":{\"data\":1}}".into(), "application/json", None, 400, "a batch is an array of items"),
        ("{\"broadcast\":{\"data\":1}}\n{oops\n".into(), "application/x-ndjson", None, 400, "line 2: bad JSON"),
        ("[]".into(), "application/json", None, 400, "a batch needs at least one item"),
        ("[{\"broadcast\":{\"data\":1}}]".into(), "application/json", Some("k"), 400, "give each item its own `idempotency_key`"),
    ];
    for (body, content_type, header, status, error) in cases {
        let (got, answer) = batch(t.client, body.clone(), content_type, *header).await;
        assert_eq!(got, *status, "{body:.60}: {answer}");
        assert!(answer["error"].as_str().unwrap().contains(error), "{answer} should say {error:?}");
    }
    // Items that are not one publish each fail alone.
    let odd = json!([
        {"push": {"uids": ["b"], "data": 12}, "broadcast": {"data": 0}},
        {"nothing": 1},
        {},
        [{"data": 0}],
        {"broadcast": [0]},
        {"broadcast": {"data": 13}, "idempotency_key": "once"},
        {"broadcast": {"data": 14}, "idempotency_key": "once"},
    ]);
    // In two batches: --max-batch is 5.
    let mut results = Vec::new();
    for items in odd.as_array().unwrap().chunks(4) {
        let (status, answer) = batch(t.client, json!(items).to_string(), "application/json", None).await;
        assert_eq!(status, 200, "{answer}");
        results.extend(answer["results"].as_array().unwrap().iter().cloned());
    }
    let answer = json!(results);
    let said = |i: usize| results[i]["error"].as_str().unwrap_or_default();
    assert!(said(0).contains("exactly one of `push`, `publish`, `broadcast`"), "{answer}");
    assert!(said(1).contains("unknown field `nothing`"), "{answer}");
    assert_eq!(results[2]["status"], 400, "{answer}");
    assert!(said(3).contains("an item must be a JSON object"), "{answer}");
    assert_eq!(results[4]["status"], 400, "a body given as an array of its fields: {answer}");
    assert_eq!(results[5]["delivered"], 2, "{answer}");
    assert!(said(6).contains("given to an earlier item of the batch"), "{answer}");
    assert_eq!(next_json(&mut b).await["data"], 13, "only the good item went out");
    let (status, answer) = post(t.client, "/v1/broadcast", json!([15])).await;
    assert_eq!(status, 400, "{answer}");

    // A batch's pushes are held to --max-push-uids in all, like one push.
    let many: Vec<String> = (0..6).map(|i| format!("m{i}")).collect();
    let (status, answer) = batch(t.client, json!([{"push": {"uids": many[..3]}}, {"push": {"uids": many[3..], "data": 1}}]).to_string(), "application/json", None).await;
    assert_eq!(status, 200, "an item that fails does not count: {answer}");
    let items = json!([{"push": {"uids": many[..3], "data": 1}}, {"push": {"uids": many[3..], "data": 1}}]);
    let (status, answer) = batch(t.client, items.to_string(), "application/json", None).await;
    assert_eq!((status, answer["error"].as_str()), (413, Some("the request pushes to 6 uids; the limit is 5 (--max-push-uids)")));
    let (status, answer) = post(t.client, "/v1/push", json!({"uids": many, "data": 1})).await;
    assert_eq!((status, answer["error"].as_str()), (413, Some("the request pushes to 6 uids; the limit is 5 (--max-push-uids)")));

    let text = metrics(t.admin).await;
    assert_eq!(metric(&text, r#"pushline_api_requests_total{route="batch",status="200"}"#), 8.0, "{text}");
    assert_eq!(metric(&text, r#"pushline_api_requests_total{route="batch",status="413"}"#), 3.0);
    assert_eq!(metric(&text, r#"pushline_messages_published_total{kind="broadcast"}"#), 2.0, "refused batches published nothing");
    assert_eq!(metric(&text, r#"pushline_messages_published_total{kind="push"}"#), 7.0, "replays publish nothing");
    // Every item of every batch that was read, by what it got.
    for (status, items) in [("200", 11.0), ("400", 8.0), ("413", 1.0), ("422", 1.0)] {
        assert_eq!(metric(&text, &format!(r#"pushline_api_batch_items_total{{status="{status}"}}"#)), items, "{status}\n{text}");
    }
}

fn request(path: &str, extra: &str, body: &str) -> String {
    format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\n\r\n{body}", body.len())
}

/// Publishes on one connection are answered in order, whoever reads them: plain requests
/// by the server's own path, a chunked body, `Expect: 100-continue` or a GET by hyper, to
/// which the rest of the connection then belongs.
#[tokio::test]
async fn one_connection_answers_every_kind_of_request_in_order() {
    use tokio::io::AsyncWriteExt;
    let t = start(|c| c.api_key = Some("an-api-key-of-at-least-32-bytes-long".into())).await;
    let (mut a, _) = ws(t.client, "uid=a").await;
    let key = "Authorization: Bearer an-api-key-of-at-least-32-bytes-long\r\n";
    let push = |n: u32| json!({"uids": ["a"], "data": n}).to_string();
    let mut stream = tokio::net::TcpStream::connect(t.client).await.unwrap();
    // Two pushes and a refused one in one write; the refusal's body was sent whole, so the
    // connection goes on.
    let pipelined = [request("/v1/push", key, &push(1)), request("/v1/push", key, "{not json"), request("/v1/push", key, &push(2))].concat();
    stream.write_all(pipelined.as_bytes()).await.unwrap();
    let answered = responses(&mut stream, 3).await;
    let statuses: Vec<u16> = answered.iter().map(|(status, ..)| *status).collect();
    assert_eq!(statuses, [200, 400, 200]);
    for (_, fields, _) in &answered {
        assert_eq!(header(fields, "content-type"), Some("application/json"));
        assert!(httpdate::parse_http_date(header(fields, "date").expect("a Date header")).is_ok());
        assert_eq!(header(fields, "connection"), None, "kept alive");
    }
    // A head that arrives in pieces, and its body after it.
    let split = request("/v1/push", key, &push(3));
    let (head, body) = split.split_at(split.find("\r\n\r\n").unwrap() + 4);
    for piece in [&head[..10], &head[10..], body] {
        stream.write_all(piece.as_bytes()).await.unwrap();
        stream.flush().await.unwrap();
        tokio::task::yield_now().await;
    }
    assert_eq!(responses(&mut stream, 1).await[0].0, 200);
    // Then hyper's: a chunked body, a push that waits for 100-continue, a GET.
    let chunked = format!("POST /v1/push HTTP/1.1\r\nHost: x\r\n{key}Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{}\r\n0\r\n\r\n", push(4).len(), push(4));
    stream.write_all(chunked.as_bytes()).await.unwrap();
    assert_eq!(responses(&mut stream, 1).await[0].0, 200);
    let expecting = format!("POST /v1/push HTTP/1.1\r\nHost: x\r\n{key}Expect: 100-continue\r\nContent-Length: {}\r\n\r\n", push(5).len());
    stream.write_all(expecting.as_bytes()).await.unwrap();
    let continued = b"HTTP/1.1 100 Continue\r\n\r\n";
    let mut interim = vec![0u8; continued.len()];
    tokio::io::AsyncReadExt::read_exact(&mut stream, &mut interim).await.unwrap();
    assert_eq!(interim, continued, "the body is asked for");
    stream.write_all(push(5).as_bytes()).await.unwrap();
    assert_eq!(responses(&mut stream, 1).await[0].0, 200);
    stream.write_all(b"GET /v1/push HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    assert_eq!(responses(&mut stream, 1).await[0].0, 405);
    // A request without a valid key ends its connection (hyper's, here; the plain path's in
    // the next test), so it cannot hold an API connection by asking again and again.
    stream.write_all(request("/v1/push", "", &push(99)).as_bytes()).await.unwrap();
    let refused = responses(&mut stream, 2).await;
    assert_eq!(refused.len(), 1, "one answer, then the end");
    assert_eq!((refused[0].0, header(&refused[0].1, "connection")), (401, Some("close")));
    for n in 1..=5 {
        assert_eq!(next_json(&mut a).await["data"], n, "each push delivered once, in order");
    }
    let text = metrics(t.admin).await;
    assert_eq!(metric(&text, r#"pushline_api_requests_total{route="push",status="200"}"#), 5.0);
    assert_eq!(metric(&text, r#"pushline_api_requests_total{route="push",status="400"}"#), 1.0);
    assert_eq!(metric(&text, r#"pushline_api_requests_total{route="push",status="401"}"#), 1.0);
    assert_eq!(metric(&text, r#"pushline_api_requests_total{route="push",status="405"}"#), 1.0);
}

/// A request refused on its head while its body is still on the way is answered, then the
/// connection is closed; one whose body stops coming is answered 408; an idle connection
/// is closed after the request timeout.
#[tokio::test]
async fn refused_and_stalled_requests_end_their_connection_answered() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t = start(|c| {
        c.api_key = Some("an-api-key-of-at-least-32-bytes-long".into());
        c.handshake_timeout = std::time::Duration::from_secs(1);
    })
    .await;
    let key = "Authorization: Bearer an-api-key-of-at-least-32-bytes-long\r\n";
    let cases = [
        ("", 100_000, 401, "missing or wrong API key"),
        ("", 8, 401, "missing or wrong API key"),
        (key, 100_000_000, 413, "request body over"),
        (key, 100, 408, "request body not received within 1s"),
    ];
    for (extra, length, status, error) in cases {
        let mut stream = tokio::net::TcpStream::connect(t.client).await.unwrap();
        let head = format!("POST /v1/broadcast HTTP/1.1\r\nHost: x\r\n{extra}Content-Length: {length}\r\n\r\n{{\"data\":");
        stream.write_all(head.as_bytes()).await.unwrap();
        let answered = responses(&mut stream, 1).await;
        let (got, fields, body) = &answered[0];
        assert_eq!(*got, status, "{body}");
        assert!(body.contains(error), "{body}");
        assert_eq!(header(fields, "connection"), Some("close"));
        // More of the body is taken and dropped, then the connection ends.
        let _ = stream.write_all(&[b' '; 4096]).await;
        let mut rest = Vec::new();
        let ended = tokio::time::timeout(std::time::Duration::from_secs(10), stream.read_to_end(&mut rest)).await;
        assert!(ended.is_ok(), "closed after {status}");
    }
    // A body whose end cannot be known is refused in JSON, as every other refusal is, and
    // its connection ends: nothing after it can be read as the next request.
    for lengths in ["Content-Length: 5\r\nContent-Length: 5\r\n", "Content-Length: -5\r\n", "Content-Length: 5x\r\n", "Content-Length: 1000000000000\r\n"] {
        let mut stream = tokio::net::TcpStream::connect(t.client).await.unwrap();
        let smuggled = request("/v1/broadcast", key, r#"{"data":"smuggled"}"#);
        let head = format!("POST /v1/broadcast HTTP/1.1\r\nHost: x\r\n{key}{lengths}\r\n{{\"a\"}}{smuggled}");
        stream.write_all(head.as_bytes()).await.unwrap();
        let answered = responses(&mut stream, 1).await;
        let (got, fields, body) = &answered[0];
        assert_eq!(*got, 400, "{lengths}: {body}");
        assert!(body.contains("Content-Length must be given once"), "{lengths}: {body}");
        assert_eq!(header(fields, "connection"), Some("close"), "{lengths}");
        let mut rest = Vec::new();
        let ended = tokio::time::timeout(std::time::Duration::from_secs(10), stream.read_to_end(&mut rest)).await;
        assert!(matches!(ended, Ok(Ok(0)) | Ok(Err(_))), "{lengths}: no second answer, the connection ends: {:?}", String::from_utf8_lossy(&rest));
    }
    // An answered connection that sends nothing more is closed once its timeout passes.
    let mut idle = tokio::net::TcpStream::connect(t.client).await.unwrap();
    idle.write_all(request("/v1/broadcast", key, r#"{"data":1}"#).as_bytes()).await.unwrap();
    assert_eq!(responses(&mut idle, 1).await[0].0, 200);
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(std::time::Duration::from_secs(10), idle.read_to_end(&mut rest)).await;
    assert!(matches!(closed, Ok(Ok(0))), "an idle connection is closed: {closed:?}");
}
