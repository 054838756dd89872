//! The `pushline` binary: settings, logging, then the server until SIGTERM or SIGINT.

use std::process::ExitCode;

use pushline::shutdown::{Asked, Signals};
use pushline::telemetry::logging;
use pushline::{Config, Server};
use pushline_alloc::SiteAllocator;

#[global_allocator]
static ALLOCATOR: SiteAllocator = SiteAllocator;

fn main() -> ExitCode {
    let config = match Config::load() {
        Ok(config) => config,
        Err(error) => {
            eprint!("{error}");
            return ExitCode::from(2);
        }
    };
    if config.check_config {
        return match config.validate() {
            Ok(()) => {
                println!("pushline: the configuration is valid");
                ExitCode::SUCCESS
            }
            Err(error) => {
                for problem in error.message.lines() {
                    eprintln!("pushline: {problem}");
                }
                ExitCode::from(2)
            }
        };
    }
    if !config.alloc_tracking {
        pushline_alloc::allocator::disable_tracking();
    }
    logging::init(
        &config.log,
        config.log_format,
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
        let Ok(mut signals) = Signals::install() else {
            eprintln!("pushline: cannot install signal handlers");
            return ExitCode::FAILURE;
        };
        let server = match Server::start(config).await {
            Ok(server) => server,
            Err(error) => {
                tracing::error!(fault = ?error.fault(), "{error}");
                eprintln!("pushline: {error}");
                return ExitCode::from(2);
            }
        };
        let status = loop {
            tokio::select! {
                asked = signals.next() => match asked {
                    Asked::Stop => break ExitCode::SUCCESS,
                    Asked::Reload => {
                        if let Err(error) = Config::load().and_then(|config| server.reload(&config)) {
                            tracing::error!(fault = ?error.fault(), "reload refused, the old credentials stay: {error}");
                        }
                    }
                },
                _ = server.evicted() => {
                    eprintln!("pushline: another process holds this node id; stopped serving so clients reconnect elsewhere");
                    break ExitCode::FAILURE;
                }
            }
        };
        signals.exit_on_second();
        server.shutdown().await;
        status
    })
}
