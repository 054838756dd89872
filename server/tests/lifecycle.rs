//! The real binary: graceful shutdown on signals, and an accept loop that survives a full
//! file table.

mod common;

use common::*;
use futures_util::StreamExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

async fn expect_close(ws: &mut Ws, code: u16) {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await.expect("close within the wait") {
            Some(Ok(Message::Close(Some(frame)))) => return assert_eq!(u16::from(frame.code), code),
            Some(Ok(Message::Ping(_))) => continue,
            other => panic!("expected close {code}, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn shutdown_delivers_what_was_queued_then_closes_with_1001() {
    let t = start(|_| {}).await;
    let (mut ws, _) = ws(t.client, "uid=a").await;
    let (_, mut sse) = Sse::open(t.client, "uid=b").await;
    sse.next_event().await;
    let (_, reply) = post(t.client, "/v1/broadcast", json!({"data": "last words"})).await;
    assert_eq!(reply["delivered"], 2);
    let (client, admin) = (t.client, t.admin);
    t.server.shutdown().await;
    assert_eq!(next_json(&mut ws).await["data"], "last words");
    expect_close(&mut ws, 1001).await;
    assert_eq!(sse.next_event().await.2["data"], "last words");
    assert!(tokio::net::TcpStream::connect(client).await.is_err(), "client listener is closed");
    assert!(tokio::net::TcpStream::connect(admin).await.is_err(), "admin listener is closed");
}

#[tokio::test]
async fn sigterm_closes_clients_with_1001_and_exits_0() {
    let mut server = Process::spawn(&[], None);
    let (mut ws, _) = ws(server.client, "uid=a").await;
    let ready = reqwest::get(format!("http://{}/readyz", server.admin)).await.unwrap();
    assert_eq!(ready.status(), 200);
    server.signal(libc::SIGTERM);
    expect_close(&mut ws, 1001).await;
    let status = tokio::task::spawn_blocking(move || server.wait()).await.unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn sigint_is_graceful_too() {
    let mut server = Process::spawn(&[], None);
    let (mut ws, _) = ws(server.client, "uid=a").await;
    server.signal(libc::SIGINT);
    expect_close(&mut ws, 1001).await;
    let status = tokio::task::spawn_blocking(move || server.wait()).await.unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn a_cpu_profile_in_progress_does_not_hold_shutdown() {
    let mut server = Process::spawn(&["--shutdown-grace", "1s"], None);
    // Two long profiles asked for at once: one runs, the other is refused (one at a
    // time), and that refusal says the first is running.
    let profile = format!("http://{}/debug/pprof/profile?seconds=120", server.admin);
    let (mut a, mut b) = (tokio::spawn(reqwest::get(profile.clone())), tokio::spawn(reqwest::get(profile)));
    let refused = tokio::time::timeout(WAIT, async {
        tokio::select! {
            r = &mut a => r.unwrap().unwrap().status(),
            r = &mut b => r.unwrap().unwrap().status(),
        }
    });
    assert_eq!(refused.await.expect("one profile is refused at once"), 409);
    let started = std::time::Instant::now();
    server.signal(libc::SIGTERM);
    let status = tokio::task::spawn_blocking(move || server.wait()).await.unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(started.elapsed() < std::time::Duration::from_secs(8), "shutdown took {:?}", started.elapsed());
}

#[tokio::test]
async fn a_second_signal_exits_at_once() {
    use tokio::io::AsyncWriteExt;
    let mut server = Process::spawn(&["--shutdown-grace", "60s"], None);
    // A publish whose body never finishes keeps the first phase waiting for it.
    let mut slow = tokio::net::TcpStream::connect(server.client).await.unwrap();
    let head = "POST /v1/broadcast HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"data\":";
    slow.write_all(head.as_bytes()).await.unwrap();
    let (status, _) = post(server.client, "/v1/broadcast", json!({"data": 1})).await;
    assert_eq!(status, 200);
    server.signal(libc::SIGTERM);
    server.wait_log("phase=\"draining\"");
    let second = std::time::Instant::now();
    server.signal(libc::SIGTERM);
    let status = tokio::task::spawn_blocking(move || server.wait()).await.unwrap();
    assert_eq!(status.code(), Some(130), "a second signal exits at once, with 130");
    assert!(second.elapsed() < std::time::Duration::from_secs(5));
}

const FILE_LIMIT: u64 = 48;

fn low_file_limit() -> std::io::Result<()> {
    let limit = libc::rlimit { rlim_cur: FILE_LIMIT, rlim_max: FILE_LIMIT };
    // SAFETY: setrlimit with a valid struct; runs in the child between fork and exec.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[tokio::test]
async fn accept_loop_survives_a_full_file_table() {
    let server = Process::spawn(&[], Some(low_file_limit));
    let warned = server.startup_log.iter().any(|line| line.contains("max_connections is above the open-file limit"));
    assert!(warned, "the server warns that max_connections is above its file limit: {:?}", server.startup_log);

    let (mut first, _) = ws(server.client, "uid=first").await;
    // Publisher and scraper connect now and keep their connections: past the limit, new
    // connections wait in the backlog, on the admin port too.
    let http = reqwest::Client::new();
    let scrape = || async { http.get(format!("http://{}/metrics", server.admin)).send().await.unwrap().text().await.unwrap() };
    let push = || async {
        let body = json!({"uids": ["first"], "data": "ok"}).to_string();
        let response = http.post(format!("http://{}/v1/push", server.client)).body(body).send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json::<serde_json::Value>().await.unwrap())
    };
    assert!(scrape().await.contains("pushline_connections"));
    assert_eq!(push().await.0, 200);
    assert_eq!(next_json(&mut first).await["data"], "ok");
    // Open more connections than the process has files for; the ones past the limit wait
    // in the listen backlog (their handshake times out here) while the server backs off.
    let mut open = Vec::new();
    let mut stuck = 0;
    for i in 0..FILE_LIMIT {
        let url = format!("ws://{}/ws?uid=c{i}", server.client);
        match tokio::time::timeout(std::time::Duration::from_millis(300), tokio_tungstenite::connect_async(url)).await {
            Ok(Ok((ws, _))) => open.push(ws),
            _ => stuck += 1,
        }
    }
    assert!(stuck > 0, "the file limit was reached");
    let errors = metric(&scrape().await, r#"pushline_accept_errors_total{kind="file_limit"}"#);
    assert!(errors > 0.0, "accept errors are counted");

    // Open connections keep being served.
    let (status, reply) = push().await;
    assert_eq!((status, reply["delivered"].as_u64()), (200, Some(1)), "{reply}");
    assert_eq!(next_json(&mut first).await["data"], "ok");

    // With files freed, new connections are accepted again.
    drop(open);
    let (_again, welcome) = ws(server.client, "uid=again").await;
    assert_eq!(welcome["uid"], "again");
}
