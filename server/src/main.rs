//! The `pushline` binary: settings, logging, then the server until SIGTERM or SIGINT.
//! Started as `pushline symbolize-profile heap|cpu` it is instead the server's own
//! symbolizing worker.

use std::process::ExitCode;

use pushline::shutdown::{Asked, Signals};
use pushline::telemetry::logging;
use pushline::{Config, Server};
use pushline_alloc::symbolize::Kind;
use pushline_alloc::SiteAllocator;

#[global_allocator]
static ALLOCATOR: SiteAllocator = SiteAllocator;

fn main() -> ExitCode {
    pushline_alloc::allocator::one_libc_arena();
    if std::env::args().nth(1).as_deref() == Some(pushline::SYMBOLIZE) {
        let named = std::env::args().nth(3).as_deref() == Some("pprof");
        return symbolize(std::env::args().nth(2).as_deref().and_then(Kind::parse), named);
    }
    let config = match Config::load() {
        Ok(config) => config,
        Err(error) => {
            eprint!("{error}");
            return ExitCode::from(2);
        }
    };
    if config.check_config {
        // The credential files too (JWT keys, --api-keys), read as a start reads them.
        let checked = config.validate().and_then(|()| pushline::auth::Credentials::load(&config).map(drop));
        return match checked {
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
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("pushline")
        .on_thread_start(pushline_alloc::allocator::thread_caches::start)
        .on_thread_stop(pushline_alloc::allocator::thread_caches::stop)
        .build() {
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

/// The server's short-lived symbolizing worker: a gzipped profile on stdin; on stdout its
/// folded stacks, or (`pprof`) the same profile with every location named, both from the
/// binaries on disk. The debug information it loads goes away with it.
fn symbolize(kind: Option<Kind>, named: bool) -> ExitCode {
    use std::io::{Read, Write};
    let Some(kind) = kind else {
        eprintln!("pushline {}: say which profile: heap or cpu", pushline::SYMBOLIZE);
        return ExitCode::from(2);
    };
    let mut profile = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut profile) {
        eprintln!("pushline {}: {e}", pushline::SYMBOLIZE);
        return ExitCode::FAILURE;
    }
    let mut symbolizer = pushline_alloc::symbolize::Symbolizer::default();
    let out = if named {
        pushline_profiler::pprof::named(&profile, |file, address, start, limit, offset| symbolizer.at(file, address, start, limit, offset))
    } else {
        pushline_alloc::symbolize::folded(&profile, kind, &mut symbolizer).map(|lines| lines.iter().map(|line| format!("{line}\n")).collect::<String>().into_bytes())
    };
    match out {
        Ok(bytes) => {
            if std::io::stdout().lock().write_all(&bytes).is_err() {
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pushline {}: {e}", pushline::SYMBOLIZE);
            ExitCode::FAILURE
        }
    }
}
