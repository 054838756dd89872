//! The admin listener: `/metrics`, `/healthz`, `/readyz`.
//!
//! It runs on a runtime and thread of its own (as TiKV's status server does), so a
//! scrape or a profile never waits behind client traffic, and client traffic never waits
//! behind it. It reads the hub's counters and the metrics registry; it never touches a
//! connection.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;

use crate::hub::Hub;
use crate::telemetry::Metrics;

/// How often histogram samples are folded into buckets between scrapes.
const UPKEEP_PERIOD: Duration = Duration::from_secs(5);

pub struct Admin {
    pub hub: Arc<Hub>,
    pub metrics: Arc<Metrics>,
}

/// Serves the admin endpoints on `listener` from a new thread until `stop` fires.
pub fn start(listener: std::net::TcpListener, admin: Admin, stop: CancellationToken) -> std::io::Result<std::thread::JoinHandle<()>> {
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let admin = Arc::new(admin);
    std::thread::Builder::new().name("pushline-admin".into()).spawn(move || {
        runtime.block_on(async move {
            let listener = match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => return tracing::error!(error = %e, "admin listener unusable"),
            };
            let upkeep = admin.clone();
            tokio::spawn(async move {
                let mut ticks = tokio::time::interval(UPKEEP_PERIOD);
                loop {
                    ticks.tick().await;
                    upkeep.metrics.run_upkeep();
                }
            });
            loop {
                let (stream, _) = tokio::select! {
                    _ = stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            tracing::warn!(error = %e, "admin accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                };
                let admin = admin.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let admin = admin.clone();
                        async move { Ok::<_, Infallible>(route(req, &admin)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                });
            }
        })
    })
}

fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(content_type));
    response
}

fn route(req: Request<hyper::body::Incoming>, admin: &Admin) -> Response<Full<Bytes>> {
    const TEXT: &str = "text/plain; charset=utf-8";
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => reply(StatusCode::OK, TEXT, "ok\n"),
        (&Method::GET, "/readyz") if admin.hub.is_accepting() => reply(StatusCode::OK, TEXT, "ready\n"),
        (&Method::GET, "/readyz") => reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, "shutting down\n"),
        (&Method::GET, "/metrics") => reply(StatusCode::OK, "text/plain; version=0.0.4", admin.metrics.render()),
        (_, path) => reply(StatusCode::NOT_FOUND, TEXT, format!("no admin endpoint {path}; see /metrics, /healthz, /readyz\n")),
    }
}
