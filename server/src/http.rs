//! Just enough HTTP/1.1 to route a new connection: read and parse the request head,
//! answer a refusal, and hand the bytes already read on to hyper when the request is for
//! the publish API. Shared by the listener, the gateway and the API.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use crate::error::Error;
use crate::socket::Socket;
use crate::wire::cursor::MAX_CURSOR_BYTES;

/// Most header fields a request head may have, on every path.
pub const MAX_HEADERS: usize = 64;

/// Largest request head accepted, not counting a cursor (`Last-Event-ID`, `?cursor=`).
const MAX_HEAD: usize = 8 * 1024;
/// Room beyond `MAX_HEAD` for the cursor a returning client sends back: the longest the
/// server writes, percent-encoded in a query (`,` and `:` take three bytes).
const CURSOR_ROOM: usize = MAX_CURSOR_BYTES * 3 / 2 + 64;

/// The parts of a request head the gateway looks at.
pub struct Head {
    pub method: String,
    pub path: String,
    /// The minor version: 1 for HTTP/1.1, 0 for HTTP/1.0.
    pub version: u8,
    query: Vec<(String, String)>,
    headers: Vec<(String, String)>,
}

impl Head {
    pub fn query(&self, name: &str) -> Option<&str> {
        self.query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Every value of a header, in order, joined as HTTP joins repeated fields (`; ` for
    /// `Cookie`, `, ` for the others); None when it is not there.
    pub fn header_joined(&self, name: &str) -> Option<String> {
        let mut values = self.headers.iter().filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str()).peekable();
        values.peek()?;
        let separator = if name.eq_ignore_ascii_case("cookie") { "; " } else { ", " };
        Some(values.collect::<Vec<_>>().join(separator))
    }

    /// True if a comma-separated header lists `token` (case-insensitive).
    pub fn header_has(&self, name: &str, token: &str) -> bool {
        self.header(name).is_some_and(|v| v.split(',').any(|p| p.trim().eq_ignore_ascii_case(token)))
    }

    /// The token from `?token=`, or from `Authorization: Bearer`.
    pub fn bearer(&self) -> Option<&str> {
        self.query("token").or_else(|| bearer_token(self.header("authorization")?))
    }
}

/// One `application/x-www-form-urlencoded` component, decoded; it must be UTF-8 once
/// decoded (else `%ff` and `%fe` would both become U+FFFD: two names for one uid).
pub fn decode_component(raw: &str) -> Result<String, Error> {
    let spaced = raw.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8()
        .map(|text| text.into_owned())
        .map_err(|_| Error::bad_request(format!("`{raw}` is not UTF-8 once percent-decoded")))
}

/// The pairs of a query string, each name and value decoded.
pub fn query_pairs(query: &str) -> Result<Vec<(String, String)>, Error> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            Ok((decode_component(name)?, decode_component(value)?))
        })
        .collect()
}

/// The token of an `Authorization: Bearer <token>` header value.
pub fn bearer_token(authorization: &str) -> Option<&str> {
    let (scheme, token) = authorization.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

pub enum ReadHead {
    /// The head, and how many bytes of `buf` it used.
    Complete(Head, usize),
    /// The client closed, or sent nothing usable; nothing to answer.
    Closed,
    Malformed(Error),
}

/// Reads until a complete request head is in `buf` (which may then hold more).
pub async fn read_head(stream: &mut Socket, buf: &mut Vec<u8>) -> io::Result<ReadHead> {
    loop {
        if let Some(outcome) = parse(buf) {
            return Ok(outcome);
        }
        if buf.len() >= MAX_HEAD + CURSOR_ROOM {
            return Ok(ReadHead::Malformed(too_long()));
        }
        if buf.len() == buf.capacity() {
            buf.reserve(1024);
        }
        if stream.read_buf(buf).await? == 0 {
            return Ok(ReadHead::Closed);
        }
    }
}

fn too_long() -> Error {
    Error::bad_request(format!("request head over {MAX_HEAD} bytes (a cursor not counted)"))
}

/// Parses the request head at the start of `buf`; `None` while it is incomplete.
pub fn parse(buf: &[u8]) -> Option<ReadHead> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) => None,
        Err(e) => Some(ReadHead::Malformed(Error::bad_request(format!("malformed request: {e}")))),
        Ok(httparse::Status::Complete(len)) => {
            let target = req.path.unwrap_or("/");
            let (path, query) = target.split_once('?').unwrap_or((target, ""));
            // Any cursor the server wrote fits beside a head it accepted without one.
            // One of each: a cursor given twice gets no second allowance.
            let cursor_bytes = query.split('&').find(|pair| pair.starts_with("cursor=")).map_or(0, str::len)
                + req.headers.iter().find(|h| h.name.eq_ignore_ascii_case("last-event-id")).map_or(0, |h| h.name.len() + h.value.len() + 4);
            if len.saturating_sub(cursor_bytes) > MAX_HEAD || len > MAX_HEAD + CURSOR_ROOM {
                return Some(ReadHead::Malformed(too_long()));
            }
            let query = match query_pairs(query) {
                Ok(query) => query,
                Err(e) => return Some(ReadHead::Malformed(e)),
            };
            let head = Head {
                method: req.method.unwrap_or("").to_owned(),
                path: path.to_owned(),
                version: req.version.unwrap_or(1),
                query,
                headers: req
                    .headers
                    .iter()
                    .map(|h| (h.name.to_owned(), String::from_utf8_lossy(h.value).into_owned()))
                    .collect(),
            };
            Some(ReadHead::Complete(head, len))
        }
    }
}

