//! `unicast` across two nodes, small, on the debug build: every push reaches its client
//! through Pushline's nodes and through the floor's, so the figures compare two servers
//! that did the same work.

use std::collections::HashMap;

#[test]
fn every_push_crosses_the_nodes_of_pushline_and_of_the_floor() {
    let json = std::env::temp_dir().join(format!("pushline-unicast-{}.json", std::process::id()));
    for batch in ["1", "10"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_pushline-bench"))
            .arg("--json")
            .arg(&json)
            .args(["unicast", "--nodes", "2", "--connections", "50", "--rate", "200", "--seconds", "1", "--batch", batch])
            .output()
            .expect("pushline-bench runs");
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "unicast failed: {}", log.lines().rev().take(30).collect::<Vec<_>>().join("\n"));
        let rows: Vec<serde_json::Value> = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        let value: HashMap<String, f64> = rows.iter().map(|r| (r["metric"].as_str().unwrap().to_owned(), r["value"].as_f64().unwrap())).collect();
        assert_eq!(value["pushes_sent"], 200.0, "batch {batch}");
        assert_eq!(value["pushes_delivered"], 200.0, "batch {batch}: Pushline delivered every push");
        assert_eq!(value["floor_pushes_delivered"], 200.0, "batch {batch}: the floor delivered every push");
        assert!(value["redis_round_trips_per_push"] > 0.0, "batch {batch}: pushes went through Redis");
    }
    std::fs::remove_file(&json).unwrap();
}
