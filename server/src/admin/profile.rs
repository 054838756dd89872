//! `/debug/pprof/profile` (CPU, pprof-rs) and `/debug/pprof/heap` (jemalloc's sampled
//! heap profile), each as gzipped profile.proto (what `go tool pprof` reads), an inferno
//! flame graph SVG, or folded stacks.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hyper::StatusCode;
use pushline_alloc::symbolize::{Kind, RawProfile};
use pushline_alloc::{flame, jemalloc};

use super::{error, reply, Query, Reply};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Format {
    Pprof,
    Svg,
    Folded,
}

fn format(query: &Query) -> Result<Format, Reply> {
    match query.get("format").unwrap_or("pprof") {
        "pprof" => Ok(Format::Pprof),
        "svg" => Ok(Format::Svg),
        "folded" => Ok(Format::Folded),
        other => Err(error(StatusCode::BAD_REQUEST, &format!("format `{other}`: use pprof, svg or folded"))),
    }
}

/// One CPU profile at a time: a second would share pprof-rs's one SIGPROF timer.
static CPU_PROFILE_RUNNING: AtomicBool = AtomicBool::new(false);

struct CpuProfileSlot;

impl CpuProfileSlot {
    fn take() -> Option<CpuProfileSlot> {
        CPU_PROFILE_RUNNING.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire).ok().map(|_| CpuProfileSlot)
    }
}

impl Drop for CpuProfileSlot {
    fn drop(&mut self) {
        CPU_PROFILE_RUNNING.store(false, Ordering::Release);
    }
}

/// Pauses jemalloc's heap sampling while it lives: jemalloc unwinding a sampled
/// allocation's stack while pprof-rs's SIGPROF handler unwinds the same thread can deadlock.
struct HeapSamplingPaused(Option<bool>);

impl HeapSamplingPaused {
    fn new() -> Self {
        HeapSamplingPaused(jemalloc::set_heap_sampling(false).ok())
    }
}

impl Drop for HeapSamplingPaused {
    fn drop(&mut self) {
        if let Some(was) = self.0 {
            let _ = jemalloc::set_heap_sampling(was);
        }
    }
}

pub async fn cpu(query: &Query) -> Reply {
    let format = match format(query) {
        Ok(f) => f,
        Err(reply) => return reply,
    };
    let seconds = match query.number("seconds", 30, 1..=300) {
        Ok(s) => s,
        Err(reply) => return reply,
    };
    let frequency = match query.number("frequency", 99, 1..=1000) {
        Ok(f) => f as i32,
        Err(reply) => return reply,
    };
    let Some(slot) = CpuProfileSlot::take() else {
        return error(StatusCode::CONFLICT, "a CPU profile is already running; one at a time");
    };
    // Held by this request: when the client hangs up, its request is dropped, and with it
    // this sender, which ends the profile early (and frees the slot for the next one).
    let (_asking, hung_up) = std::sync::mpsc::channel::<()>();
    let profiled = tokio::task::spawn_blocking(move || {
        let _slot = slot;
        let _paused = HeapSamplingPaused::new();
        let guard = pprof::ProfilerGuardBuilder::default()
            .frequency(frequency)
            // Unwinding through these from a signal handler can deadlock or crash.
            .blocklist(&["libc", "libgcc", "pthread", "vdso"])
            .build()
            .map_err(|e| format!("cannot start the CPU profiler: {e}"))?;
        if let Err(std::sync::mpsc::RecvTimeoutError::Disconnected) = hung_up.recv_timeout(Duration::from_secs(seconds)) {
            return Err("the client hung up".to_owned());
        }
        // Unresolved: the addresses as sampled. Naming them here would load this binary's
        // DWARF into the server for good (hundreds of megabytes for a debug build).
        let report = guard.report().build_unresolved().map_err(|e| format!("cannot build the CPU profile: {e}"))?;
        let mut raw = RawProfile::new();
        for (stack, count) in &report.data {
            let thread = String::from_utf8_lossy(&stack.thread_name[..stack.thread_name_length]).into_owned();
            let root = if thread.is_empty() { stack.thread_id.to_string() } else { thread };
            raw.add(&root, stack.frames.iter().map(|frame| frame.ip() as usize), *count as i64);
        }
        raw.gzipped()
    })
    .await;
    let profile = match profiled {
        Ok(Ok(profile)) => profile,
        Ok(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, &e),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, &format!("CPU profile task failed: {e}")),
    };
    in_format(format, profile, Kind::Cpu).await
}