/// Answers `error` (its status, `Retry-After` when it has one, and its JSON body) and
/// closes the connection.
pub async fn respond_error(stream: &mut (impl AsyncWrite + Unpin), error: &Error, extra_headers: &str) {
    let status = hyper::StatusCode::from_u16(error.kind.status()).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    let retry = error.retry_after().map(|s| format!("Retry-After: {s}\r\n")).unwrap_or_default();
    let body = error.body();
    let response = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n{retry}{extra_headers}\r\n{body}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("Error"),
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// Writes `bytes` and closes the connection (a refusal that is not an HTTP error).
pub async fn write_and_close(stream: &mut (impl AsyncWrite + Unpin), bytes: &[u8]) {
    let _ = stream.write_all(bytes).await;
    let _ = stream.shutdown().await;
}

/// Bytes of a request still arriving after its response that a closing connection reads
/// and discards, so the client reads the response instead of a reset: four times the
/// default body limit, so that a client that writes a whole over-large body before it
/// reads (Python's `http.client`) still reads its 413 (found by an attack: at 1 MiB it got
/// a broken pipe). Discarding costs a read per 16 KiB, nothing kept.
const LINGER_BYTES: usize = 64 * 1024 * 1024;
/// How long a closing connection waits for the client's remaining bytes.
const LINGER_TIME: Duration = Duration::from_secs(2);

/// The stream hyper serves the publish API on: it first yields the bytes the listener
/// already read, and closes lingering.
///
/// A response that refuses a request before reading its body (401, 413, 503) would be
/// lost if the socket were closed with the body unread: the kernel answers unread data
/// with a reset, and the client reads the reset, not the status. So shutting down sends
/// FIN, then reads and discards what the client still sends, up to [`LINGER_BYTES`] and
/// [`LINGER_TIME`], before the socket is closed. Nothing is buffered while lingering.
pub struct Prefixed {
    prefix: Vec<u8>,
    at: usize,
    inner: Socket,
    /// Set once the write side is shut: when lingering ends, and what was discarded.
    linger: Option<(Pin<Box<tokio::time::Sleep>>, usize)>,
}

impl Prefixed {
    pub fn new(prefix: Vec<u8>, inner: Socket) -> Prefixed {
        Prefixed { prefix, at: 0, inner, linger: None }
    }
}

impl AsyncRead for Prefixed {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.at < self.prefix.len() {
            let n = buf.remaining().min(self.prefix.len() - self.at);
            let at = self.at;
            buf.put_slice(&self.prefix[at..at + n]);
            self.at += n;
            if self.at == self.prefix.len() {
                self.prefix = Vec::new();
                self.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.linger.is_none() {
            std::task::ready!(Pin::new(&mut this.inner).poll_shutdown(cx))?;
            this.linger = Some((Box::pin(tokio::time::sleep(LINGER_TIME)), 0));
        }
        let Some((deadline, discarded)) = &mut this.linger else { return Poll::Ready(Ok(())) };
        let mut scratch = [0u8; 16 * 1024];
        loop {
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.inner).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if !buf.filled().is_empty() && *discarded < LINGER_BYTES => {
                    *discarded += buf.filled().len();
                }
                // The client closed, failed, or sent more than a lingering close takes.
                Poll::Ready(_) => return Poll::Ready(Ok(())),
                Poll::Pending => return deadline.as_mut().poll(cx).map(Ok),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(pad: usize, cursor: Option<&str>) -> Vec<u8> {
        let mut text = format!("GET /sse?uid=a HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n", "p".repeat(pad));
        if let Some(cursor) = cursor {
            text.push_str(&format!("Last-Event-ID: {cursor}\r\n"));
        }
        text.push_str("\r\n");
        text.into_bytes()
    }

    /// The longest cursor the server writes comes back beside any head it took without one.
    #[test]
    fn a_cursor_the_server_wrote_fits_beside_any_head_it_accepts() {
        let topics = crate::wire::cursor::most_topics();
        let position = format!(",t.{:016x}:{:08x}:{}", u64::MAX, u32::MAX, u64::MAX);
        let cursor = format!("s{}{}", u64::MAX, position.repeat(topics + 2));
        assert_eq!(cursor.len(), crate::wire::cursor::longest(topics));
        let pad = MAX_HEAD - head(0, None).len();
        assert!(matches!(parse(&head(pad, None)), Some(ReadHead::Complete(..))));
        assert!(matches!(parse(&head(pad, Some(&cursor))), Some(ReadHead::Complete(..))), "the same head with its cursor");
        let encoded = cursor.replace(',', "%2C").replace(':', "%3A");
        assert!(encoded.len() + "cursor=&".len() <= CURSOR_ROOM, "and percent-encoded in a query");
        assert!(matches!(parse(&head(pad + 1, Some(&cursor))), Some(ReadHead::Malformed(_))), "a head over the limit is still refused");
        let mut twice = head(pad, Some(&cursor));
        let line = format!("Last-Event-ID: {cursor}\r\n");
        twice.splice(twice.len() - 2..twice.len() - 2, line.bytes());
        assert!(matches!(parse(&twice), Some(ReadHead::Malformed(_))), "a second cursor gets no room of its own");
    }
}
