//! What an operator runs: the log format, `--check-config`, the systemd unit, the
//! Grafana dashboard and the Prometheus alerts, each checked by the real tool or against
//! the real server.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use common::redis::RedisServer;
use common::*;
use serde_json::json;

fn deploy(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(path)
}

/// Runs a tool the test needs, failing with what to install when it is missing.
fn run(program: &str, package: &str, args: &[&str]) -> std::process::Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} ({e}): install it with `apt-get install -y {package}` (scripts/test does this as root)"))
}

#[test]
fn logs_are_plain_off_a_terminal_and_json_when_asked() {
    let text = Process::spawn(&[], None);
    assert!(text.startup_log.iter().all(|l| !l.contains('\u{1b}')), "no escape codes in a pipe: {:?}", text.startup_log);
    let json = Process::spawn(&["--log-format", "json"], None);
    for line in &json.startup_log {
        let line: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        for field in ["timestamp", "level", "target", "message"] {
            assert!(line.get(field).is_some(), "{field} missing: {line}");
        }
    }
    let listening: serde_json::Value = serde_json::from_str(json.startup_log.last().unwrap()).unwrap();
    assert_eq!(listening["node"], 0, "lines carry the node id: {listening}");
    assert_eq!(listening["level"], "INFO");
}

#[test]
fn check_config_lists_every_problem_and_binds_nothing() {
    let check = |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_pushline")).arg("--check-config").args(args).output().unwrap();
    let good = check(&["--listen", "127.0.0.1:1", "--admin-listen", "127.0.0.1:1"]);
    assert_eq!(good.status.code(), Some(0), "{}", String::from_utf8_lossy(&good.stderr));
    assert!(String::from_utf8_lossy(&good.stdout).contains("valid"));
    let bad = check(&["--listen", "0.0.0.0:80", "--max-client-frame-bytes", "0", "--node-ttl", "10ms"]);
    assert_eq!(bad.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    for problem in ["refuses a non-loopback listener", "--max-client-frame-bytes (0)", "--node-ttl must be at least 1s"] {
        assert!(stderr.contains(problem), "`{problem}` is listed: {stderr}");
    }
    let unknown = check(&["--no-such-flag"]);
    assert_eq!(unknown.status.code(), Some(2));
    // The credential files are read as a start reads them.
    let dir = std::env::temp_dir().join(format!("pushline-check-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let keys = dir.join("keys.toml");
    std::fs::write(&keys, format!("[[key]]\nname = \"a/b\"\nsecret = \"{}\"\nscopes = [\"push\"]\n", "s".repeat(32))).unwrap();
    for (file, says) in [(keys.to_str().unwrap(), "key name `a/b`"), ("/nonexistent/keys.toml", "cannot read")] {
        let refused = check(&["--listen", "127.0.0.1:1", "--admin-listen", "127.0.0.1:1", "--api-keys", file]);
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(refused.status.code() == Some(2) && stderr.contains(says), "{file}: {stderr}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_systemd_unit_verifies_and_is_hardened() {
    let unit = std::fs::read_to_string(deploy("pushline.service")).unwrap();
    let dir = std::env::temp_dir().join(format!("pushline-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("pushline.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/pushline", env!("CARGO_BIN_EXE_pushline"))).unwrap();
    let path = path.to_str().unwrap();
    let verified = run("systemd-analyze", "systemd", &["verify", path]);
    let said = String::from_utf8_lossy(&verified.stderr).into_owned() + &String::from_utf8_lossy(&verified.stdout);
    assert!(verified.status.success() && said.trim().is_empty(), "systemd-analyze verify: {said}");
    let security = run("systemd-analyze", "systemd", &["security", "--offline=yes", path]);
    let report = String::from_utf8_lossy(&security.stdout);
    let exposure: f64 = report
        .lines()
        .find_map(|l| l.split("Overall exposure level for pushline.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in {report}"));
    assert!(exposure <= 2.0, "exposure {exposure} (README says 1.2)");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn alert_rules_pass_promtool() {
    let rules = deploy("prometheus/alerts.yml");
    let checked = run("promtool", "prometheus", &["check", "rules", rules.to_str().unwrap()]);
    assert!(checked.status.success(), "{}", String::from_utf8_lossy(&checked.stdout));
    let tests = deploy("prometheus/alerts_test.yml");
    let tested = run("promtool", "prometheus", &["test", "rules", tests.to_str().unwrap()]);
    assert!(tested.status.success(), "{}{}", String::from_utf8_lossy(&tested.stdout), String::from_utf8_lossy(&tested.stderr));
}

/// Metric names (`pushline_...`) and label names that PromQL `expr` uses.
fn names_in(expr: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut metrics = BTreeSet::new();
    let mut labels = BTreeSet::new();
    let bytes = expr.as_bytes();
    let word_at = |i: usize| {
        let end = bytes[i..].iter().position(|b| !(b.is_ascii_alphanumeric() || *b == b'_')).map_or(bytes.len(), |n| i + n);
        &expr[i..end]
    };
    let mut i = 0;
    while i < bytes.len() {
        if expr[i..].starts_with("pushline_") && (i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_')) {
            let name = word_at(i);
            metrics.insert(name.to_owned());
            i += name.len();
            continue;
        }
        i += 1;
    }
    // Labels: in selectors `{a="..", b=~".."}` and in `by (a, b)` / `on (a)`.
    for part in expr.split('{').skip(1) {
        let inside = part.split('}').next().unwrap_or("");
        for matcher in inside.split(',') {
            let name: String = matcher.trim().chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if !name.is_empty() {
                labels.insert(name);
            }
        }
    }
    for keyword in ["by (", "on ("] {
        for part in expr.split(keyword).skip(1) {
            for name in part.split(')').next().unwrap_or("").split(',') {
                labels.insert(name.trim().to_owned());
            }
        }
    }
    (metrics, labels)
}

#[tokio::test]
async fn the_dashboard_and_alerts_name_only_what_the_server_exports() {
    let redis = RedisServer::start();
    let server = Process::spawn(&["--registry", "redis", "--redis-url", &redis.url()], None);
    // Some of everything, so every histogram has samples.
    let (mut client, _) = ws(server.client, "uid=watcher&topics=t").await;
    post(server.client, "/v1/push", json!({"uids": ["watcher"], "data": 1})).await;
    post(server.client, "/v1/publish", json!({"topic": "t", "data": 2})).await;
    next_json(&mut client).await;
    next_json(&mut client).await;
    let exported = metrics(server.admin).await;
    let exported_labels: BTreeSet<&str> =
        exported.lines().filter(|l| !l.starts_with('#')).filter_map(|l| l.split_once('{')).flat_map(|(_, rest)| rest.split(',').filter_map(|kv| kv.split_once('=').map(|(k, _)| k.trim()))).collect();
    // Labels Prometheus adds to every series it scrapes.
    let added_by_prometheus = ["instance", "job"];

    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(deploy("grafana/pushline.json")).unwrap()).unwrap();
    let mut exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter().map(|t| t["expr"].as_str().unwrap().to_owned()))
        .collect();
    let alerts = std::fs::read_to_string(deploy("prometheus/alerts.yml")).unwrap();
    exprs.extend(alerts.lines().filter_map(|l| l.trim().strip_prefix("expr: ")).map(str::to_owned));
    assert!(exprs.len() > 20, "{} expressions", exprs.len());
    for expr in &exprs {
        let (names, labels) = names_in(expr);
        assert!(!names.is_empty(), "no metric in {expr}");
        for name in names {
            assert!(exported.lines().any(|l| l.starts_with(&format!("{name} ")) || l.starts_with(&format!("{name}{{"))), "{name} (in `{expr}`) is not exported");
        }
        for label in labels {
            assert!(exported_labels.contains(label.as_str()) || added_by_prometheus.contains(&label.as_str()), "label {label} (in `{expr}`) is not exported");
        }
    }
}

/// Prometheus's own linter on a scrape of a server that has had connections, pushes, a
/// slow client's drops and a Redis outage: every series the server exports passes.
#[tokio::test]
async fn a_scrape_passes_promtool_check_metrics() {
    use std::io::Write;
    let redis = RedisServer::start();
    let server = Process::spawn(&["--registry", "redis", "--redis-url", &redis.url(), "--queue-max-messages", "2"], None);
    let (mut client, _) = ws(server.client, "uid=watcher&topics=t").await;
    let _slow = slow_ws(server.client, "uid=slow&topics=t").await;
    post(server.client, "/v1/push", json!({"uids": ["watcher"], "data": 1})).await;
    next_json(&mut client).await;
    let blob = "x".repeat(60_000);
    // More than loopback's socket buffers take, so the slow client's queue overflows.
    for _ in 0..60 {
        post(server.client, "/v1/publish", json!({"topic": "t", "data": blob})).await;
        next_json(&mut client).await;
    }
    wait_metric(server.admin, r#"pushline_messages_dropped_total{reason="queue_full"}"#, |n| n > 0.0).await;
    redis.kill();
    let (status, _) = post(server.client, "/v1/publish", json!({"topic": "t", "data": 2})).await;
    assert_eq!(status, 503, "Redis is down");
    let scrape = metrics(server.admin).await;
    let mut lint = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run promtool ({e}): install it with `apt-get install -y prometheus` (scripts/test does this as root)"));
    lint.stdin.take().unwrap().write_all(scrape.as_bytes()).unwrap();
    let out = lint.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && said.trim().is_empty(), "promtool check metrics:\n{said}");
}
