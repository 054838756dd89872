//! `flamegraph`: CPU flame graphs of a live server, differential flame graphs of two
//! profiles, and flame graphs of stacks bpftrace sampled (`probes/cpu-stacks.bt`).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use crate::target::Admin;

/// Collapsed stacks of a live server's CPU over `seconds`.
pub fn cpu_folded(admin: &Admin, seconds: u64) -> Result<String, String> {
    let body = admin.get(&format!("/debug/pprof/profile?seconds={seconds}&format=folded"), Duration::from_secs(seconds + 30))?;
    String::from_utf8(body).map_err(|e| format!("profile is not text: {e}"))
}

/// Collapsed stacks of a window its always-on profiler kept (`query`: `minutes=M` or
/// `from=..&to=..`), or, with a base window in `query`, its differential folded stacks.
pub fn cpu_folded_window(admin: &Admin, query: &str) -> Result<String, String> {
    let body = admin.get(&format!("/debug/pprof/profile?{query}&format=folded"), Duration::from_secs(120))?;
    String::from_utf8(body).map_err(|e| format!("profile is not text: {e}"))
}

pub fn svg(folded: &str, title: &str, count_name: &str) -> Result<Vec<u8>, String> {
    pushline_alloc::flame::svg(folded.lines(), title, count_name)
}

/// A differential flame graph: frames coloured by how much they grew from `before` to `after`.
pub fn diff_svg(before: &Path, after: &Path) -> Result<Vec<u8>, String> {
    let mut folded = Vec::new();
    inferno::differential::from_files(inferno::differential::Options::default(), before, after, &mut folded)
        .map_err(|e| format!("diff of {} and {}: {e}", before.display(), after.display()))?;
    let folded = String::from_utf8(folded).map_err(|e| e.to_string())?;
    svg(&folded, &format!("{} -> {}", before.display(), after.display()), "samples")
}

/// Collapses bpftrace's printed stack maps (`@[\n frame\n ...\n]: count`, as
/// `ustack(perf)` prints them, innermost frame first) into folded lines. A key of two
/// stacks, `kstack` then `ustack` (`probes/cpu-stacks.bt`), is printed with a `,` line
/// between them: the kernel frames go on top of the user frames, marked `_[k]` (inferno
/// colours them as kernel).
pub fn fold_bpftrace(text: &str) -> String {
    let mut stacks: BTreeMap<String, u64> = BTreeMap::new();
    let mut frames: Option<Vec<String>> = None;
    let mut kernel: Vec<String> = Vec::new();
    for line in text.lines() {
        let trimmed = line.trim();
        // `@[, ` opens a key whose kernel stack is empty: a sample taken in user space.
        if trimmed.starts_with('@') && (trimmed.ends_with('[') || trimmed.ends_with("[,")) {
            frames = Some(Vec::new());
            kernel.clear();
        } else if let Some(stack) = frames.as_mut() {
            if trimmed == "," {
                kernel = std::mem::take(stack).into_iter().map(|f| format!("{f}_[k]")).collect();
            } else if let Some(count) = trimmed.strip_prefix("]:") {
                let count: u64 = count.trim().parse().unwrap_or(0);
                let names: Vec<String> = std::mem::take(stack).into_iter().rev().chain(kernel.drain(..).rev()).collect();
                if !names.is_empty() && count > 0 {
                    *stacks.entry(names.join(";")).or_default() += count;
                }
                frames = None;
            } else if !trimmed.is_empty() {
                stack.push(frame_name(trimmed));
            }
        }
    }
    stacks.into_iter().map(|(s, n)| format!("{s} {n}\n")).collect()
}

/// The sampling script `--kernel` runs: `probes/cpu-stacks.bt`, shipped in the binary.
const CPU_STACKS_BT: &str = include_str!("../../probes/cpu-stacks.bt");

