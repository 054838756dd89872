//! `pushline-bench`: runs a scenario against a `pushline` it starts, prints a table, and
//! optionally writes the rows as JSON.

mod client;
mod driver;
mod floor;
mod report;
mod scenarios;
mod worker;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "pushline-bench", about = "Benchmarks for Pushline")]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(clap::Args, Clone)]
pub struct Common {
    /// The server binary to run (default: `pushline` next to this binary).
    #[arg(long, default_value_os_t = driver::default_server_bin())]
    pub server_bin: PathBuf,
    /// Extra flags for the server, e.g. --server-arg=--queue-max-messages=16 (repeatable).
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    pub server_args: Vec<String>,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 256)]
    pub parallel: usize,
    /// Source addresses 127.0.0.1..=N for client connections (ephemeral ports are per address).
    #[arg(long, default_value_t = 8)]
    pub spread: u8,
    /// Write the rows as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// TLS: the server gets a certificate made for the run (--tls-cert, --tls-key), and
    /// every client connects with wss://, resuming its session when it reconnects.
    #[arg(long)]
    pub tls: bool,
}

#[derive(Subcommand)]
enum Scenario {
    /// Hold N idle connections; report server memory per connection.
    Idle {
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        /// Keep the connections open this many seconds after measuring (to profile them).
        #[arg(long, default_value_t = 0)]
        hold: u64,
        /// SSE connections (`/sse`) instead of WebSocket ones.
        #[arg(long)]
        sse: bool,
        /// Every connection subscribes to this topic, made a presence topic: each is a member.
        #[arg(long)]
        presence_topic: Option<String>,
        /// Pusher protocol connections (`/app/KEY?protocol=7`) instead of native ones.
        #[arg(long)]
        pusher: bool,
        /// Every connection subscribes to this topic (with --pusher: this public channel):
        /// what a subscription costs is the difference from a run without.
        #[arg(long)]
        topic: Option<String>,
    },
    /// Broadcast 100 bytes to N connections, `rounds` times; time to the last client and CPU
    /// per delivery, then the same against the floor server, and the ratios.
    Fanout {
        #[arg(long, default_value_t = 15_000)]
        connections: usize,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Skip the same run against the floor server.
        #[arg(long)]
        no_floor: bool,
        /// The floor sends through io_uring, many sends per system call.
        #[arg(long)]
        floor_uring: bool,
    },
    /// Server CPU with N idle connections, then with each pinging every `interval`.
    Heartbeat {
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        interval: std::time::Duration,
        /// Length of each of the two measuring windows.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Skip the same pinging against the floor server.
        #[arg(long)]
        no_floor: bool,
    },
    /// What a join costs in a presence topic of `members`: `joins` clients join one every
    /// `gap_ms` and leave, against the same topic without presence.
    Presence {
        #[arg(long, default_value_t = 10_000)]
        members: usize,
        #[arg(long, default_value_t = 200)]
        joins: usize,
        #[arg(long, default_value_t = 10)]
        gap_ms: u64,
    },
    /// The Pusher protocol's fan-out against the native one: N subscribers of one channel,
    /// `rounds` 100-byte events through the signed Pusher API, then the same natively.
    Pusher {
        #[arg(long, default_value_t = 15_000)]
        connections: usize,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// What --connect-hook adds to a connect: N connects (`parallel` at a time) timed to the
    /// welcome, with a local application answering every hook, and without the hook.
    Hook {
        #[arg(long, default_value_t = 5_000)]
        connections: usize,
    },
    /// N clients connect at once, `handshakes` at a time.
    Storm {
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        #[arg(long, default_value_t = 2_000)]
        handshakes: usize,
        /// Then drop every client at once and reconnect them all, honouring Retry-After.
        #[arg(long)]
        reconnect: bool,
    },
    /// Pushes to random uids at `rate` per second for `seconds`; latency percentiles.
    Unicast {
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        #[arg(long, default_value_t = 1_000)]
        rate: u64,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// With 2 or more, nodes on a Redis: clients on the last node, pushes into the first.
        #[arg(long, default_value_t = 1)]
        nodes: usize,
        /// Push over a pool of N keep-alive connections.
        #[arg(long, default_value_t = 4)]
        publishers: usize,
        /// Pushes per request: 1 posts `/v1/push`, more post `/v1/batch`.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Open a connection for every request (a new HTTP client each time).
        #[arg(long)]
        new_connection_per_push: bool,
        /// Skip the same run against the floor server (with `--nodes K`, K of them on a Redis).
        #[arg(long)]
        no_floor: bool,
    },
    /// Redis cost of sessions: commands and round trips per connect, heartbeat and
    /// disconnect, Redis memory per session, with K nodes sharing a port.
    Registry {
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        #[arg(long, default_value_t = 2)]
        nodes: usize,
    },
    /// Past one process's file limit: K server processes on one port (SO_REUSEPORT, on
    /// Redis when K > 1) and W client processes; memory per connection, one broadcast.
    Scale {
        #[arg(long, default_value_t = 200_000)]
        connections: usize,
        #[arg(long, default_value_t = 12)]
        nodes: usize,
        #[arg(long, default_value_t = 12)]
        workers: usize,
        /// Skip the floor servers (`floor-server`, as many, on one port) measured after Pushline.
        #[arg(long)]
        no_floor: bool,
    },
    /// The floor server `fanout` and `heartbeat` measure Pushline against (started by them).
    #[command(hide = true)]
    FloorServer {
        /// Broadcasts through io_uring.
        #[arg(long)]
        uring: bool,
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
        /// Shares `listen` with other processes (SO_REUSEPORT).
        #[arg(long)]
        reuse_port: bool,
        /// A node among others on the Redis at this address (`unicast --nodes 2`).
        #[arg(long)]
        redis: Option<std::net::SocketAddr>,
        /// With `--redis`: the client port of a node to relay pushes for uids not here to (repeat).
        #[arg(long)]
        relay_to: Vec<u16>,
    },
    /// One client process of `scale` (started by it).
    #[command(hide = true)]
    Worker {
        #[arg(long)]
        server: std::net::SocketAddr,
        #[arg(long)]
        first: usize,
        #[arg(long)]
        connections: usize,
        #[arg(long)]
        net: u8,
    },
    /// Everything at once for a long time, on two nodes and a Redis that restarts
    /// halfway: RSS, Redis memory, connections and drops sampled over time.
    Soak {
        #[arg(long, default_value_t = 15_000)]
        connections: usize,
        #[arg(long, default_value_t = 60)]
        minutes: u64,
        /// Pushes per second.
        #[arg(long, default_value_t = 200)]
        rate: u64,
        /// Seconds between samples.
        #[arg(long, default_value_t = 30)]
        sample: u64,
        /// Write the samples here as CSV.
        #[arg(long)]
        csv: Option<PathBuf>,
    },
    /// Clients of a node killed mid-stream resume on another with their cursors: messages
    /// lost and duplicated, time until all resumed, Redis round trips per resume.
    Resume {
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        /// Messages per second, to one topic every client reads.
        #[arg(long, default_value_t = 20)]
        rate: u64,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// One node on the memory registry, restarted: every client must be told it lost.
        #[arg(long)]
        memory: bool,
    },
    /// `slow_percent` of N clients stop reading during `rounds` 16 KB broadcasts.
    Slow {
        #[arg(long, default_value_t = 200)]
        connections: usize,
        #[arg(long, default_value_t = 50)]
        slow_percent: usize,
        /// Enough to fill the kernel's send buffers (several MB per slow client) first.
        #[arg(long, default_value_t = 500)]
        rounds: usize,
    },
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let (number, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = number.parse().map_err(|_| format!("bad duration {s}"))?;
    match unit {
        "ms" => Ok(std::time::Duration::from_millis(n)),
        "s" | "" => Ok(std::time::Duration::from_secs(n)),
        _ => Err(format!("bad duration unit in {s}: use ms or s")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A worker is one of many client processes sharing the machine's cores: one thread
    // each, so its tasks never wake a second one.
    let mut runtime = match cli.scenario {
        Scenario::Worker { .. } => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    match runtime.enable_all().build() {
        Ok(runtime) => runtime.block_on(run(cli)),
        Err(e) => {
            eprintln!("pushline-bench: cannot start a runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(mut cli: Cli) -> ExitCode {
    if cli.common.tls {
        let dir = std::env::temp_dir().join(format!("pushline-bench-tls-{}", std::process::id()));
        match client::use_tls(&dir, 100_000) {
            Ok((cert, key)) => cli.common.server_args.extend([format!("--tls-cert={}", cert.display()), format!("--tls-key={}", key.display())]),
            Err(e) => {
                eprintln!("pushline-bench: cannot set up TLS: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let result = match cli.scenario {
        Scenario::Idle { connections, hold, sse, presence_topic, pusher, topic } => {
            scenarios::idle::run(&cli.common, connections, hold, sse, presence_topic.as_deref(), pusher, topic.as_deref()).await
        }
        Scenario::Fanout { connections, rounds, no_floor, floor_uring } => {
            scenarios::fanout::run(&cli.common, connections, rounds, !no_floor, floor_uring).await
        }
        Scenario::Heartbeat { connections, interval, seconds, no_floor } => {
            scenarios::heartbeat::run(&cli.common, connections, interval, seconds, !no_floor).await
        }
        Scenario::Slow { connections, slow_percent, rounds } => {
            scenarios::slow::run(&cli.common, connections, slow_percent, rounds).await
        }
        Scenario::Presence { members, joins, gap_ms } => scenarios::presence::run(&cli.common, members, joins, std::time::Duration::from_millis(gap_ms)).await,
        Scenario::Pusher { connections, rounds } => scenarios::pusher::run(&cli.common, connections, rounds).await,
        Scenario::Hook { connections } => scenarios::hook::run(&cli.common, connections, cli.common.parallel).await,
        Scenario::Storm { connections, handshakes, reconnect } => {
            scenarios::storm::run(&cli.common, connections, handshakes, reconnect).await
        }
        Scenario::Unicast { connections, rate, seconds, nodes, publishers, batch, new_connection_per_push, no_floor } => {
            let settings = scenarios::unicast::Settings { connections, rate, seconds, nodes, publishers, batch, new_connection_per_push, floor: !no_floor };
            scenarios::unicast::run(&cli.common, settings).await
        }
        Scenario::Scale { connections, nodes, workers, no_floor } => scenarios::scale::run(&cli.common, connections, nodes, workers, !no_floor).await,
        Scenario::FloorServer { uring, listen, reuse_port, redis, relay_to } => {
            return match tokio::task::block_in_place(|| floor::serve(listen, reuse_port, uring, redis, &relay_to)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("pushline-bench floor-server: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Scenario::Worker { server, first, connections, net } => {
            return match worker::run(&cli.common, server, first, connections, net).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    println!("error {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Scenario::Registry { connections, nodes } => scenarios::registry::run(&cli.common, connections, nodes).await,
        Scenario::Resume { connections, rate, seconds, memory } => {
            scenarios::resume::run(&cli.common, scenarios::resume::Settings { connections, rate, seconds, memory }).await
        }
        Scenario::Soak { connections, minutes, rate, sample, csv } => {
            let settings = scenarios::soak::Settings { connections, minutes, rate, sample: std::time::Duration::from_secs(sample), csv };
            scenarios::soak::run(&cli.common, settings).await
        }
    };
    match result {
        Ok(rows) => {
            report::print(&rows);
            if let Some(path) = &cli.common.json {
                if let Err(e) = report::write_json(&rows, path) {
                    eprintln!("pushline-bench: cannot write {}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pushline-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
