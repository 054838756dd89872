//! `pusher`: the Pusher protocol's fan-out against the native one, in one run. N Pusher
//! clients (`/app/KEY?protocol=7`) subscribe to a public channel and the Pusher HTTP API
//! (signed as the `pusher` libraries sign) sends it 100-byte events; then N native
//! clients subscribed to a topic get the same through `/v1/publish`. Time to the last
//! client and server CPU per delivery for each, and their ratio.

use std::time::{Duration, Instant};

use md5::{Digest, Md5};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::client;
use crate::driver::{http, ServerProcess};
use crate::report::Row;
use crate::Common;

/// The bench app: id, key, secret.
pub const APP: (&str, &str, &str) = ("bench", "bench-key", "bench-secret-0123456789");

struct Figures {
    last_client_ms: f64,
    cpu_us: f64,
}

/// A Pusher client of the bench app, subscribed to the public `channel` (its answer read).
pub async fn subscribed(server: std::net::SocketAddr, i: usize, spread: u8, channel: &str) -> std::io::Result<client::Stream> {
    let path = format!("/app/{}?protocol=7&client=bench{i}", APP.1);
    let opened = client::open(server, client::source_ip(i, spread), &path, None).await?;
    let mut stream = opened.stream;
    let subscribe = serde_json::json!({ "event": "pusher:subscribe", "data": { "channel": channel } }).to_string();
    stream.write_all(&client::text_frame(subscribe.as_bytes())).await?;
    let mut buf = opened.rest;
    loop {
        while let Some((_, payload, used)) = client::frame_payload(&buf) {
            if String::from_utf8_lossy(&buf[payload]).contains("pusher_internal:subscription_succeeded") {
                return Ok(stream);
            }
            buf.drain(..used);
        }
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(std::io::Error::other(format!("pusher client {i} closed before subscribing")));
        }
    }
}

/// The Pusher API's query for `body`: its auth parameters and signature.
fn signed_query(path: &str, body: &str) -> String {
    let md5: String = Md5::digest(body.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
    let timestamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let query = format!("auth_key={}&auth_timestamp={timestamp}&auth_version=1.0&body_md5={md5}", APP.1);
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, APP.2.as_bytes());
    let tag: String = ring::hmac::sign(&key, format!("POST\n{path}\n{query}").as_bytes()).as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("{query}&auth_signature={tag}")
}

/// Sends `rounds` events to the clients (`send` publishes one) and times each to the last.
async fn measure<F, Fut>(server: &ServerProcess, streams: Vec<client::Stream>, rounds: usize, send: F) -> Result<Figures, String>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<String, String>>,
{
    let connections = streams.len();
    let mut rx = super::arrivals(streams);
    let mut last_ms = Vec::with_capacity(rounds);
    let cpu_before = server.cpu_time();
    for _ in 0..rounds {
        let start = Instant::now();
        send().await?;
        let mut arrived = 0;
        let mut last = Duration::ZERO;
        while arrived < connections {
            let at = tokio::time::timeout(Duration::from_secs(30), rx.recv())
                .await
                .map_err(|_| format!("only {arrived} of {connections} clients got the event"))?
                .ok_or("clients gone")?;
            last = last.max(at.saturating_duration_since(start));
            arrived += 1;
        }
        last_ms.push(last.as_secs_f64() * 1e3);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let cpu = server.cpu_time().since(cpu_before);
    last_ms.sort_by(f64::total_cmp);
    Ok(Figures { last_client_ms: last_ms[last_ms.len() / 2], cpu_us: cpu.total().as_secs_f64() * 1e6 / (connections * rounds) as f64 })
}

pub async fn run(common: &Common, connections: usize, rounds: usize) -> Result<Vec<Row>, String> {
    let data = "x".repeat(98);
    let mut args = common.server_args.clone();
    args.push(format!("--pusher-app={}:{}:{}", APP.0, APP.1, APP.2));
    let server = ServerProcess::start(&common.server_bin, &args)?;
    let (addr, spread) = (server.client, common.spread);
    let streams = super::open_in_batches(0..connections, common.parallel, "Pusher client", move |i| subscribed(addr, i, spread, "news")).await?;
    let path = format!("/apps/{}/events", APP.0);
    let body = format!(r#"{{"name":"tick","channel":"news","data":"{data}"}}"#);
    let pusher = measure(&server, streams, rounds, || {
        let target = format!("{path}?{}", signed_query(&path, &body));
        let (addr, body) = (server.client, body.clone());
        async move { http(addr, "POST", &target, &body).await }
    })
    .await?;
    drop(server);

    let server = ServerProcess::start(&common.server_bin, &common.server_args)?;
    let streams = super::open_subscribed(server.client, connections, common.parallel, common.spread, "native", "news").await?;
    let body = format!(r#"{{"topic":"news","data":"{data}"}}"#);
    let native = measure(&server, streams, rounds, || http(server.client, "POST", "/v1/publish", &body)).await?;
    Ok(vec![
        Row::new("pusher", "connections", connections as f64, "count"),
        Row::new("pusher", "pusher_time_to_last_client_median", pusher.last_client_ms, "ms"),
        Row::new("pusher", "pusher_server_cpu_per_delivery", pusher.cpu_us, "us"),
        Row::new("pusher", "native_time_to_last_client_median", native.last_client_ms, "ms"),
        Row::new("pusher", "native_server_cpu_per_delivery", native.cpu_us, "us"),
        Row::new("pusher", "cpu_per_delivery_pusher_vs_native", pusher.cpu_us / native.cpu_us, "ratio"),
    ])
}
