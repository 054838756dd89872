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
/// `ustack(perf)` prints them, innermost frame first) into folded lines.
pub fn fold_bpftrace(text: &str) -> String {
    let mut stacks: BTreeMap<String, u64> = BTreeMap::new();
    let mut frames: Option<Vec<String>> = None;
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('@') && trimmed.ends_with('[') {
            frames = Some(Vec::new());
        } else if let Some(stack) = frames.as_mut() {
            if let Some(count) = trimmed.strip_prefix("]:") {
                let count: u64 = count.trim().parse().unwrap_or(0);
                let mut names: Vec<String> = std::mem::take(stack);
                names.reverse();
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

/// `7f12ab34 name+123 (/path)` or `name+123` -> `name`, demangled as far as the text allows.
fn frame_name(frame: &str) -> String {
    let mut words = frame.split_whitespace();
    let first = words.next().unwrap_or("");
    let symbol = if first.chars().all(|c| c.is_ascii_hexdigit()) { words.next().unwrap_or(first) } else { first };
    let symbol = symbol.rsplit_once('+').map_or(symbol, |(name, off)| if off.chars().all(|c| c.is_ascii_digit() || c == 'x') { name } else { symbol });
    let symbol = strip_rust_hash(symbol);
    symbol.replace(';', ":")
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
}
