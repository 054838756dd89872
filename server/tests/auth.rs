//! Who may connect and publish: JWTs for clients, the API key for publishers, and the
//! refusal of open mode off loopback.

mod common;

use common::*;
use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::json;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio_tungstenite::tungstenite::Error as WsError;

const SECRET: &str = "test-secret-of-thirty-two-bytes!";
const KEY: &str = "test-api-key-of-thirty-two-bytes";

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn token(sub: &str, exp: u64, secret: &str) -> String {
    encode(&Header::default(), &json!({"sub": sub, "exp": exp}), &EncodingKey::from_secret(secret.as_bytes())).unwrap()
}

async fn secured() -> TestServer {
    start(|c| {
        c.jwt_secret = Some(SECRET.into());
        c.api_key = Some(KEY.into());
    })
    .await
}

/// The HTTP status and JSON error of a refused WebSocket handshake.
async fn refused(addr: std::net::SocketAddr, query: &str, bearer: Option<&str>) -> (u16, String) {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = format!("ws://{addr}/ws?{query}").into_client_request().unwrap();
    if let Some(token) = bearer {
        request.headers_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    match tokio_tungstenite::connect_async(request).await {
        Err(WsError::Http(response)) => {
            let body = String::from_utf8(response.body().clone().unwrap_or_default()).unwrap();
            let json: serde_json::Value = serde_json::from_str(&body).unwrap();
            (response.status().as_u16(), json["error"].as_str().unwrap().to_owned())
        }
        Ok(_) => panic!("handshake for {query} was accepted"),
        Err(e) => panic!("unexpected error {e}"),
    }
}

#[tokio::test]
async fn valid_token_in_query_or_header_sets_the_uid() {
    let t = secured().await;
    let good = token("dave", now() + 60, SECRET);
    let (_ws, welcome) = ws(t.client, &format!("token={good}")).await;
    assert_eq!(welcome["uid"], "dave");

    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = format!("ws://{}/ws", t.client).into_client_request().unwrap();
    request.headers_mut().insert("authorization", format!("Bearer {good}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(next_json(&mut ws).await["uid"], "dave");
}

#[tokio::test]
async fn bad_tokens_are_refused_with_the_reason() {
    let t = secured().await;
    let (status, why) = refused(t.client, &format!("token={}", token("e", now() - 10, SECRET)), None).await;
    assert_eq!((status, why.as_str()), (401, "token expired"));
    let (status, why) = refused(t.client, &format!("token={}", token("e", now() + 60, "other")), None).await;
    assert_eq!((status, why.as_str()), (401, "token signature does not verify"));
    let (status, why) = refused(t.client, "uid=mallory", None).await;
    assert_eq!(status, 401);
    assert!(why.starts_with("missing token"), "{why}");
    let (status, _) = refused(t.client, "", Some("not.a.jwt")).await;
    assert_eq!(status, 401);

    // alg "none": an unsigned token claiming any uid.
    use base64::Engine;
    let b64 = |v: serde_json::Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let unsigned = format!("{}.{}.", b64(json!({"alg": "none", "typ": "JWT"})), b64(json!({"sub": "admin", "exp": now() + 60})));
    let (status, why) = refused(t.client, &format!("token={unsigned}"), None).await;
    assert_eq!((status, why.as_str()), (401, "token algorithm not accepted: HS256 only"));
    // HS512 with the right secret is still not HS256.
    let hs512 = encode(
        &Header::new(jsonwebtoken::Algorithm::HS512),
        &json!({"sub": "x", "exp": now() + 60}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let (status, why) = refused(t.client, &format!("token={hs512}"), None).await;
    assert_eq!((status, why.as_str()), (401, "token algorithm not accepted: HS256 only"));

    // Not valid yet; a critical header extension; a lifetime past --jwt-max-lifetime.
    let early = encode(&Header::default(), &json!({"sub": "x", "exp": now() + 60, "nbf": now() + 30}), &EncodingKey::from_secret(SECRET.as_bytes())).unwrap();
    let (status, why) = refused(t.client, &format!("token={early}"), None).await;
    assert_eq!((status, why.as_str()), (401, "token not valid yet (nbf is in the future)"));
    let header = b64(json!({"alg": "HS256", "typ": "JWT", "crit": ["exp-ext"], "exp-ext": 1}));
    let payload = b64(json!({"sub": "x", "exp": now() + 60}));
    let signature = {
        use hmac::Mac;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
        mac.update(format!("{header}.{payload}").as_bytes());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    };
    let (status, why) = refused(t.client, &format!("token={header}.{payload}.{signature}"), None).await;
    assert_eq!(status, 401);
    assert!(why.contains("critical header parameters"), "{why}");
    let (status, why) = refused(t.client, &format!("token={}", token("x", now() + 48 * 3600, SECRET)), None).await;
    assert_eq!(status, 401);
    assert!(why.contains("--jwt-max-lifetime"), "{why}");

    let text = metrics(t.admin).await;
    assert_eq!(metric(&text, r#"pushline_connections_refused_total{reason="unauthorized"}"#), 9.0);
    assert_eq!(metric(&text, r#"pushline_connections{transport="ws"}"#), 0.0);
}

#[tokio::test]
async fn publish_api_needs_its_key() {
    let t = secured().await;
    let body = json!({"data": 1}).to_string();
    let (status, _, reply) = post_raw(t.client, "/v1/broadcast", body.clone(), None).await;
    assert_eq!(status, 401);
    assert!(reply["error"].as_str().unwrap().contains("API key"));
    let (status, _, _) = post_raw(t.client, "/v1/broadcast", body.clone(), Some("wrong")).await;
    assert_eq!(status, 401);
    let (status, _, reply) = post_raw(t.client, "/v1/broadcast", body.clone(), Some(KEY)).await;
    assert_eq!(status, 200, "{reply}");
    let response = reqwest::Client::new()
        .post(format!("http://{}/v1/broadcast", t.client))
        .header("x-api-key", KEY)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let text = metrics(t.admin).await;
    assert_eq!(metric(&text, r#"pushline_api_requests_total{route="broadcast",status="401"}"#), 2.0);
}

#[test]
fn open_mode_refuses_a_public_bind() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pushline"))
        .args(["--listen", "0.0.0.0:0", "--admin-listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("open mode (no --jwt-secret) refuses a non-loopback listener: --listen 0.0.0.0:0"), "{stderr}");

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pushline"))
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--jwt-secret", SECRET])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("the publish API has no key"), "a JWT secret without an API key is refused");
}

/// Runs the binary with `args` and `env`, expecting it to refuse to start; returns stderr.
fn refused_to_start(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pushline"))
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{args:?} {env:?} should be refused");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn empty_or_short_secrets_are_refused_at_start() {
    let empty_env = refused_to_start(&["--api-key", KEY], &[("PUSHLINE_JWT_SECRET", "")]);
    assert!(empty_env.contains("--jwt-secret is empty"), "{empty_env}");
    let short = refused_to_start(&["--jwt-secret", "hunter2", "--api-key", KEY], &[]);
    assert!(short.contains("--jwt-secret is 7 bytes; use at least 32"), "{short}");
    let empty_key = refused_to_start(&["--jwt-secret", SECRET, "--api-key", ""], &[]);
    assert!(empty_key.contains("--api-key is empty"), "{empty_key}");
    let dir = std::env::temp_dir().join(format!("pushline-secret-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("pushline.toml");
    std::fs::write(&file, format!("jwt_secret = \"\"\napi_key = \"{KEY}\"\n")).unwrap();
    let from_file = refused_to_start(&["--config", file.to_str().unwrap()], &[]);
    assert!(from_file.contains("--jwt-secret is empty"), "{from_file}");
    std::fs::remove_dir_all(&dir).unwrap();
    // With tokens required, the admin endpoints stay on loopback.
    let public_admin = refused_to_start(&["--jwt-secret", SECRET, "--api-key", KEY, "--admin-listen", "0.0.0.0:0"], &[]);
    assert!(public_admin.contains("--admin-listen 0.0.0.0:0 is not loopback"), "{public_admin}");
}
