//! One publish API connection. The requests a publisher sends over and over (a `POST` to
//! `/v1/push`, `/v1/publish`, `/v1/broadcast`, `/v1/batch` or the Pusher API's
//! `/apps/...` over HTTP/1.1, its body's length given, nothing else asked of HTTP) are
//! parsed with httparse, read into one buffer kept for the connection's life, and
//! answered here. The first request that is anything else (another route or method, a
//! chunked body, `Expect`, `Connection: close`, HTTP/1.0, a head httparse refuses or that
//! outgrows the buffer) is handed to hyper with the connection and every byte already
//! read, and hyper serves the rest of it.
//!
//! Why not hyper for every request: per keep-alive push, hyper's request and response
//! header maps, its body channel, the timer it allocates for each request and its
//! dispatcher came to 8 of the push's 18 allocations and about a third of its user-space
//! CPU (`pushline-bench unicast`; the README's floor table has the figures before and
//! after).

use std::io::Write as _;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use super::pusher::PusherPost;
use super::{ends_connection, route_of, Answer, Api, PublishHead, MAX_HEAD_BUFFER};
use crate::error::Error;
use crate::http::{Prefixed, MAX_HEADERS};
use crate::shutdown::Phase;
use crate::socket::Socket;
use crate::telemetry::ApiRoute;

/// A plain request checked on its head, its body still to read.
enum Admitted<'a> {
    /// `/v1/push`, `/v1/publish`, `/v1/broadcast`, `/v1/batch`.
    Publish(super::Admitted<'a>),
    /// A Pusher HTTP API `POST`.
    Pusher(PusherPost<'a>),
}

impl Admitted<'_> {
    /// Most bytes its body may have.
    fn limit(&self, api: &Api) -> usize {
        match self {
            Admitted::Publish(publish) => publish.limit,
            Admitted::Pusher(_) => api.pusher_body_limit(),
        }
    }
}

/// Most bytes a connection's read or answer buffer keeps between requests.
const KEPT_BUFFER: usize = 16 * 1024;

/// What the bytes at the start of the buffer hold.
enum Next<'b> {
    /// A whole plain request head, `head` bytes long, its body `body` bytes; `target` is
    /// its path and query.
    Plain { route: ApiRoute, head: usize, body: usize, fields: PublishHead<'b>, target: &'b str },
    /// A publish whose `Content-Length` is repeated, or not one decimal number: where its
    /// body ends cannot be known, so it is answered and its connection ends.
    BadLength(ApiRoute),
    /// Not a whole head yet.
    Partial,
    /// A request for hyper: not plain, or not HTTP at all (hyper answers that).
    Hyper,
}

