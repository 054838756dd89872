//! `/debug/pprof/profile` (CPU, from the always-on profiler: a window of the past, the
//! difference of two, or a burst) and `/debug/pprof/heap` (jemalloc's sampled heap
//! profile), each as gzipped profile.proto (what `go tool pprof` reads), an inferno flame
//! graph SVG, or folded stacks.

use std::time::Duration;

use hyper::StatusCode;
use pushline_alloc::symbolize::Kind;
use pushline_alloc::{flame, jemalloc};
use pushline_profiler::Profiler;

use crate::clock;

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

/// The CPU profile: of a window of the past the always-on profiler kept (`?minutes=M`,
/// or `?from=..&to=..` in RFC 3339 or Unix seconds), answered at once; or of the next
/// `?seconds=N` (default 30) at `?frequency=F` (default 99), a burst of the same
/// collector (one at a time: 409). A burst whose client hangs up ends then.
pub async fn cpu(query: &Query, profiler: &Profiler) -> Reply {
    let format = match format(query) {
        Ok(f) => f,
        Err(reply) => return reply,
    };
    let windowed = query.get("minutes").is_some() || query.get("from").is_some() || query.get("to").is_some();
    let based = ["base_minutes", "base_from", "base_to"].iter().any(|name| query.get(name).is_some());
    if based && !windowed {
        return error(StatusCode::BAD_REQUEST, "a base is compared with a window: give minutes= or from=/to= too");
    }
    let raw = query.get("symbolize") == Some("none");
    let (samples, hz, started, took) = if windowed {
        let kept = Kept::of(profiler);
        let (from, to) = match window(query, &kept) {
            Ok(span) => span,
            Err(reply) => return reply,
        };
        let samples = profiler.window(from, to);
        let (started, took) = (from * 60, seconds_of(from, to));
        if based {
            let (base_from, base_to) = match base_window(query, from, &kept) {
                Ok(span) => span,
                Err(reply) => return reply,
            };
            let base = profiler.window(base_from, base_to);
            // Rates: the window's CPU against the base's over the same length of time.
            let scale = took.as_secs_f64() / seconds_of(base_from, base_to).as_secs_f64().max(1.0);
            return difference(format, &samples, &base, scale, profiler.base_hz(), started, took, raw).await;
        }
        (samples, profiler.base_hz(), started, took)
    } else {
        let seconds = match query.number("seconds", 30, 1..=300) {
            Ok(s) => s,
            Err(reply) => return reply,
        };
        let frequency = match query.number("frequency", 99, 1..=1000) {
            Ok(f) => f as u32,
            Err(reply) => return reply,
        };
        let Some(burst) = profiler.start_burst(frequency) else {
            return error(StatusCode::CONFLICT, "a CPU profile is already running; one at a time");
        };
        let started = clock::wall_ms() / 1000;
        tokio::time::sleep(Duration::from_secs(seconds) + pushline_profiler::DRAINED_WITHIN).await;
        let (samples, took) = profiler.finish(burst);
        (samples, frequency.max(profiler.base_hz()), started, took)
    };
    let profile = pushline_profiler::pprof::encode(&samples, hz, started as i64 * 1_000_000_000, took.as_nanos() as i64);
    in_format(format, profile, Kind::Cpu, raw).await
}

/// What the profiler keeps, as Unix minutes: from `oldest` to `now`, at most `minutes`.
#[derive(Clone, Copy)]
struct Kept {
    oldest: u64,
    now: u64,
    minutes: u64,
}

impl Kept {
    fn of(profiler: &Profiler) -> Kept {
        let now = pushline_profiler::unix_minute();
        Kept { oldest: profiler.oldest().unwrap_or(now), now, minutes: profiler.window_minutes() }
    }
}

/// How long the minutes `from..=to` (Unix) have lasted: the current one only so far.
fn seconds_of(from: u64, to: u64) -> Duration {
    let now_s = clock::wall_ms() / 1000;
    Duration::from_secs(((to + 1) * 60).min(now_s.max(from * 60 + 1)) - from * 60)
}

/// `?{prefix}minutes=` (whole minutes, at least 1, at most the window), or None.
fn minutes_of(query: &Query, name: &str, kept: &Kept) -> Result<Option<u64>, Reply> {
    let Some(text) = query.get(name) else { return Ok(None) };
    let kept = kept.minutes;
    match text.parse::<u64>() {
        Ok(m) if (1..=kept).contains(&m) => Ok(Some(m)),
        _ => Err(error(StatusCode::BAD_REQUEST, &format!("{name} must be a whole number of minutes from 1 to {kept} (--profile-window)"))),
    }
}

