//! The soak scenario, two minutes of it, on the debug build: connections churning,
//! pushes and broadcasts, slow clients, Redis restarting empty halfway. Nothing panics,
//! memory stays flat, and every publish that was not delivered was answered and counted.

use std::collections::HashMap;

#[test]
fn two_minutes_of_everything_leave_nothing_behind() {
    let dir = std::env::temp_dir().join(format!("pushline-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("soak.json");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pushline-bench"))
        .arg("--json")
        .arg(&json)
        .args(["soak", "--connections", "1000", "--minutes", "2", "--rate", "50", "--sample", "10"])
        .output()
        .expect("pushline-bench runs");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "soak failed: {}", log.lines().rev().take(30).collect::<Vec<_>>().join("\n"));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let value: HashMap<String, f64> = rows.iter().map(|r| (r["metric"].as_str().unwrap().to_owned(), r["value"].as_f64().unwrap())).collect();
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(value["server_panics"], 0.0);
    assert_eq!(value["publishes_failed"], 0.0, "every publish was answered");
    let refused_and_counted = value["registry_unavailable"] + value["node_over_budget"];
    assert!(value["publishes_answered_other"] <= refused_and_counted, "every publish refused was counted as dropped");
    assert!(value["publishes_answered_200"] > 3000.0, "publishing kept going");
    assert!(value["rss_growth_after_warm_up"] < 15.0, "RSS grew {}% after warm-up", value["rss_growth_after_warm_up"]);
    assert!(
        value["redis_dataset_at_end"] < value["redis_dataset_after_warm_up"] * 1.5,
        "Redis memory grew: {} -> {}",
        value["redis_dataset_after_warm_up"],
        value["redis_dataset_at_end"]
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
