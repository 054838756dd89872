//! Log set-up: `tracing` to stderr, as text for people (colour only at a terminal) or
//! as JSON lines for machines (journald, Loki), every line carrying the node id; and a
//! throttle so that a storm of one warning cannot fill a disk.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use clap::ValueEnum;
use serde::Serialize;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line: timestamp, level, target, node, message and fields.
    Json,
}

static NODE: OnceLock<u16> = OnceLock::new();

/// Puts this node's id on every JSON line from now on (known once the registry is up).
pub fn set_node(node: u16) {
    let _ = NODE.set(node);
}

/// Logs to stderr through `tracing`; `filter` is an `EnvFilter` directive. With the
/// `console` feature and an address, tokio-console's server runs there too.
pub fn init(filter: &str, format: LogFormat, #[cfg(feature = "console")] console: Option<std::net::SocketAddr>) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only for a person at a terminal: journald, files and pipes get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // log_internal_errors(false): on a closed stderr, tracing-subscriber would otherwise
    // eprintln! its write error, which panics, and take down whatever task was logging
    // (seen: the accept loop, during an EMFILE backoff).
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).log_internal_errors(false);
    let fmt = match format {
        LogFormat::Text => fmt.with_ansi(ansi).boxed(),
        LogFormat::Json => fmt.with_ansi(false).event_format(JsonLines).boxed(),
    };
    let registry = tracing_subscriber::registry().with(fmt.with_filter(filter));
    #[cfg(feature = "console")]
    if let Some(addr) = console {
        let _ = registry.with(console_subscriber::ConsoleLayer::builder().server_addr(addr).spawn()).try_init();
        return;
    }
    let _ = registry.try_init();
}

/// `{"timestamp":..,"level":..,"target":..,"node":..,"message":..,<fields>}` per event.
struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, _ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let meta = event.metadata();
        let mut line = serde_json::Map::new();
        line.insert("timestamp".into(), humantime::format_rfc3339_micros(SystemTime::now()).to_string().into());
        line.insert("level".into(), meta.level().as_str().into());
        line.insert("target".into(), meta.target().into());
        if let Some(node) = NODE.get() {
            line.insert("node".into(), (*node).into());
        }
        event.record(&mut Fields(&mut line));
        writeln!(writer, "{}", serde_json::Value::Object(line))
    }
}

struct Fields<'a>(&'a mut serde_json::Map<String, serde_json::Value>);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().into(), format!("{value:?}").into());
    }
}

/// Lets a repeated log line through at most once per period, and says how many were
/// held back since the last one it let through.
pub struct Throttle {
    period_ms: u64,
    last_ms: AtomicU64,
    held: AtomicU64,
}

impl Throttle {
    pub const fn new(period: Duration) -> Throttle {
        Throttle { period_ms: period.as_millis() as u64, last_ms: AtomicU64::new(0), held: AtomicU64::new(0) }
    }

    /// `Some(lines held back since the last)` when this one may be logged.
    pub fn allow(&self) -> Option<u64> {
        let now = crate::clock::now_ms() + self.period_ms;
        let last = self.last_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= self.period_ms
            && self.last_ms.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            return Some(self.held.swap(0, Ordering::Relaxed));
        }
        self.held.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttle_lets_one_through_per_period_and_counts_the_rest() {
        let throttle = Throttle::new(Duration::from_secs(3600));
        assert_eq!(throttle.allow(), Some(0));
        for _ in 0..5 {
            assert_eq!(throttle.allow(), None);
        }
        assert_eq!(throttle.held.load(Ordering::Relaxed), 5);
    }
}
