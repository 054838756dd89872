//! Runs `pushline-bench` as a user would, and reads the rows it writes with `--json`.

use std::collections::HashMap;

/// The figures of one `pushline-bench ARGS` run, by metric; panics with the end of its log
/// when it fails.
pub fn run_bench(args: &[&str]) -> HashMap<String, f64> {
    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let json = std::env::temp_dir().join(format!("pushline-bench-{}-{run}.json", std::process::id()));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pushline-bench")).arg("--json").arg(&json).args(args).output().expect("pushline-bench runs");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "pushline-bench {args:?} failed: {}", log.lines().rev().take(30).collect::<Vec<_>>().join("\n"));
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    std::fs::remove_file(&json).unwrap();
    // JSON has no infinity or NaN: such a value is written null, read back as NaN.
    rows.iter().map(|r| (r["metric"].as_str().unwrap().to_owned(), r["value"].as_f64().unwrap_or(f64::NAN))).collect()
}
