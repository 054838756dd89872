//! Criterion micro-benchmarks of the hot paths: framing a message, the JSON envelope and
//! its relay between nodes, session and message ids, keeping a message in the memory
//! history, and enqueueing a fan-out.
//!
//!     cargo bench -p pushline-bench --bench hot_paths

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use pushline::config::SlowConsumer;
use pushline::conn::queue::Limits;
use pushline::conn::inbox::Inbox;
use pushline::conn::Conn;
use pushline::history::memory::MemoryHistory;
use pushline::history::{Settings, Stream};
use pushline::registry::relay::{Relay, Target};
use pushline::session::{MessageIds, SessionIds};
use pushline::telemetry::Metrics;
use pushline::wire::ws::{self, OP_TEXT};
use pushline::wire::cursor::{Position, StreamKey};
use pushline::wire::{envelope_position, Message, Transport};

const DATA_100B: &str = r#"{"title":"Pushline","body":"a hundred bytes of JSON payload for the benchmark, give or take a few.."}"#;

fn framing(c: &mut Criterion) {
    let payload = vec![b'x'; 100];
    c.bench_function("ws_frame/100B", |b| b.iter(|| ws::frame(OP_TEXT, black_box(&payload))));
    c.bench_function("message_new/100B (envelope + ws + sse)", |b| {
        b.iter(|| Message::new(black_box(42), Some("news"), DATA_100B, None, Instant::now()))
    });
    let position = Position { key: StreamKey::Topic(9), epoch: 3, offset: 1234 };
    c.bench_function("message_new/100B positioned (envelope + ws)", |b| {
        b.iter(|| Message::new(black_box(42), None, DATA_100B, Some(position), Instant::now()))
    });
    c.bench_function("json_compact/100B (depth check, already compact)", |b| {
        b.iter(|| pushline::wire::json::compact(black_box(DATA_100B)))
    });
}

fn relay(c: &mut Criterion) {
    let msg = Message::new(42, None, DATA_100B, None, Instant::now());
    let envelope = std::str::from_utf8(msg.envelope()).unwrap();
    let relay = Relay { origin: 1, id: 42, published_ms: 0, group: 3, sequence: 7, except: None, target: Target::Uids(vec!["alice", "bob"]), envelope };
    let bytes = relay.encode();
    c.bench_function("relay_encode/push to 2 uids", |b| b.iter(|| black_box(&relay).encode()));
    c.bench_function("relay_decode/push to 2 uids", |b| b.iter(|| Relay::decode(black_box(&bytes))));
    c.bench_function("message_from_envelope/100B", |b| {
        b.iter(|| Message::from_envelope(42, black_box(envelope), None, Instant::now()))
    });
    let position = Position { key: StreamKey::Topic(9), epoch: 3, offset: 1234 };
    let positioned = Message::new(42, None, DATA_100B, Some(position), Instant::now());
    let envelope = std::str::from_utf8(positioned.envelope()).unwrap();
    c.bench_function("envelope_position/100B", |b| b.iter(|| envelope_position(black_box(envelope))));
}

fn ids(c: &mut Criterion) {
    let sessions = SessionIds::new(7);
    let messages = MessageIds::new(7);
    c.bench_function("session_id/next", |b| b.iter(|| sessions.next()));
    c.bench_function("message_id/next", |b| b.iter(|| messages.next()));
}

/// A push's append to its uid stream, one node: 1,000 uid streams already full (as they
/// are once a server has run a while), appended to in turn.
fn history_append(c: &mut Criterion) {
    const STREAMS: usize = 1000;
    let settings = Settings::from_config(&pushline::Config::for_loopback());
    let history = MemoryHistory::new(settings, Arc::new(Metrics::new()));
    let streams: Vec<Stream> = (0..STREAMS).map(|i| Stream::Uid(Arc::from(format!("u{i}")))).collect();
    let msg = Arc::new(Message::new(1, None, DATA_100B, None, Instant::now()));
    for stream in &streams {
        for _ in 0..history.settings().size {
            history.append(stream, true, "", |_| msg.clone());
        }
    }
    let mut next = streams.iter().cycle();
    c.bench_function("history_append/full uid stream of 1000", |b| {
        b.iter(|| history.append(next.next().unwrap(), true, "", |_| msg.clone()))
    });
}

fn fanout_enqueue(c: &mut Criterion) {
    const CONNECTIONS: usize = 10_000;
    let metrics = Metrics::new();
    let config = pushline::Config::for_loopback();
    let limits = Limits { max_messages: config.queue_max_messages, max_bytes: config.queue_max_bytes, policy: SlowConsumer::DropOldest };
    let sessions = SessionIds::new(0);
    let msg = Arc::new(Message::new(1, None, DATA_100B, None, Instant::now()));
    let inbox = Arc::new(Inbox::default());
    let mut group = c.benchmark_group("fanout_enqueue");
    group.throughput(Throughput::Elements(CONNECTIONS as u64));
    group.bench_function("100B to 10k connections", |b| {
        b.iter_batched(
            || {
                (0..CONNECTIONS)
                    .map(|i| Arc::new(Conn::new(sessions.next(), format!("u{i}").into(), (Transport::WebSocket, 0), None, 0, inbox.clone())))
                    .collect::<Vec<_>>()
            },
            |conns| {
                for conn in &conns {
                    conn.deliver(&msg, &limits, &metrics);
                }
                conns
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(benches, framing, relay, ids, history_append, fanout_enqueue);
criterion_main!(benches);
