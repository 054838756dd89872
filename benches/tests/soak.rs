//! The soak scenario, two minutes of it, on the debug build: connections churning,
//! pushes and broadcasts, slow clients, Redis restarting empty halfway. Nothing panics,
//! memory stays flat, and every publish that was not delivered was answered and counted.

mod common;

#[test]
fn two_minutes_of_everything_leave_nothing_behind() {
    let value = common::run_bench(&["soak", "--connections", "1000", "--minutes", "2", "--rate", "50", "--sample", "10"]);
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
}