/// `?{prefix}from=..&{prefix}to=..` as Unix minutes; each defaults to the oldest kept
/// minute and now.
fn span_of(query: &Query, prefix: &str, kept: &Kept) -> Result<(u64, u64), Reply> {
    let at = |name: &str, default: u64| -> Result<u64, Reply> {
        let name = format!("{prefix}{name}");
        match query.get(&name) {
            None => Ok(default),
            Some(text) => instant(text).map(|s| s / 60).ok_or_else(|| {
                error(StatusCode::BAD_REQUEST, &format!("{name}={text}: expected RFC 3339 (2026-12-06T14:19:00Z, or with an offset, +01:00) or Unix seconds"))
            }),
        }
    };
    Ok((at("from", kept.oldest)?, at("to", kept.now)?))
}

/// The minutes (Unix) a windowed request asks for, inside what is kept; or a 400 that
/// says what is kept.
fn window(query: &Query, kept: &Kept) -> Result<(u64, u64), Reply> {
    if query.get("minutes").is_some() && (query.get("from").is_some() || query.get("to").is_some()) {
        return Err(error(StatusCode::BAD_REQUEST, "give minutes, or from and to, not both"));
    }
    let (from, to) = match minutes_of(query, "minutes", kept)? {
        // The minutes that hold the last `minutes` * 60 seconds, as far back as is kept.
        Some(minutes) => (((clock::wall_ms() / 1000).saturating_sub(minutes * 60) / 60).max(kept.oldest), kept.now),
        None => span_of(query, "", kept)?,
    };
    check_kept("", from, to, kept)?;
    Ok((from, to))
}

/// `from..=to` is a span inside what is kept, or a 400 that says what is.
fn check_kept(prefix: &str, from: u64, to: u64, kept: &Kept) -> Result<(), Reply> {
    let Kept { oldest, now, .. } = *kept;
    if from < oldest || to > now || from > now || to < oldest {
        let kept = format!("kept: minutes from {} to now ({}), as --profile-window allows", rfc3339(oldest * 60), rfc3339(now * 60));
        return Err(error(StatusCode::BAD_REQUEST, &format!("that {}window is not kept; {kept}", if prefix.is_empty() { "" } else { "base " })));
    }
    if from > to {
        return Err(error(StatusCode::BAD_REQUEST, &format!("{prefix}from is after {prefix}to")));
    }
    Ok(())
}

/// The base window a difference is taken against: `?base_minutes=M`, the M minutes just
/// before the window (which starts at minute `from`), or `?base_from=..&base_to=..`, any
/// kept span (before, after or across the window).
fn base_window(query: &Query, from: u64, kept: &Kept) -> Result<(u64, u64), Reply> {
    let spans = query.get("base_from").is_some() || query.get("base_to").is_some();
    let (base_from, base_to) = match minutes_of(query, "base_minutes", kept)? {
        Some(_) if spans => return Err(error(StatusCode::BAD_REQUEST, "give base_minutes, or base_from and base_to, not both")),
        Some(minutes) => (from.saturating_sub(minutes), from.saturating_sub(1)),
        None if query.get("base_from").is_none() || query.get("base_to").is_none() => {
            return Err(error(StatusCode::BAD_REQUEST, "give base_from and base_to together, or base_minutes"));
        }
        None => span_of(query, "base_", kept)?,
    };
    check_kept("base_", base_from, base_to, kept)?;
    Ok((base_from, base_to))
}

/// What changed from `base` (scaled by `scale`) to `samples`: a profile.proto whose base
/// samples count negative, or a differential flame graph (inferno's: red grew, blue
/// shrank) and its folded lines (`stack base now`).
#[allow(clippy::too_many_arguments)]
async fn difference(format: Format, samples: &pushline_profiler::table::Samples, base: &pushline_profiler::table::Samples, scale: f64, hz: u32, started: u64, took: Duration, raw: bool) -> Reply {
    let (start_ns, took_ns) = (started as i64 * 1_000_000_000, took.as_nanos() as i64);
    if format == Format::Pprof {
        let profile = pushline_profiler::pprof::encode_diff(samples, Some((base, scale)), hz, start_ns, took_ns);
        return in_format(format, profile, Kind::Cpu, raw).await;
    }
    let folded = |samples: &pushline_profiler::table::Samples| {
        let profile = pushline_profiler::pprof::encode(samples, hz, start_ns, took_ns);
        async move { in_worker(profile, Kind::Cpu, "folded").await.map(|text| String::from_utf8_lossy(&text).lines().map(str::to_owned).collect::<Vec<_>>()) }
    };
    let (before, after) = match tokio::try_join!(folded(base), folded(samples)) {
        Ok(both) => both,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, &e),
    };
    let built = tokio::task::spawn_blocking(move || {
        let lines = flame::differential(&before, &after, scale)?;
        stacks(format, &lines, "Pushline CPU: what changed (red grew, blue shrank)", "samples")
    })
    .await;
    answer(format, built, "cpu profile difference")
}

