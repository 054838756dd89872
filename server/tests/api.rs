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
