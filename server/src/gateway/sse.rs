//! The Server-Sent Events response head. The body is the connection's events, written by
//! its task until either side closes; with no length and no chunking, it ends at close.
//!
//! A page on another origin may read the stream only if the response says so (CORS):
//! `allow_origin` is the request's `Origin` when it may, with credentials (cookies) allowed
//! only for origins listed in `--allowed-origins`.

pub(super) fn response(allow_origin: Option<(&str, bool)>) -> String {
    let cors = match allow_origin {
        Some((origin, credentials)) => {
            let credentials = if credentials { "Access-Control-Allow-Credentials: true\r\n" } else { "" };
            format!("Access-Control-Allow-Origin: {origin}\r\n{credentials}Vary: Origin\r\n")
        }
        None => String::new(),
    };
    format!("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nX-Accel-Buffering: no\r\n{cors}Connection: close\r\n\r\n")
}
