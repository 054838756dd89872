//! The admin listener: metrics, health, profiles and live introspection.
//!
//! It runs on a runtime and thread of its own (as TiKV's status server does), so a
//! scrape or a profile never waits behind client traffic, and client traffic never waits
//! behind it. It reads the hub's maps and counters, the allocator's site table and
//! jemalloc; it never touches a connection's socket. Allocations here are charged to
//! the `admin` site.

mod memory;
mod profile;
pub use profile::SYMBOLIZE;
mod query;
mod stats;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use pushline_alloc::socket::SocketMemory;
use pushline_alloc::Site;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::cores::Cores;
use crate::error::{Error, Kind};
use crate::http;
use crate::hub::Hub;
use crate::shutdown::Shutdown;
use crate::telemetry::{Metrics, RefuseReason};

/// How often histogram samples are folded into buckets between scrapes.
const UPKEEP_PERIOD: Duration = Duration::from_secs(5);

/// Admin connections open at once: scrapers, operators and their tools, not crowds.
const MAX_CONNECTIONS: usize = 64;
/// Time an admin request's head may take, and an idle connection may wait for its next.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Most bytes buffered for a request head (hyper's minimum).
const MAX_HEAD_BUFFER: usize = 8 * 1024;

/// What the admin endpoints read.
pub struct Admin {
    pub hub: Arc<Hub>,
    pub metrics: Arc<Metrics>,
    pub shutdown: Arc<Shutdown>,
    /// The serving runtimes, whose task counts the admin reports: the one that accepts
    /// and the connections' cores.
    pub runtime: tokio::runtime::Handle,
    pub cores: Arc<Cores>,
    /// Bearer token every route requires (`--admin-token`); None: loopback only, no token.
    pub token: Option<String>,
    /// The always-on CPU profiler (one per process).
    pub profiler: Arc<pushline_profiler::Profiler>,
}

/// The running admin listener.
pub struct Running {
    stop: CancellationToken,
    stopped: oneshot::Receiver<()>,
}

impl Running {
    /// Stops the listener and waits, at most `grace`, for its thread to end.
    pub async fn stop(self, grace: Duration) {
        self.stop.cancel();
        if tokio::time::timeout(grace, self.stopped).await.is_err() {
            tracing::warn!("the admin listener did not stop within {grace:?}; leaving it");
        }
    }
}

/// Serves the admin endpoints on `listener` from a new thread until stopped.
pub fn start(listener: std::net::TcpListener, admin: Admin) -> std::io::Result<Running> {
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let admin = Arc::new(admin);
    let stop = CancellationToken::new();
    let (stopped_tx, stopped) = oneshot::channel();
    let stopping = stop.clone();
    std::thread::Builder::new().name("pushline-admin".into()).spawn(move || {
        let _site = Site::Admin.enter();
        runtime.block_on(serve(listener, admin, stopping));
        // Blocking tasks (a symbolizing worker's output) are left to finish or die with the process.
        runtime.shutdown_timeout(Duration::from_millis(100));
        let _ = stopped_tx.send(());
    })?;
    Ok(Running { stop, stopped })
}

async fn serve(listener: std::net::TcpListener, admin: Arc<Admin>, stop: CancellationToken) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => return tracing::error!(error = %e, "admin listener unusable"),
    };
    let upkeep = admin.clone();
    tokio::spawn(Site::Metrics.instrument(async move {
        let mut ticks = tokio::time::interval(UPKEEP_PERIOD);
        loop {
            ticks.tick().await;
            upkeep.metrics.run_upkeep();
        }
    }));
    let places = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (mut stream, _) = tokio::select! {
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
        let Ok(place) = places.clone().try_acquire_owned() else {
            admin.metrics.refused(RefuseReason::AdminConnections);
            let error = Error::new(Kind::Overloaded, format!("the admin listener has {MAX_CONNECTIONS} connections open"));
            tokio::spawn(async move { http::respond_error(&mut stream, &error, "").await });
            continue;
        };
        let admin = admin.clone();
        tokio::spawn(Site::Admin.instrument(async move {
            let _place = place;
            let service = hyper::service::service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(route(req, &admin).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(REQUEST_TIMEOUT)
                .max_buf_size(MAX_HEAD_BUFFER)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        }));
    }
}

type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Reply {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(content_type));
    response
}

fn json(value: &serde_json::Value) -> Reply {
    reply(StatusCode::OK, "application/json", value.to_string())
}

fn error(status: StatusCode, message: &str) -> Reply {
    reply(status, "application/json", serde_json::json!({ "error": message }).to_string())
}

/// A request's query string, parsed.
pub struct Query(Vec<(String, String)>);

