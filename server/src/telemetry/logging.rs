//! Log set-up: `tracing` to stderr, and tokio-console when built with it.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// Logs to stderr through `tracing`; `filter` is an `EnvFilter` directive. With the
/// `console` feature and an address, tokio-console's server runs there too.
pub fn init(filter: &str, #[cfg(feature = "console")] console: Option<std::net::SocketAddr>) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // log_internal_errors(false): on a closed stderr, tracing-subscriber would otherwise
    // eprintln! its write error, which panics, and take down whatever task was logging
    // (seen: the accept loop, during an EMFILE backoff).
    // Colour only for a person at a terminal: journald, files and pipes get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .log_internal_errors(false)
        .with_filter(filter);
    let registry = tracing_subscriber::registry().with(fmt);
    #[cfg(feature = "console")]
    if let Some(addr) = console {
        let _ = registry.with(console_subscriber::ConsoleLayer::builder().server_addr(addr).spawn()).try_init();
        return;
    }
    let _ = registry.try_init();
}