/// On-CPU stacks of `pid`, kernel and user, sampled by bpftrace for `seconds`, folded.
pub fn kernel_folded(pid: u32, seconds: u64) -> Result<String, String> {
    let script = std::env::temp_dir().join(format!("pushline-cpu-stacks-{}.bt", std::process::id()));
    std::fs::write(&script, CPU_STACKS_BT).map_err(|e| format!("cannot write {}: {e}", script.display()))?;
    let child = std::process::Command::new("bpftrace")
        .arg(&script)
        .arg(pid.to_string())
        .env("BPFTRACE_CACHE_USER_SYMBOLS", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run bpftrace: {e} (apt-get install -y bpftrace; it needs root)"))?;
    std::thread::sleep(Duration::from_secs(seconds));
    // bpftrace prints its maps when interrupted.
    // SAFETY: kill takes integers; the pid is our child's, not yet waited for.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let out = child.wait_with_output().map_err(|e| format!("bpftrace: {e}"))?;
    let _ = std::fs::remove_file(&script);
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !stdout.contains("Tracing pushline") {
        return Err(format!("bpftrace failed (it needs root, and tracefs mounted: mount -t tracefs nodev /sys/kernel/tracing): {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(fold_bpftrace(&stdout))
}

/// `7f12ab34 name+123 (/path)` or `name+123` -> `name`, demangled as far as the text allows.
fn frame_name(frame: &str) -> String {
    let mut words = frame.split_whitespace();
    let first = words.next().unwrap_or("");
    let symbol = if first.chars().all(|c| c.is_ascii_hexdigit()) { words.next().unwrap_or(first) } else { first };
    let symbol = symbol.rsplit_once('+').map_or(symbol, |(name, off)| if off.chars().all(|c| c.is_ascii_digit() || c == 'x') { name } else { symbol });
    let symbol = strip_rust_hash(symbol);
    unescape_legacy(symbol).replace(';', ":")
}

/// The escapes Rust's legacy mangling leaves in names bpftrace half-demangles
/// (`_$u7b$$u7b$closure$u7d$$u7d$` -> `{{closure}}`).
fn unescape_legacy(symbol: &str) -> String {
    const ESCAPES: [(&str, &str); 12] = [
        ("$u7b$", "{"), ("$u7d$", "}"), ("$LT$", "<"), ("$GT$", ">"), ("$u20$", " "), ("$RF$", "&"),
        ("$BP$", "*"), ("$LP$", "("), ("$RP$", ")"), ("$C$", ","), ("$u27$", "'"), ("$u5b$", "["),
    ];
    let mut out = symbol.strip_prefix("_$").map_or_else(|| symbol.to_owned(), |rest| format!("${rest}")).replace("::_$", "::$");
    if out.contains('$') {
        out = out.replace("..", "::");
    }
    for (from, to) in ESCAPES {
        out = out.replace(from, to);
    }
    out.replace("$u5d$", "]")
}

/// `pushline::conn::serve::h0123456789abcdef` -> `pushline::conn::serve`.
fn strip_rust_hash(symbol: &str) -> &str {
    match symbol.rsplit_once("::h") {
        Some((head, hash)) if hash.len() == 16 && hash.chars().all(|c| c.is_ascii_hexdigit()) => head,
        _ => symbol,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_bpftrace_stacks_root_first() {
        let text = "Attaching 1 probe...\n\n@[\n\t55d0c0a1 pushline::conn::serve::h0123456789abcdef+12 (/bin/pushline)\n\t55d0c0b2 tokio::runtime::task::raw::poll+3 (/bin/pushline)\n\t55d0c0c3 start_thread+99 (/lib/libc.so.6)\n]: 7\n@[\n\t55d0c0a1 pushline::conn::serve::h0123456789abcdef+40 (/bin/pushline)\n\t55d0c0b2 tokio::runtime::task::raw::poll+3 (/bin/pushline)\n\t55d0c0c3 start_thread+99 (/lib/libc.so.6)\n]: 3\n";
        assert_eq!(fold_bpftrace(text), "start_thread;tokio::runtime::task::raw::poll;pushline::conn::serve 10\n");
    }

    #[test]
    fn unescapes_what_bpftrace_leaves_of_legacy_mangling() {
        assert_eq!(frame_name("55d0c0b2 pushline::api::Api::publish::_$u7b$$u7b$closure$u7d$$u7d$+3 (/bin/pushline)"), "pushline::api::Api::publish::{{closure}}");
        assert_eq!(frame_name("_$LT$T$u20$as$u20$core..any..Any$GT$::type_id"), "<T as core::any::Any>::type_id");
    }

    #[test]
    fn puts_kernel_frames_on_top_of_user_frames() {
        let text = "@[\n\tffffffff816bb9c4 tcp_sendmsg+84\n\tffffffff821ef691 do_syscall_64+113\n, \n\t7fbb1bd75350 __GI___write+16 (/usr/lib/libc.so.6)\n\t55d0c0b2 pushline::conn::flush+3 (/bin/pushline)\n]: 5\n@[, \n\t55d0c0b2 pushline::conn::flush+3 (/bin/pushline)\n]: 2\n";
        assert_eq!(
            fold_bpftrace(text),
            "pushline::conn::flush 2\npushline::conn::flush;__GI___write;do_syscall_64_[k];tcp_sendmsg_[k] 5\n"
        );
    }
}
