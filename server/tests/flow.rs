//! Flow control: slow clients cost bounded memory, and every message that does not reach
//! a client is counted with its reason.

mod common;

use common::*;
use futures_util::StreamExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

const PUSHES: usize = 300;

/// Pushes `PUSHES` 50 KB messages to `uid`; returns the sum of `online` over the replies.
async fn flood(addr: std::net::SocketAddr, uid: &str) -> (usize, Vec<u16>) {
    let blob = "x".repeat(50_000);
    let (mut online, mut statuses) = (0, Vec::new());
    for i in 0..PUSHES {
        let (status, reply) = post(addr, "/v1/push", json!({"uids": [uid], "data": {"i": i, "blob": blob}})).await;
        statuses.push(status);
        online += reply["online"].as_u64().unwrap_or(0) as usize;
    }
    (online, statuses)
}

fn dropped(text: &str) -> f64 {
    ["queue_full", "slow_consumer", "connection_closed", "node_over_budget"]
        .iter()
        .map(|r| metric(text, &format!(r#"pushline_messages_dropped_total{{reason="{r}"}}"#)))
        .sum()
}

#[tokio::test]
async fn drop_oldest_bounds_the_queue_and_counts_every_drop() {
    let queue_max_bytes = 256 * 1024;
    let t = start(|c| c.queue_max_bytes = queue_max_bytes).await;
    let mut slow = slow_ws(t.client, "uid=slow").await;
    let (online, _) = flood(t.client, "slow").await;
    assert_eq!(online, PUSHES);

    let text = metrics(t.admin).await;
    let queued = metric(&text, "pushline_outbound_queued_bytes");
    assert!(queued <= queue_max_bytes as f64, "queue holds {queued} bytes, over its {queue_max_bytes}");
    assert!(metric(&text, r#"pushline_messages_dropped_total{reason="queue_full"}"#) > 0.0, "{text}");

    // The client reads again: what it gets ends with the newest message, in order.
    let mut last = None;
    while last != Some(PUSHES - 1) {
        let frame = tokio::time::timeout(WAIT, slow.next()).await.unwrap().unwrap().unwrap();
        let Message::Text(text) = frame else { continue };
        let msg: serde_json::Value = serde_json::from_str(&text).unwrap();
        if msg["type"] == "gap" {
            // What drop-oldest discarded, told before the next message.
            continue;
        }
        let i = msg["data"]["i"].as_u64().unwrap() as usize;
        assert!(last.is_none_or(|l| i > l), "{i} after {last:?}");
        last = Some(i);
    }
    wait_metric(t.admin, "pushline_outbound_queued_bytes", |v| v == 0.0).await;
    let text = metrics(t.admin).await;
    let delivered = metric(&text, "pushline_messages_delivered_total");
    assert_eq!(delivered + dropped(&text), PUSHES as f64, "every message is written or counted as dropped");
}

#[tokio::test]
async fn disconnect_policy_closes_the_slow_client() {
    let t = start(|c| c.slow_consumer = pushline::config::SlowConsumer::Disconnect).await;
    let (mut healthy, _) = ws(t.client, "uid=healthy").await;
    let mut slow = slow_ws(t.client, "uid=slow").await;
    let (online, _) = flood(t.client, "slow").await;
    wait_metric(t.admin, r#"pushline_connections_closed_total{transport="ws",reason="slow_consumer"}"#, |v| v == 1.0).await;
    wait_metric(t.admin, "pushline_outbound_queued_bytes", |v| v == 0.0).await;
    let text = metrics(t.admin).await;
    assert!(metric(&text, r#"pushline_messages_dropped_total{reason="slow_consumer"}"#) > 0.0);
    let delivered = metric(&text, "pushline_messages_delivered_total");
    assert_eq!(delivered + dropped(&text), online as f64, "every message is written or counted as dropped");

    post(t.client, "/v1/push", json!({"uids": ["healthy"], "data": "still here"})).await;
    assert_eq!(next_json(&mut healthy).await["data"], "still here");

    // The slow client's stream ends; if the close frame got through its full buffers, it says 1013.
    let drained = tokio::time::timeout(WAIT, async {
        while let Some(Ok(frame)) = slow.next().await {
            if let Message::Close(Some(close)) = frame {
                assert_eq!(u16::from(close.code), 1013);
            }
        }
    });
    drained.await.expect("the slow client's connection ends");
}

#[tokio::test]
async fn node_over_its_queue_budget_answers_503() {
    // The node's budget holds one full queue (as it must, or start-up refuses it) but
    // not two: two clients that stop reading take it.
    let t = start(|c| {
        c.queue_max_bytes = 120_000;
        c.node_queue_max_bytes = 150_000;
    })
    .await;
    let _slow = (slow_ws(t.client, "uid=slow").await, slow_ws(t.client, "uid=slow").await);
    let (_, statuses) = flood(t.client, "slow").await;
    let refused = statuses.iter().filter(|s| **s == 503).count();
    assert!(refused > 0, "some publishes were refused: {statuses:?}");
    assert!(statuses.iter().all(|s| *s == 200 || *s == 503));
    let (status, headers, reply) = post_raw(t.client, "/v1/broadcast", json!({"data": 1}).to_string(), None).await;
    assert_eq!(status, 503);
    assert_eq!(headers["retry-after"], "1");
    assert!(reply["error"].as_str().unwrap().contains("over its budget"), "{reply}");
    let text = metrics(t.admin).await;
    assert_eq!(metric(&text, r#"pushline_messages_dropped_total{reason="node_over_budget"}"#), (refused + 1) as f64);
}

#[tokio::test]
async fn max_connections_refuses_clearly_and_frees_slots() {
    let t = start(|c| c.max_connections = 2).await;
    let (mut first, _) = ws(t.client, "uid=a").await;
    let _second = ws(t.client, "uid=b").await;
    match tokio_tungstenite::connect_async(format!("ws://{}/ws?uid=c", t.client)).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 503);
            let body = String::from_utf8(response.body().clone().unwrap()).unwrap();
            assert!(body.contains("server is at max_connections (2)"), "{body}");
        }
        other => panic!("third connection should be refused, got {:?}", other.map(|_| ())),
    }
    let (status, _) = Sse::open(t.client, "uid=d").await;
    assert_eq!(status, 503);
    first.close(None).await.unwrap();
    while let Some(Ok(_)) = first.next().await {}
    wait_metric(t.admin, r#"pushline_connections{transport="ws"}"#, |v| v == 1.0).await;
    let (_third, welcome) = ws(t.client, "uid=c").await;
    assert_eq!(welcome["uid"], "c");
    let text = metrics(t.admin).await;
    assert_eq!(metric(&text, r#"pushline_connections_refused_total{reason="max_connections"}"#), 2.0);
}
