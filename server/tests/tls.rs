//! TLS on the client listener, with real TLS clients (rustls through tokio-rustls, and
//! curl): wss://, https:// for the publish API and SSE, resumption, certificate reload,
//! and the errors. Certificates are made here with rcgen, never committed.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use futures_util::StreamExt;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::Message;

/// A certificate for `localhost`, written to `dir` as `{name}.pem` and `{name}.key`.
fn certificate(dir: &Path, name: &str) -> (CertificateDer<'static>, PathBuf, PathBuf) {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (cert, key) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
    (made.cert.der().clone(), cert, key)
}

fn scratch_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pushline-tls-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A client that trusts `cert` only, and keeps session tickets for resumption.
fn trusting(cert: &CertificateDer<'static>) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

async fn connect(addr: std::net::SocketAddr, tls: &TlsConnector) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tls.connect(ServerName::try_from("localhost").unwrap(), tcp).await
}

/// One HTTP/1.1 request over TLS; the status and the body read to the end.
async fn https(addr: std::net::SocketAddr, tls: &TlsConnector, request: &str) -> (u16, String) {
    let mut stream = connect(addr, tls).await.expect("TLS connects");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(WAIT, stream.read_to_string(&mut response)).await.unwrap().ok();
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

async fn publish(addr: std::net::SocketAddr, tls: &TlsConnector, topic: &str, data: Value) -> Value {
    let body = json!({"topic": topic, "data": data}).to_string();
    let request = format!("POST /v1/publish HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
    let (status, reply) = https(addr, tls, &request).await;
    assert_eq!(status, 200, "{reply}");
    serde_json::from_str(&reply).unwrap()
}

type Wss = tokio_tungstenite::WebSocketStream<TlsStream<TcpStream>>;

async fn wss(addr: std::net::SocketAddr, tls: &TlsConnector, query: &str) -> Wss {
    let stream = connect(addr, tls).await.expect("TLS connects");
    let (mut ws, _) = tokio_tungstenite::client_async(format!("wss://localhost/ws?{query}"), stream).await.expect("WebSocket over TLS");
    let welcome = next(&mut ws).await;
    assert_eq!(welcome["type"], "welcome");
    ws
}

async fn next(ws: &mut Wss) -> Value {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await.expect("a frame in time").expect("open").expect("frame") {
            Message::Text(text) => return serde_json::from_str(&text).unwrap(),
            _ => continue,
        }
    }
}

async fn tls_server(cert: &Path, key: &Path, tweak: impl FnOnce(&mut pushline::Config)) -> TestServer {
    let (cert, key) = (cert.to_owned(), key.to_owned());
    start(move |c| {
        c.tls_cert = Some(cert);
        c.tls_key = Some(key);
        tweak(c);
    })
    .await
}

#[tokio::test]
async fn websocket_sse_and_the_publish_api_speak_tls() {
    let dir = scratch_dir("speak");
    let (der, cert, key) = certificate(&dir, "a");
    let t = tls_server(&cert, &key, |_| {}).await;
    let tls = trusting(&der);
    let mut ws = wss(t.client, &tls, "uid=alice&topics=news").await;
    let reply = publish(t.client, &tls, "news", json!({"hello": "tls"})).await;
    let got = next(&mut ws).await;
    assert_eq!((&got["data"], &got["id"]), (&json!({"hello": "tls"}), &reply["id"]));

    // A large message, several TLS records long, arrives whole.
    let big = "x".repeat(50_000);
    publish(t.client, &tls, "news", json!(big)).await;
    assert_eq!(next(&mut ws).await["data"], json!(big));

    // SSE over TLS.
    let mut sse = connect(t.client, &tls).await.unwrap();
    sse.write_all(b"GET /sse?uid=bob&topics=news HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    publish(t.client, &tls, "news", json!("for sse")).await;
    let mut seen = String::new();
    while !seen.contains("for sse") {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(WAIT, sse.read(&mut chunk)).await.unwrap().unwrap();
        assert!(n > 0, "SSE stream ended: {seen}");
        seen.push_str(&String::from_utf8_lossy(&chunk[..n]));
    }
    assert!(seen.starts_with("HTTP/1.1 200 OK") && seen.contains("event: welcome"), "{seen}");
    let text = metrics(t.admin).await;
    let handshakes = metric(&text, r#"pushline_tls_handshakes_total{kind="full"}"#) + metric(&text, r#"pushline_tls_handshakes_total{kind="resumed"}"#);
    assert_eq!(handshakes, 5.0, "a WebSocket, three publishes and an SSE stream");
    let expiry = metric(&text, "pushline_tls_cert_expiry_seconds");
    assert!(expiry > 86_400.0, "the certificate's time left is exported: {expiry}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_second_connection_resumes_even_on_another_server_with_the_shared_ticket_key() {
    let dir = scratch_dir("resume");
    let (der, cert, key) = certificate(&dir, "a");
    let ticket_key = dir.join("ticket.key");
    std::fs::write(&ticket_key, [42u8; 32]).unwrap();
    let tls = trusting(&der);
    let first = tls_server(&cert, &key, |c| c.tls_ticket_key = Some(ticket_key.clone())).await;
    let mut full = connect(first.client, &tls).await.unwrap();
    // TLS 1.3 tickets come after the handshake: a read takes them in.
    full.write_all(b"GET /nowhere HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut sink = Vec::new();
    full.read_to_end(&mut sink).await.ok();
    assert_eq!(full.get_ref().1.handshake_kind(), Some(rustls::HandshakeKind::Full));

    let resumed = connect(first.client, &tls).await.unwrap();
    assert_eq!(resumed.get_ref().1.handshake_kind(), Some(rustls::HandshakeKind::Resumed), "same server");
    wait_metric(first.admin, r#"pushline_tls_handshakes_total{kind="resumed"}"#, |n| n >= 1.0).await;

    // Another process on the port with the same key file resumes the first one's tickets.
    let second = tls_server(&cert, &key, |c| c.tls_ticket_key = Some(ticket_key.clone())).await;
    let elsewhere = connect(second.client, &tls).await.unwrap();
    assert_eq!(elsewhere.get_ref().1.handshake_kind(), Some(rustls::HandshakeKind::Resumed), "another server, same ticket key");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_reload_swaps_the_certificate_for_new_clients_and_keeps_old_ones() {
    let dir = scratch_dir("reload");
    let (old_der, cert, key) = certificate(&dir, "live");
    let t = tls_server(&cert, &key, |_| {}).await;
    let mut old_client = wss(t.client, &trusting(&old_der), "uid=carol&topics=news").await;

    // A bad pair is refused, with the file named, and the old one stays.
    std::fs::write(&key, "not a key").unwrap();
    let mut config = pushline::Config::for_loopback();
    config.tls_cert = Some(cert.clone());
    config.tls_key = Some(key.clone());
    let error = t.server.reload(&config).unwrap_err();
    assert!(error.message.contains(&key.display().to_string()), "{}", error.message);
    let _still_old = connect(t.client, &trusting(&old_der)).await.expect("the old certificate is still served");

    let (new_der, new_cert, new_key) = certificate(&dir, "next");
    std::fs::rename(&new_cert, &cert).unwrap();
    std::fs::rename(&new_key, &key).unwrap();
    t.server.reload(&config).unwrap();
    let fresh = connect(t.client, &trusting(&new_der)).await.expect("new clients get the new certificate");
    assert_eq!(fresh.get_ref().1.peer_certificates().unwrap()[0], new_der);
    assert!(connect(t.client, &trusting(&old_der)).await.is_err(), "the old certificate is gone for new clients");

    let reply = publish(t.client, &trusting(&new_der), "news", json!("still here")).await;
    assert_eq!(next(&mut old_client).await["id"], reply["id"], "a connection made before the reload keeps going");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn bad_certificates_plain_http_and_distrustful_clients_are_refused_clearly() {
    let dir = scratch_dir("refused");
    let (_, cert, key) = certificate(&dir, "a");
    let (_, _, other_key) = certificate(&dir, "b");
    for (cert_file, key_file, says) in [
        (dir.join("missing.pem"), key.clone(), "missing.pem"),
        (cert.clone(), other_key.clone(), "does not belong to the certificate"),
        (key.clone(), key.clone(), "holds no certificate"),
    ] {
        let mut config = pushline::Config::for_loopback();
        config.tls_cert = Some(cert_file);
        config.tls_key = Some(key_file);
        let error = pushline::Server::start(config).await.err().expect("refused");
        assert!(error.message.contains(says), "{}", error.message);
    }

    let t = tls_server(&cert, &key, |_| {}).await;
    let mut plain = TcpStream::connect(t.client).await.unwrap();
    plain.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut answer = String::new();
    plain.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 400") && answer.contains("speaks TLS"), "{answer}");

    let (stranger, _, _) = certificate(&dir, "c");
    assert!(connect(t.client, &trusting(&stranger)).await.is_err(), "a client that does not trust the certificate");
    let text = metrics(t.admin).await;
    assert_eq!(metric(&text, r#"pushline_connections_refused_total{reason="not_tls"}"#), 1.0);
    wait_metric(t.admin, r#"pushline_connections_refused_total{reason="tls_handshake"}"#, |n| n == 1.0).await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn curl_publishes_over_https_with_the_ca_file() {
    let dir = scratch_dir("curl");
    let (der, cert, key) = certificate(&dir, "a");
    let t = tls_server(&cert, &key, |_| {}).await;
    let mut ws = wss(t.client, &trusting(&der), "uid=dan&topics=news").await;
    let port = t.client.port().to_string();
    let output = tokio::process::Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(&cert)
        .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
        .args(["-d", r#"{"topic":"news","data":"from curl"}"#, &format!("https://localhost:{port}/v1/publish")])
        .output()
        .await
        .expect("curl runs (apt-get install -y curl)");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let reply: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(next(&mut ws).await["id"], reply["id"]);
    std::fs::remove_dir_all(&dir).unwrap();
}
