//! Server-Sent Events framing: `event:`, `data:` and `id:` lines, a blank line after
//! each event, and comment lines that keep a stream open through proxies.
//!
//! An event is written in two parts: its head (`event:` and `data:`), framed once and
//! shared by every connection it goes to, and its tail (`id:` and the blank line), the
//! connection's own cursor, which `EventSource` sends back as `Last-Event-ID`.

use bytes::Bytes;

pub const KEEPALIVE: &[u8] = b": keepalive\n\n";

/// The head of an event whose data is one line of JSON.
pub fn head(event: &str, json: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(event.len() + json.len() + 15);
    for part in [b"event: ", event.as_bytes(), b"\ndata: ", json, b"\n"] {
        out.extend_from_slice(part);
    }
    Bytes::from(out)
}

/// The length of [`head`]`(event, json)`.
pub fn head_len(event: &str, json: &[u8]) -> usize {
    event.len() + json.len() + 15
}

/// The tail that ends an event: its id, the connection's cursor.
pub fn tail(cursor: &str) -> Bytes {
    Bytes::from(format!("id: {cursor}\n\n"))
}

/// A whole event.
pub fn event(event: &str, json: &str, cursor: &str) -> Bytes {
    Bytes::from(format!("event: {event}\ndata: {json}\nid: {cursor}\n\n"))
}

/// `retry:` (milliseconds before `EventSource` reconnects), spread over 1 to 6 seconds
/// by `jitter`, so that browsers dropped together do not come back together.
pub fn retry(jitter: u64) -> Bytes {
    Bytes::from(format!("retry: {}\n\n", 1000 + jitter % 5000))
}