/// Reads the request head at the start of `bytes` into `headers`.
fn next<'b>(bytes: &'b [u8], headers: &mut [httparse::Header<'b>]) -> Next<'b> {
    let mut request = httparse::Request::new(headers);
    // A head over the limit is hyper's to refuse (431).
    let head = match request.parse(bytes) {
        Ok(httparse::Status::Complete(head)) if head <= MAX_HEAD_BUFFER => head,
        Ok(httparse::Status::Partial) if bytes.len() < MAX_HEAD_BUFFER => return Next::Partial,
        _ => return Next::Hyper,
    };
    let target = request.path.unwrap_or_default();
    let route = route_of(target.split_once('?').map_or(target, |(path, _)| path));
    let publishes = matches!(route, ApiRoute::Push | ApiRoute::Publish | ApiRoute::Broadcast | ApiRoute::Batch | ApiRoute::Pusher);
    if request.method != Some("POST") || request.version != Some(1) || !publishes {
        return Next::Hyper;
    }
    let mut length = None;
    for header in request.headers.iter() {
        let name = header.name;
        if name.eq_ignore_ascii_case("content-length") {
            let digits = !header.value.is_empty() && header.value.len() <= 12 && header.value.iter().all(u8::is_ascii_digit);
            if length.is_some() || !digits {
                return Next::BadLength(route);
            }
            length = std::str::from_utf8(header.value).ok().and_then(|v| v.parse::<usize>().ok());
        } else if name.eq_ignore_ascii_case("transfer-encoding") || name.eq_ignore_ascii_case("expect") || name.eq_ignore_ascii_case("upgrade") {
            return Next::Hyper;
        } else if name.eq_ignore_ascii_case("connection") && !header.value.eq_ignore_ascii_case(b"keep-alive") {
            return Next::Hyper;
        }
    }
    match length {
        Some(body) => Next::Plain { route, head, body, fields: PublishHead::read(request.headers.iter().map(|h| (h.name, h.value))), target },
        None => Next::Hyper,
    }
}

/// Serves `stream`, whose first bytes are in `buf`, until it closes, the server closes
/// connections, or a request goes to hyper.
pub(super) async fn serve(api: Arc<Api>, mut stream: Socket, mut buf: Vec<u8>) {
    let mut out = Vec::new();
    // Made once for the connection, not per request: each would take a lock (the timer
    // wheel's, the shutdown signal's list of waiters) to register and to drop. The timer
    // is moved to the current deadline only when it fires early.
    let closing = api.shutdown.reached(Phase::Closing);
    let timer = tokio::time::sleep_until(Instant::now() + api.request_timeout);
    tokio::pin!(closing, timer);
    loop {
        // Wait for a whole head: for at most the request timeout, and only until the
        // server closes its connections.
        let deadline = Instant::now() + api.request_timeout;
        // Read as a publish's head is whole: a reload (SIGHUP) applies to the next request.
        let keys;
        let (route, head, body, admitted) = loop {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            match next(&buf, &mut headers) {
                Next::Plain { route, head, body, fields, target } => {
                    let admitted = match route {
                        ApiRoute::Pusher => {
                            let (path, query) = target.split_once('?').unwrap_or((target, ""));
                            api.admit_pusher(path, query).map(Admitted::Pusher)
                        }
                        _ => {
                            keys = api.api_keys.load_full();
                            api.admit(&fields, &keys, route).map(Admitted::Publish)
                        }
                    };
                    break (route, head, body, admitted);
                }
                Next::Hyper => return api.clone().serve_with_hyper(Prefixed::new(buf, stream)).await,
                Next::BadLength(route) => {
                    let answer = Answer::from(Error::bad_request("Content-Length must be given once, as a decimal number of bytes (at most 12 digits)"));
                    api.metrics.api_request(route, answer.status.as_u16());
                    write_answer(&mut out, &answer, true);
                    if stream.write_all(&out).await.is_ok() && AsyncWriteExt::flush(&mut stream).await.is_ok() {
                        // Drain what the client still sends, so it reads the answer rather than a reset.
                        let _ = Prefixed::new(Vec::new(), stream).shutdown().await;
                    }
                    return;
                }
                Next::Partial => {}
            }
            if buf.len() == buf.capacity() {
                buf.reserve(4096);
            }
            tokio::select! {
                biased;
                read = stream.read_buf(&mut buf) => match read {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                },
                _ = &mut timer => {
                    if Instant::now() < deadline {
                        timer.as_mut().reset(deadline);
                    } else {
                        return;
                    }
                }
                _ = &mut closing => return,
            }
        };
        // Tracked, as hyper's requests are, so a graceful shutdown waits for it.
        let (answer, served) = api.shutdown.track(serve_one(&api, &mut stream, &mut buf, head, body, admitted)).await;
        api.metrics.api_request(route, answer.status.as_u16());
        let last = api.shutdown.phase() >= Phase::Closing || ends_connection(answer.status);
        if served {
            // The request is done with before its answer is written: a large body leaves
            // no large buffer behind (it was counted against the node's budget only while
            // it was read), even while a slow client reads the answer.
            buf.drain(..head + body);
            keep_small(&mut buf);
        }
        write_answer(&mut out, &answer, !served || last);
        if stream.write_all(&out).await.is_err() || AsyncWriteExt::flush(&mut stream).await.is_err() {
            return;
        }
        if !served {
            // The body was not read: drain what the client still sends, so it reads the
            // answer rather than a reset.
            let _ = Prefixed::new(Vec::new(), stream).shutdown().await;
            return;
        }
        if last {
            let _ = stream.shutdown().await;
            return;
        }
        keep_small(&mut out);
    }
}

/// Gives back what `kept` holds beyond [`KEPT_BUFFER`] and its bytes.
fn keep_small(kept: &mut Vec<u8>) {
    if kept.capacity() > KEPT_BUFFER {
        kept.shrink_to(KEPT_BUFFER.max(kept.len()));
    }
}

/// Answers the plain request at the start of `buf`, `admitted` (or not) on its head,
/// reading the rest of its body into `buf` first. `served` is false when the body was left
/// unread (the request was refused on its head before the whole body arrived, or it did
/// not arrive in time): the connection cannot go on.
async fn serve_one(api: &Api, stream: &mut Socket, buf: &mut Vec<u8>, head: usize, body: usize, admitted: Result<Admitted<'_>, Error>) -> (Answer, bool) {
    let whole = head + body;
    let arrived = |buf: &Vec<u8>| buf.len() >= whole;
    let admitted = match admitted {
        Ok(admitted) => admitted,
        Err(error) => return (error.into(), arrived(buf)),
    };
    let reading = match api.reserve_body(Some(body), admitted.limit(api)) {
        Ok(reading) => reading,
        Err(error) => return (error.into(), arrived(buf)),
    };
    if !arrived(buf) {
        buf.reserve_exact(whole - buf.len());
        let deadline = Instant::now() + api.request_timeout;
        while !arrived(buf) {
            match tokio::time::timeout_at(deadline, stream.read_buf(buf)).await {
                Ok(Ok(n)) if n > 0 => {}
                Ok(_) => return (Error::bad_request("the connection ended inside the request body").into(), false),
                Err(_) => return (api.body_timeout().into(), false),
            }
        }
    }
    let answer = match admitted {
        Admitted::Publish(publish) => api.publish_body(publish, &buf[head..whole]).await,
        Admitted::Pusher(post) => api.pusher_post(post, &buf[head..whole]).await,
    };
    drop(reading);
    (answer.unwrap_or_else(Answer::from), true)
}

/// Writes `answer` as an HTTP/1.1 response into `out`, with the headers hyper would send.
fn write_answer(out: &mut Vec<u8>, answer: &Answer, close: bool) {
    out.clear();
    let status = answer.status;
    // Writes into a Vec cannot fail.
    let _ = write!(out, "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\n", status.as_str(), status.canonical_reason().unwrap_or(""));
    if let Some(seconds) = answer.retry_after {
        let _ = write!(out, "retry-after: {seconds}\r\n");
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    let _ = write!(out, "content-length: {}\r\ndate: ", answer.body.len());
    DATE.with(|date| {
        let mut date = date.borrow_mut();
        let now = SystemTime::now();
        let second = now.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if date.0 != second {
            *date = (second, httpdate::fmt_http_date(now));
        }
        out.extend_from_slice(date.1.as_bytes());
    });
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(answer.body.as_bytes());
}

thread_local! {
    /// The `Date` header's value, made once a second per thread, as hyper does.
    static DATE: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((u64::MAX, String::new())) };
}
