//! Server-Sent Events framing: `event:`, `id:` and `data:` lines, a blank line after
//! each event, and comment lines that keep a stream open through proxies.

use bytes::Bytes;

pub const KEEPALIVE: &[u8] = b": keepalive\n\n";

/// One event whose data is one line of JSON.
pub fn event(event: &str, id: Option<u64>, json: &str) -> Bytes {
    let id = id.map(|id| format!("id: {id}\n")).unwrap_or_default();
    Bytes::from(format!("event: {event}\n{id}data: {json}\n\n"))
}
