//! `unicast` across two nodes, small, on the debug build: every push reaches its client
//! through Pushline's nodes and through the floor's, so the figures compare two servers
//! that did the same work.

mod common;

#[test]
fn every_push_crosses_the_nodes_of_pushline_and_of_the_floor() {
    for batch in ["1", "10"] {
        let value = common::run_bench(&["unicast", "--nodes", "2", "--connections", "50", "--rate", "200", "--seconds", "1", "--batch", batch]);
        assert_eq!(value["pushes_sent"], 200.0, "batch {batch}");
        assert_eq!(value["pushes_delivered"], 200.0, "batch {batch}: Pushline delivered every push");
        assert_eq!(value["floor_pushes_delivered"], 200.0, "batch {batch}: the floor delivered every push");
        assert!(value["redis_round_trips_per_push"] > 0.0, "batch {batch}: pushes went through Redis");
    }
}