/// Unix seconds of an RFC 3339 time (`Z`, or an offset such as `+01:00`) or of a number
/// of seconds.
fn instant(text: &str) -> Option<u64> {
    if let Ok(seconds) = text.parse() {
        return Some(seconds);
    }
    // humantime reads UTC only: an offset is taken off by hand.
    let (utc, offset_s) = match text.len().checked_sub(6).and_then(|at| Some((at, text.get(at..)?))) {
        Some((at, offset)) if offset.starts_with(['+', '-']) && offset.as_bytes()[3] == b':' => {
            let (hours, minutes): (i64, i64) = (offset[1..3].parse().ok()?, offset[4..6].parse().ok()?);
            let sign = if offset.starts_with('-') { -1 } else { 1 };
            (&text[..at], sign * (hours * 3600 + minutes * 60))
        }
        _ => (text.strip_suffix('Z').unwrap_or(text), 0),
    };
    let at = humantime::parse_rfc3339_weak(utc).ok()?.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs() as i64;
    u64::try_from(at - offset_s).ok()
}

fn rfc3339(unix_seconds: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(unix_seconds)).to_string()
}

/// The argument that makes `pushline` the symbolizing worker (then `heap` or `cpu`).
pub const SYMBOLIZE: &str = "symbolize-profile";

/// Longest a symbolizing worker may take (a debug build's DWARF loads in seconds).
const SYMBOLIZE_TIMEOUT: Duration = Duration::from_secs(120);

/// jemalloc's sampled heap profile, named by a short-lived worker process.
pub async fn heap(query: &Query) -> Reply {
    let format = match format(query) {
        Ok(f) => f,
        Err(reply) => return reply,
    };
    let pprof = match jemalloc::heap_profile_pprof().await {
        Ok(p) => p,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, &e),
    };
    in_format(format, pprof, Kind::Heap, query.get("symbolize") == Some("none")).await
}

/// A profile of raw addresses as asked, named by the worker: as profile.proto with its
/// names in it (`pprof`; `&symbolize=none` leaves the raw addresses, for a reader that
/// names them itself), folded, or drawn.
async fn in_format(format: Format, profile: Vec<u8>, kind: Kind, raw: bool) -> Reply {
    if format == Format::Pprof {
        if raw {
            return reply(StatusCode::OK, content_type(format), profile);
        }
        return match in_worker(profile, kind, "pprof").await {
            Ok(named) => reply(StatusCode::OK, content_type(format), named),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e),
        };
    }
    let folded: Vec<String> = match in_worker(profile, kind, "folded").await {
        Ok(text) => String::from_utf8_lossy(&text).lines().map(str::to_owned).collect(),
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

/// A profile of raw addresses named by the short-lived worker (`pushline
/// symbolize-profile`), as folded stacks or as a named profile.proto: the DWARF it loads
/// to name addresses (tens of megabytes) is returned to the system when it exits, so
/// looking does not grow the server.
async fn in_worker(profile: Vec<u8>, kind: Kind, output: &str) -> Result<Vec<u8>, String> {
    use tokio::io::AsyncWriteExt;
    // /proc/self/exe is the running binary even if the file on disk was replaced.
    let mut worker = tokio::process::Command::new("/proc/self/exe")
        .args([SYMBOLIZE, kind.as_str(), output])
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
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::instant;

    #[test]
    fn times_are_read_in_utc_with_or_without_an_offset() {
        let utc = instant("2026-12-06T14:19:00Z").unwrap();
        assert_eq!(instant("2026-12-06T15:19:00+01:00"), Some(utc));
        assert_eq!(instant("2026-12-06T09:19:00-05:00"), Some(utc));
        assert_eq!(instant("2026-12-06T14:19:00"), Some(utc));
        assert_eq!(instant(&utc.to_string()), Some(utc));
        for bad in ["", "yesterday", "2026-12-06T14:19:00+1:00", "2026-13-06T14:19:00Z", "-5"] {
            assert_eq!(instant(bad), None, "{bad}");
        }
    }
}
