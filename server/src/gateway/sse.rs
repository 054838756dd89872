//! The Server-Sent Events response head. The body is the connection's events, written by
//! its task until either side closes; with no length and no chunking, it ends at close.

pub(super) const RESPONSE: &str = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nX-Accel-Buffering: no\r\nConnection: close\r\n\r\n";