/// The argument that makes `pushline` the symbolizing worker (then `heap` or `cpu`).
pub const SYMBOLIZE: &str = "symbolize-profile";

/// Longest a symbolizing worker may take (a debug build's DWARF loads in seconds).
const SYMBOLIZE_TIMEOUT: Duration = Duration::from_secs(120);

/// jemalloc's sampled heap profile. `pprof`: raw addresses with the process's mappings,
/// as jemalloc's own dumps (`pushline-tools heap` names them from the binary on disk);
/// `folded` and `svg`: named by a short-lived worker process.
pub async fn heap(query: &Query) -> Reply {
    let format = match format(query) {
        Ok(f) => f,
        Err(reply) => return reply,
    };
    let pprof = match jemalloc::heap_profile_pprof().await {
        Ok(p) => p,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, &e),
    };
    in_format(format, pprof, Kind::Heap).await
}

/// A profile of raw addresses as asked: as it is (`pprof`), or named by the worker and
/// folded, or drawn.
async fn in_format(format: Format, profile: Vec<u8>, kind: Kind) -> Reply {
    if format == Format::Pprof {
        return reply(StatusCode::OK, content_type(format), profile);
    }
    let folded = match symbolized_in_worker(profile, kind).await {
        Ok(lines) => lines,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, &e),
    };
    let (title, count_name) = match kind {
        Kind::Cpu => ("Pushline CPU", "samples"),
        Kind::Heap => ("Pushline heap: live bytes by stack (sampled)", "bytes"),
    };
    let built = tokio::task::spawn_blocking(move || stacks(format, &folded, title, count_name)).await;
    answer(format, built, &format!("{} profile", kind.as_str()))
}

/// Folded stacks as text, or rendered as a flame graph.
fn stacks(format: Format, lines: &[String], title: &str, count_name: &str) -> Result<Vec<u8>, String> {
    if format == Format::Folded {
        Ok(lines.join("\n").into_bytes())
    } else {
        flame::svg(lines.iter().map(String::as_str), title, count_name)
    }
}

/// The reply for a profile built on a blocking thread.
fn answer(format: Format, built: Result<Result<Vec<u8>, String>, tokio::task::JoinError>, what: &str) -> Reply {
    match built {
        Ok(Ok(body)) => reply(StatusCode::OK, content_type(format), body),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, &e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &format!("{what} task failed: {e}")),
    }
}

fn content_type(format: Format) -> &'static str {
    match format {
        Format::Pprof => "application/octet-stream",
        Format::Svg => "image/svg+xml",
        Format::Folded => "text/plain; charset=utf-8",
    }
}

/// Folded stacks of a profile of raw addresses, named by the short-lived worker
/// (`pushline symbolize-profile`): the DWARF it loads to name addresses (tens of
/// megabytes) is returned to the system when it exits, so looking does not grow the server.
async fn symbolized_in_worker(profile: Vec<u8>, kind: Kind) -> Result<Vec<String>, String> {
    use tokio::io::AsyncWriteExt;
    // /proc/self/exe is the running binary even if the file on disk was replaced.
    let mut worker = tokio::process::Command::new("/proc/self/exe")
        .args([SYMBOLIZE, kind.as_str()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start the symbolizing worker: {e}"))?;
    let mut stdin = worker.stdin.take().ok_or("the symbolizing worker has no stdin")?;
    let fed = async move {
        stdin.write_all(&profile).await?;
        stdin.shutdown().await
    };
    let (fed, out) = tokio::join!(fed, tokio::time::timeout(SYMBOLIZE_TIMEOUT, worker.wait_with_output()));
    let out = out.map_err(|_| format!("the symbolizing worker took longer than {SYMBOLIZE_TIMEOUT:?}"))?.map_err(|e| format!("symbolizing worker: {e}"))?;
    if !out.status.success() {
        return Err(format!("the symbolizing worker failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim()));
    }
    fed.map_err(|e| format!("feeding the symbolizing worker: {e}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect())
}
