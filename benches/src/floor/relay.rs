//! The floor's way between nodes (`floor-server --redis ADDR --relay-to PORT`), for
//! `unicast --nodes 2`: the least a push through Redis must cost the nodes. Each node
//! subscribes to a channel of its own (`floor:<its client port>`). A request's pushes for
//! uids that are not here go out as one `PUBLISH` to each node named by `--relay-to` (the
//! nodes' client ports), the request is answered once Redis has said how many heard it,
//! and a node that hears a message writes a frame to each of its uid's connections. No
//! registry, no history, no ids kept: one round trip per request and one pub/sub message
//! with two nodes, as Pushline's push on one Redis is.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::net::SocketAddr;

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use redis::Value;

/// The connection that publishes, and the one that hears.
pub const PUBLISHER: Token = Token(usize::MAX - 2);
pub const SUBSCRIBER: Token = Token(usize::MAX - 3);

/// A push that left through Redis: its id, its uid, its JSON data.
pub struct Relayed<'a> {
    pub id: u64,
    pub uid: &'a str,
    pub data: &'a str,
}

pub struct Relay<W> {
    publisher: TcpStream,
    subscriber: TcpStream,
    replies: redis::Parser,
    messages: redis::Parser,
    /// The channels of the nodes this one relays to.
    peers: Vec<String>,
    /// Each `PUBLISH` sent and not yet answered, in the order sent: the last of a
    /// request's carries what waits for them all.
    waiting: VecDeque<Option<W>>,
    /// Receivers counted so far for the request being answered.
    heard: i64,
}

impl<W> Relay<W> {
    /// Connects to Redis at `addr` twice and subscribes one of the connections to the
    /// channel of this node (client port `own`), waiting for Redis to confirm it, so
    /// nothing published after this returns is missed. `peers`: the client ports of the
    /// nodes this one relays to.
    pub fn connect(addr: SocketAddr, own: u16, peers: &[u16], registry: &Registry) -> io::Result<Relay<W>> {
        let mut subscriber = std::net::TcpStream::connect(addr)?;
        subscriber.write_all(&redis::cmd("SUBSCRIBE").arg(channel(own)).get_packed_command())?;
        let mut confirmation = redis::Parser::new();
        confirmation.parse_value(&mut subscriber).map_err(io::Error::other)?;
        let publisher = std::net::TcpStream::connect(addr)?;
        let mut relay = Relay {
            publisher: nonblocking(publisher)?,
            subscriber: nonblocking(subscriber)?,
            replies: redis::Parser::new(),
            messages: redis::Parser::new(),
            peers: peers.iter().map(|&port| channel(port)).collect(),
            waiting: VecDeque::new(),
            heard: 0,
        };
        registry.register(&mut relay.publisher, PUBLISHER, Interest::READABLE)?;
        registry.register(&mut relay.subscriber, SUBSCRIBER, Interest::READABLE)?;
        Ok(relay)
    }

    /// Whether this node relays to any other.
    pub fn has_peers(&self) -> bool {
        !self.peers.is_empty()
    }

    /// Publishes `pushes` in one message to each peer (there is one: [`Relay::has_peers`]);
    /// `waiting` (what the caller answers once Redis has) comes back from
    /// [`Relay::answered`] with the number of nodes that heard it.
    pub fn publish(&mut self, pushes: &[Relayed<'_>], waiting: W) -> io::Result<()> {
        let mut message = Vec::with_capacity(pushes.iter().map(|p| p.uid.len() + p.data.len() + 32).sum());
        for push in pushes {
            // A head line, then the data: the data may hold any byte.
            write!(message, "{} {} {}\n{}", push.id, push.uid, push.data.len(), push.data)?;
        }
        let mut commands = Vec::new();
        for peer in &self.peers {
            redis::cmd("PUBLISH").arg(peer).arg(&message).write_packed_command(&mut commands);
            self.waiting.push_back(None);
        }
        self.publisher.write_all(&commands)?;
        if let Some(last) = self.waiting.back_mut() {
            *last = Some(waiting);
        }
        Ok(())
    }

    /// What waited for each `PUBLISH` Redis has answered since the last call, with the
    /// number of nodes that heard it.
    pub fn answered(&mut self) -> io::Result<Vec<(W, i64)>> {
        let mut answered = Vec::new();
        while let Some(reply) = next_value(&mut self.replies, &mut self.publisher)? {
            let heard = match reply {
                Value::Int(n) => n,
                other => return Err(io::Error::other(format!("PUBLISH answered {other:?}"))),
            };
            self.heard += heard;
            if let Some(waiting) = self.waiting.pop_front().ok_or_else(|| io::Error::other("a reply to nothing sent"))? {
                answered.push((waiting, std::mem::take(&mut self.heard)));
            }
        }
        Ok(answered)
    }

    /// Each push heard from another node since the last call, given to `deliver` as
    /// (id, uid, data).
    pub fn heard(&mut self, mut deliver: impl FnMut(u64, &str, &[u8])) -> io::Result<()> {
        while let Some(value) = next_value(&mut self.messages, &mut self.subscriber)? {
            let Value::Array(parts) = value else { continue };
            let [Value::BulkString(kind), _, Value::BulkString(message)] = parts.as_slice() else { continue };
            if kind != b"message" {
                continue;
            }
            let mut rest = message.as_slice();
            while let Some(line_end) = rest.iter().position(|&b| b == b'\n') {
                let head = std::str::from_utf8(&rest[..line_end]).map_err(io::Error::other)?;
                let mut fields = head.split(' ');
                let (Some(id), Some(uid), Some(len), None) = (fields.next(), fields.next(), fields.next(), fields.next()) else {
                    return Err(io::Error::other(format!("a relayed push's head: {head:?}")));
                };
                let parse = |field: &str| field.parse::<u64>().map_err(io::Error::other);
                let (id, len) = (parse(id)?, parse(len)? as usize);
                let data = rest.get(line_end + 1..line_end + 1 + len).ok_or_else(|| io::Error::other("a relayed push cut short"))?;
                deliver(id, uid, data);
                rest = &rest[line_end + 1 + len..];
            }
        }
        Ok(())
    }
}

fn channel(port: u16) -> String {
    format!("floor:{port}")
}

fn nonblocking(stream: std::net::TcpStream) -> io::Result<TcpStream> {
    stream.set_nonblocking(true)?;
    stream.set_nodelay(true)?;
    Ok(TcpStream::from_std(stream))
}

/// The next whole value on `stream`, None once it has no more for now. The parser keeps
/// what it has read of a value cut short, so the next call goes on from there.
fn next_value(parser: &mut redis::Parser, stream: &mut TcpStream) -> io::Result<Option<Value>> {
    match parser.parse_value(stream) {
        Ok(value) => Ok(Some(value)),
        Err(e) if e.is_io_error() && !e.is_connection_dropped() => Ok(None),
        Err(e) => Err(io::Error::other(format!("Redis: {e}"))),
    }
}
