//! `hook`: what `--connect-hook` adds to a connect. A local application (in this process:
//! it reads each request and answers 200 `{}` on a keep-alive connection, doing no work of
//! its own) is asked for every connect. N clients connect, `parallel` at a time, each
//! timed from its TCP connect to its welcome, and each closed at once; the same against
//! the server without the hook, in the same run. Reports p50/p99 of each, what the hook
//! added, and server CPU per connect.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::client;
use crate::driver::ServerProcess;
use crate::report::Row;
use crate::Common;

/// Answers every request 200 `{}`, keeping each connection alive.
async fn application() -> Result<SocketAddr, String> {
    let listener = TcpListener::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::with_capacity(4096);
                loop {
                    let Some(head) = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|at| at + 4) else {
                        if stream.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                            return;
                        }
                        continue;
                    };
                    let text = String::from_utf8_lossy(&buf[..head]).to_ascii_lowercase();
                    let length = text.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse::<usize>().ok()).unwrap_or(0);
                    while buf.len() < head + length {
                        if stream.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                            return;
                        }
                    }
                    buf.drain(..head + length);
                    if stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}").await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok(addr)
}

/// Connects `n` clients, `parallel` at a time, closing each once welcomed; returns each
/// connect's time, sorted, and the server's CPU for all of them.
async fn connects(server: &ServerProcess, n: usize, parallel: usize, spread: u8) -> Result<(Vec<Duration>, Duration), String> {
    let cpu0 = server.cpu_time();
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(parallel));
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        let (addr, permits) = (server.client, permits.clone());
        set.spawn(async move {
            let _permit = permits.acquire().await.map_err(|e| e.to_string())?;
            let start = Instant::now();
            let opened = client::open(addr, client::source_ip(i, spread), &format!("uid=hook{i}"), None).await.map_err(|e| format!("connect {i}: {e}"))?;
            let took = start.elapsed();
            drop(opened);
            Ok::<_, String>(took)
        });
    }
    let mut times = Vec::with_capacity(n);
    while let Some(joined) = set.join_next().await {
        times.push(joined.map_err(|e| e.to_string())??);
    }
    times.sort();
    Ok((times, server.cpu_time().since(cpu0).total()))
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1000.0
}

pub async fn run(common: &Common, n: usize, parallel: usize) -> Result<Vec<Row>, String> {
    let app = application().await?;
    let mut rows = Vec::new();
    let mut p50s = [0.0; 2];
    let mut p99s = [0.0; 2];
    for (i, hooked) in [false, true].into_iter().enumerate() {
        let mut args = common.server_args.clone();
        if hooked {
            args.extend([format!("--connect-hook=http://{app}/connect"), format!("--hook-max-concurrency={}", parallel.max(1))]);
        }
        let server = ServerProcess::start(&common.server_bin, &args)?;
        // Warm: the pool's connections to the application, the server's first allocations.
        connects(&server, parallel.min(n), parallel, common.spread).await?;
        let (times, cpu) = connects(&server, n, parallel, common.spread).await?;
        let (p50, p99) = (percentile(&times, 0.5), percentile(&times, 0.99));
        (p50s[i], p99s[i]) = (p50, p99);
        rows.push(Row::new("hook", if hooked { "hooked_connect_p50" } else { "plain_connect_p50" }, p50, "ms"));
        rows.push(Row::new("hook", if hooked { "hooked_connect_p99" } else { "plain_connect_p99" }, p99, "ms"));
        rows.push(Row::new("hook", if hooked { "hooked_server_cpu_per_connect" } else { "plain_server_cpu_per_connect" }, cpu.as_secs_f64() * 1e6 / n as f64, "us"));
        if hooked {
            let asked = server.metric(r#"pushline_hook_requests_total{hook="connect",outcome="admitted"}"#).await;
            rows.push(Row::new("hook", "hook_questions_per_connect", asked / (n + parallel.min(n)) as f64, "x"));
        }
    }
    rows.push(Row::new("hook", "added_p50", p50s[1] - p50s[0], "ms"));
    rows.push(Row::new("hook", "added_p99", p99s[1] - p99s[0], "ms"));
    Ok(rows)
}
