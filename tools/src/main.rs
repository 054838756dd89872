//! `pushline-tools`: where a live Pushline server's bytes and CPU go.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use pushline_tools::{audit, flame, heap, target::Admin};

#[derive(Parser)]
#[command(name = "pushline-tools", version, about = "Where a live Pushline server's bytes and CPU go")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Per-connection memory of a live server: kernel, allocator sites, process.
    MemoryAudit {
        pid: u32,
        /// Print JSON instead of a table.
        #[arg(long, conflicts_with = "watch")]
        json: bool,
        /// One line every N seconds, like top: connections, user and kernel bytes per
        /// connection, the site that grew most since the line before.
        #[arg(long, value_name = "N")]
        watch: Option<u64>,
        /// With --watch: stop after this many lines.
        #[arg(long, requires = "watch")]
        count: Option<u64>,
    },
    /// CPU flame graph of a live server (pid or admin address), or of saved stacks.
    Flamegraph {
        /// A pid or admin address (127.0.0.1:9091).
        target: Option<String>,
        #[arg(long, default_value_t = 10, conflicts_with_all = ["minutes", "from"])]
        seconds: u64,
        /// Instead of profiling from now: the last M minutes the server's always-on
        /// profiler kept (answered at once).
        #[arg(long, conflicts_with_all = ["kernel", "from"])]
        minutes: Option<u64>,
        /// Instead of profiling from now: the kept window from this time (RFC 3339,
        /// 2026-12-06T14:19:00Z, or Unix seconds) ...
        #[arg(long, requires = "to", conflicts_with = "kernel")]
        from: Option<String>,
        /// ... to this one.
        #[arg(long, requires = "from")]
        to: Option<String>,
        /// What changed: the window's difference from the M minutes just before it (a
        /// differential flame graph, red where it grew).
        #[arg(long, conflicts_with = "base_from")]
        base_minutes: Option<u64>,
        /// What changed: the window's difference from the kept window BASE_FROM..BASE_TO.
        #[arg(long, requires = "base_to")]
        base_from: Option<String>,
        #[arg(long, requires = "base_from")]
        base_to: Option<String>,
        /// Write the SVG here.
        #[arg(short, long, default_value = "flamegraph.svg")]
        output: PathBuf,
        /// Also keep the collapsed stacks, in this file.
        #[arg(long)]
        folded: Option<PathBuf>,
        /// A differential flame graph of two folded files: BEFORE AFTER.
        #[arg(long, num_args = 2, value_names = ["BEFORE", "AFTER"], conflicts_with = "target")]
        diff: Option<Vec<PathBuf>>,
        /// Render stacks printed by probes/cpu-stacks.bt or probes/offcpu.bt.
        #[arg(long, conflicts_with_all = ["target", "diff"])]
        from_bpftrace: Option<PathBuf>,
        /// Kernel frames too (system calls, the TCP stack): samples the pid's on-CPU stacks
        /// with bpftrace (probes/cpu-stacks.bt) instead of asking the server. Needs root.
        #[arg(long, conflicts_with_all = ["diff", "from_bpftrace"])]
        kernel: bool,
    },
    /// Live heap snapshot (folded stacks, SVG, site table), or what grew between two.
    Heap {
        /// A pid or admin address.
        target: Option<String>,
        /// Snapshot prefix: writes PREFIX.folded, PREFIX.svg, PREFIX.sites.json.
        #[arg(short, long, default_value = "heap")]
        output: PathBuf,
        /// Compare two snapshots: BEFORE AFTER (prefixes).
        #[arg(long, num_args = 2, value_names = ["BEFORE", "AFTER"], conflicts_with = "target")]
        diff: Option<Vec<PathBuf>>,
        /// Rows to show in a diff.
        #[arg(long, default_value_t = 15)]
        top: usize,
    },
    /// One of the server's read-only live queries (the talk's debug hook, made safe);
    /// with no NAME, the list of queries and their parameters.
    Query {
        /// A pid or admin address.
        target: String,
        /// connections_of, queued_above, idle_longer_than, top_topics, site_delta.
        name: Option<String>,
        /// Parameters, as key=value.
        params: Vec<String>,
    },
    /// Live objects by kind (the talk's lgcstat): connections, sessions, topics, tasks.
    Objects {
        /// A pid or admin address.
        target: String,
    },
}

/// Exit status of `flamegraph` when the profile took no samples (an SVG saying so is
/// still written, for scripts that always expect the file).
const NO_SAMPLES: u8 = 3;

fn main() -> ExitCode {
    match run(Cli::parse().command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pushline-tools: {e}");
            ExitCode::from(2)
        }
    }
}

/// Percent-encodes a query component.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}

