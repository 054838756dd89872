//! What a WebSocket client may say once connected: `ping`, `subscribe` and
//! `unsubscribe`, as JSON text messages; each gets one reply frame.

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;
use serde::Deserialize;

use crate::conn::Conn;
use crate::hub::Hub;
use crate::telemetry::{probes, ClientError, Metrics};
use crate::wire::ws;

/// `{"type":"pong"}` as a server text frame.
pub const PONG: &[u8] = b"\x81\x0f{\"type\":\"pong\"}";

/// The heartbeat, every 270 s from every client: recognised without parsing.
const PING: &str = r#"{"type":"ping"}"#;

#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Ping,
    Subscribe(Vec<String>),
    Unsubscribe(Vec<String>),
}

/// A command that could not be understood: the metric label and what to tell the client.
#[derive(Debug)]
pub struct Refused {
    pub reason: ClientError,
    pub message: String,
}

pub fn parse(text: &str) -> Result<Command, Refused> {
    #[derive(Deserialize)]
    struct Frame<'a> {
        #[serde(rename = "type", borrow)]
        kind: Cow<'a, str>,
        #[serde(default)]
        topics: Vec<String>,
    }
    if text == PING {
        return Ok(Command::Ping);
    }
    let frame: Frame = serde_json::from_str(text)
        .map_err(|e| Refused { reason: ClientError::BadJson, message: format!("bad JSON: {e}") })?;
    match &*frame.kind {
        "ping" => Ok(Command::Ping),
        "subscribe" => Ok(Command::Subscribe(frame.topics)),
        "unsubscribe" => Ok(Command::Unsubscribe(frame.topics)),
        other => Err(Refused {
            reason: ClientError::UnknownType,
            message: format!("unknown type `{other}`; expected ping, subscribe or unsubscribe"),
        }),
    }
}

/// Carries out one client message on `conn`; returns the reply frame.
pub fn handle(text: &str, conn: &Arc<Conn>, hub: &Hub, metrics: &Metrics) -> Bytes {
    let refused = match parse(text) {
        Ok(Command::Ping) => {
            probes::heartbeat(conn.session.0, 0);
            return Bytes::from_static(PONG);
        }
        Ok(Command::Subscribe(topics)) => match hub.subscribe(conn, &topics) {
            Ok(()) => return topics_reply("subscribed", &topics),
            Err(message) => Refused { reason: ClientError::TooManyTopics, message },
        },
        Ok(Command::Unsubscribe(topics)) => {
            hub.unsubscribe(conn, &topics);
            return topics_reply("unsubscribed", &topics);
        }
        Err(refused) => refused,
    };
    metrics.client_error(refused.reason);
    error_reply(&refused.message)
}

fn topics_reply(kind: &str, topics: &[String]) -> Bytes {
    ws::text(&serde_json::json!({ "type": kind, "topics": topics }).to_string())
}

pub fn error_reply(error: &str) -> Bytes {
    ws::text(&serde_json::json!({ "type": "error", "error": error }).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_pong_is_a_text_frame() {
        assert_eq!(PONG, &ws::text(r#"{"type":"pong"}"#)[..]);
    }

    #[test]
    fn commands_parse_or_say_why_not() {
        assert_eq!(parse(PING).unwrap(), Command::Ping);
        assert_eq!(parse(r#"{ "type" : "ping" }"#).unwrap(), Command::Ping);
        assert_eq!(parse(r#"{"type":"subscribe","topics":["a","b"]}"#).unwrap(), Command::Subscribe(vec!["a".into(), "b".into()]));
        assert_eq!(parse(r#"{"type":"unsubscribe"}"#).unwrap(), Command::Unsubscribe(vec![]));
        assert_eq!(parse("{").unwrap_err().reason, ClientError::BadJson);
        assert_eq!(parse(r#"{"type":"dance"}"#).unwrap_err().reason, ClientError::UnknownType);
        assert_eq!(parse(r#"{"type":"subscribe","topics":"a"}"#).unwrap_err().reason, ClientError::BadJson);
    }
}