impl Query {
    fn parse(req: &Request<hyper::body::Incoming>) -> Result<Query, Reply> {
        http::query_pairs(req.uri().query().unwrap_or("")).map(Query).map_err(|e| error(StatusCode::BAD_REQUEST, &e.message))
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// A whole number within `range`, or `default` when absent; a 400 otherwise.
    fn number(&self, name: &str, default: u64, range: std::ops::RangeInclusive<u64>) -> Result<u64, Reply> {
        let Some(text) = self.get(name) else { return Ok(default) };
        match text.parse::<u64>() {
            Ok(n) if range.contains(&n) => Ok(n),
            _ => Err(error(
                StatusCode::BAD_REQUEST,
                &format!("{name}={text}: expected a whole number from {} to {}", range.start(), range.end()),
            )),
        }
    }
}

/// The dashboard and what it loads: static, shipped in the binary, and holding no data, so
/// served without the admin token (the page asks for it to read the endpoints).
fn asset(path: &str) -> Option<(&'static str, &'static [u8])> {
    match path {
        "/" => Some(("text/html; charset=utf-8", include_bytes!("dashboard/index.html"))),
        "/assets/uplot.min.js" => Some(("text/javascript", include_bytes!("dashboard/uplot.min.js"))),
        "/assets/uplot.min.css" => Some(("text/css", include_bytes!("dashboard/uplot.min.css"))),
        "/assets/UPLOT-LICENSE" => Some(("text/plain; charset=utf-8", include_bytes!("dashboard/UPLOT-LICENSE"))),
        _ => None,
    }
}

async fn route(req: Request<hyper::body::Incoming>, admin: &Admin) -> Reply {
    const TEXT: &str = "text/plain; charset=utf-8";
    if let (&Method::GET, Some((kind, body))) = (req.method(), asset(req.uri().path())) {
        return reply(StatusCode::OK, kind, Bytes::from_static(body));
    }
    if let Some(token) = &admin.token {
        let given = req.headers().get(hyper::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(http::bearer_token);
        if !given.is_some_and(|g| crate::auth::same_secret(g.as_bytes(), token.as_bytes())) {
            return error(StatusCode::UNAUTHORIZED, "the admin endpoints need Authorization: Bearer <--admin-token>");
        }
    }
    let query = match Query::parse(&req) {
        Ok(query) => query,
        Err(reply) => return reply,
    };
    if req.method() == Method::POST && req.uri().path() == "/debug/memory/purge" {
        return match pushline_alloc::jemalloc::purge() {
            Ok(()) => json(&memory::memory(admin)),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e),
        };
    }
    if req.method() != Method::GET {
        return error(StatusCode::METHOD_NOT_ALLOWED, "admin endpoints take GET (and POST /debug/memory/purge)");
    }
    match req.uri().path() {
        "/healthz" => reply(StatusCode::OK, TEXT, "ok\n"),
        "/readyz" if admin.shutdown.is_serving() => reply(StatusCode::OK, TEXT, "ready\n"),
        "/readyz" => reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, "shutting down\n"),
        "/metrics" => {
            admin.metrics.record_profiler(&admin.profiler.stats());
            let text = Site::Metrics.scope(|| admin.metrics.render(admin.cores.counts(&admin.runtime)));
            reply(StatusCode::OK, "text/plain; version=0.0.4", text)
        }
        "/debug/pprof/profile" => profile::cpu(&query, &admin.profiler).await,
        "/debug/pprof/heap" => profile::heap(&query).await,
        "/debug/memory" => match query.get("sockets") {
            None | Some("all") => json(&memory::memory(admin)),
            Some("sample") => json(&memory::memory_with(admin, SocketMemory::sample_of_this_process(stats::SOCKETS_SAMPLED))),
            Some(other) => error(StatusCode::BAD_REQUEST, &format!("sockets={other}: expected all (every socket's SO_MEMINFO) or sample (512 of them)")),
        },
        "/debug/stats" => json(&Site::Admin.scope(|| stats::stats(admin))),
        "/debug/objects" => json(&memory::objects(admin)),
        "/debug/connections" => match query.number("limit", 100, 1..=100_000) {
            Ok(limit) => json(&serde_json::json!({
                "total": admin.hub.total_connections(),
                "connections": admin.hub.describe(limit as usize),
            })),
            Err(reply) => reply,
        },
        "/debug/query" => json(&query::list()),
        path if path.starts_with("/debug/query/") => match query::run(admin, &path["/debug/query/".len()..], &query).await {
            Ok(answer) => json(&answer),
            Err(refusal) => error(StatusCode::BAD_REQUEST, &refusal),
        },
        path if path.starts_with("/debug/sessions/") => {
            let raw = &path["/debug/sessions/".len()..];
            let uid = match http::decode_component(raw) {
                Ok(uid) => uid,
                Err(e) => return error(StatusCode::BAD_REQUEST, &e.message),
            };
            let connections = admin.hub.describe_uid(&uid);
            if connections.is_empty() {
                error(StatusCode::NOT_FOUND, &format!("uid `{uid}` has no connection on this node"))
            } else {
                json(&serde_json::json!({ "uid": uid, "connections": connections }))
            }
        }
        path => error(
            StatusCode::NOT_FOUND,
            &format!("no admin endpoint {path}; see / (the dashboard), /metrics, /healthz, /readyz, /debug/stats, /debug/pprof/profile, /debug/pprof/heap, /debug/memory (POST /debug/memory/purge), /debug/objects, /debug/connections, /debug/sessions/<uid>, /debug/query/<name>"),
        ),
    }
}