fn write(path: &PathBuf, bytes: &[u8]) -> Result<(), String> {
    std::fs::write(path, bytes).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn run(command: Command) -> Result<ExitCode, String> {
    match command {
        Command::MemoryAudit { pid, watch: Some(seconds), count, .. } => {
            audit::watch(pid, Duration::from_secs(seconds.max(1)), count)?;
        }
        Command::MemoryAudit { pid, json, .. } => {
            let audit = audit::audit(pid, None)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&audit).map_err(|e| e.to_string())?);
            } else {
                audit::print(&audit);
            }
        }
        Command::Flamegraph { target, seconds, minutes, from, to, base_minutes, base_from, base_to, output, folded, diff, from_bpftrace, kernel } => {
            let svg = if let Some(paths) = diff {
                flame::diff_svg(&paths[0], &paths[1])?
            } else if let Some(path) = from_bpftrace {
                let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                let stacks = flame::fold_bpftrace(&text);
                if stacks.is_empty() {
                    return Err(format!("{} holds no bpftrace stacks", path.display()));
                }
                if let Some(f) = &folded {
                    write(f, stacks.as_bytes())?;
                }
                flame::svg(&stacks, "Pushline (bpftrace stacks)", "samples")?
            } else {
                let target = target.ok_or("give a pid or admin address, --diff BEFORE AFTER, or --from-bpftrace FILE")?;
                let (stacks, title) = if kernel {
                    let pid = target.parse::<u32>().map_err(|_| format!("--kernel samples a process: give its pid, not `{target}`"))?;
                    eprintln!("sampling pid {pid}, kernel and user stacks, for {seconds} s (bpftrace)");
                    (flame::kernel_folded(pid, seconds)?, "Pushline CPU, kernel and user")
                } else if minutes.is_some() || from.is_some() {
                    let admin = Admin::find(&target)?;
                    // As a query value: `+01:00` would read as a space, `&` as another parameter.
                    let at = |time: &Option<String>| {
                        time.as_deref().unwrap_or_default().replace('%', "%25").replace('+', "%2B").replace('&', "%26").replace('#', "%23").replace(' ', "%20")
                    };
                    let mut query = match minutes {
                        Some(minutes) => format!("minutes={minutes}"),
                        None => format!("from={}&to={}", at(&from), at(&to)),
                    };
                    let changed = base_minutes.is_some() || base_from.is_some();
                    match base_minutes {
                        Some(m) => query.push_str(&format!("&base_minutes={m}")),
                        None if changed => query.push_str(&format!("&base_from={}&base_to={}", at(&base_from), at(&base_to))),
                        None => {}
                    }
                    eprintln!("{} of {} ({query})", if changed { "what changed in the kept window" } else { "the kept window" }, admin.addr);
                    (flame::cpu_folded_window(&admin, &query)?, if changed { "Pushline CPU: what changed (red grew, blue shrank)" } else { "Pushline CPU" })
                } else if base_minutes.is_some() || base_from.is_some() {
                    return Err("--base-minutes and --base-from compare a kept window: give --minutes or --from/--to too".into());
                } else {
                    let admin = Admin::find(&target)?;
                    eprintln!("profiling {} for {seconds} s", admin.addr);
                    (flame::cpu_folded(&admin, seconds)?, "Pushline CPU")
                };
                if stacks.trim().is_empty() {
                    let span = match (minutes, &from, &to) {
                        (Some(m), ..) => format!("{m} min"),
                        (None, Some(from), Some(to)) => format!("{from} to {to}"),
                        _ => format!("{seconds} s"),
                    };
                    let message = format!("no samples in {span}: the server was idle");
                    write(&output, pushline_alloc::flame::empty_svg(title, &message).as_bytes())?;
                    eprintln!("pushline-tools: {message}; wrote {} saying so", output.display());
                    println!("{}", output.display());
                    return Ok(ExitCode::from(NO_SAMPLES));
                }
                if let Some(f) = &folded {
                    write(f, stacks.as_bytes())?;
                }
                flame::svg(&stacks, title, "samples")?
            };
            write(&output, &svg)?;
            println!("{}", output.display());
        }
        Command::Heap { target, output, diff, top } => {
            if let Some(paths) = diff {
                let growth = heap::diff(&paths[0], &paths[1])?;
                println!("grew, by site (live bytes):");
                for (site, bytes) in growth.by_site.iter().filter(|(_, b)| *b != 0) {
                    println!("  {bytes:>12}  {site}");
                }
                println!("grew, by stack (sampled live bytes; leaf first):");
                for (stack, bytes) in growth.by_stack.iter().take(top) {
                    println!("  {bytes:>12}  {}", heap::short_stack(stack, 6));
                }
            } else {
                let target = target.ok_or("give a pid or admin address, or --diff BEFORE AFTER")?;
                let admin = Admin::find(&target)?;
                for path in heap::snapshot(&admin, &output)? {
                    println!("{}", path.display());
                }
            }
        }
        Command::Query { target, name, params } => {
            let admin = Admin::find(&target)?;
            // Without a name, the list of queries (and no parameters can follow).
            let mut path = name.map_or_else(|| "/debug/query".to_owned(), |name| format!("/debug/query/{name}"));
            for (i, param) in params.iter().enumerate() {
                let (key, value) = param.split_once('=').ok_or_else(|| format!("`{param}`: parameters are key=value"))?;
                path.push(if i == 0 { '?' } else { '&' });
                path.push_str(&format!("{}={}", encode(key), encode(value)));
            }
            // site_delta waits up to 60 s before it answers.
            let body = admin.get(&path, Duration::from_secs(90))?;
            let answer: serde_json::Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
            println!("{}", serde_json::to_string_pretty(&answer).map_err(|e| e.to_string())?);
        }
        Command::Objects { target } => {
            let admin = Admin::find(&target)?;
            let body = admin.get("/debug/objects", Duration::from_secs(10))?;
            let objects: serde_json::Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
            for (kind, count) in objects.as_object().into_iter().flatten() {
                println!("{kind:<16} {count}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
