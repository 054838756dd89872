//! The `pushline` binary: settings, logging, then the server until SIGTERM or SIGINT.

use std::process::ExitCode;

use pushline::{telemetry, Config, Server};
use tokio::signal::unix::{signal, SignalKind};

fn main() -> ExitCode {
    let config = match Config::load() {
        Ok(config) => config,
        Err(message) => {
            eprint!("{message}");
            return ExitCode::from(2);
        }
    };
    telemetry::init_logging(
        &config.log,
        #[cfg(feature = "console")]
        config.console_listen,
    );
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("pushline").build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pushline: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        // Handlers first: a signal that arrives once the server is listening must be graceful.
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            eprintln!("pushline: cannot install signal handlers");
            return ExitCode::FAILURE;
        };
        let server = match Server::start(config).await {
            Ok(server) => server,
            Err(message) => {
                tracing::error!("{message}");
                eprintln!("pushline: {message}");
                return ExitCode::from(2);
            }
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        server.shutdown().await;
        ExitCode::SUCCESS
    })
}
