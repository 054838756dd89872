//! `presence`: what a join costs in a large presence topic. M members subscribe to one
//! topic, each a uid of its own; then J more clients join it, one every `gap`, and leave
//! again. Reported: server CPU per join and leave, the presence frames told (one per batch,
//! whatever the joins in it) and the deliveries per join; and the same J subscribes in a
//! run where the topic keeps no presence, so what presence adds is the difference.

use std::time::{Duration, Instant};

use crate::client;
use crate::driver::ServerProcess;
use crate::report::Row;
use crate::Common;

const TOPIC: &str = "room.big";
const DELIVERED: &str = "pushline_messages_delivered_total";
const COUNT_FRAMES: &str = r#"pushline_presence_events_total{kind="count"}"#;
const CONNECTIONS: &str = r#"pushline_connections{transport="ws"}"#;

pub async fn run(common: &Common, members: usize, joins: usize, gap: Duration) -> Result<Vec<Row>, String> {
    let mut rows = Vec::new();
    let mut cpu = [0.0; 2];
    for (i, presence) in [false, true].into_iter().enumerate() {
        let mut args = common.server_args.clone();
        if presence {
            args.push(format!("--presence-topics={TOPIC}"));
        }
        let server = ServerProcess::start(&common.server_bin, &args)?;
        let held = super::open_subscribed(server.client, members, common.parallel, common.spread, "member", TOPIC).await?;
        server.wait_metric(CONNECTIONS, members as f64, Duration::from_secs(60)).await?;
        // Past the members' own joins' batches.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (cpu0, delivered0, frames0) = (server.cpu_time(), server.metric(DELIVERED).await, server.metric(COUNT_FRAMES).await);
        let started = Instant::now();
        let mut joined = Vec::with_capacity(joins);
        for j in 0..joins {
            let query = format!("uid=joiner{j}&topics={TOPIC}");
            joined.push(client::open(server.client, client::source_ip(members + j, common.spread), &query, None).await.map_err(|e| format!("joiner {j}: {e}"))?);
            tokio::time::sleep(gap).await;
        }
        drop(joined);
        server.wait_metric(CONNECTIONS, members as f64, Duration::from_secs(30)).await?;
        // The last batch told.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let took = started.elapsed();
        let spent = server.cpu_time().since(cpu0).total().as_secs_f64();
        cpu[i] = spent * 1e6 / joins as f64;
        let (delivered, frames) = (server.metric(DELIVERED).await - delivered0, server.metric(COUNT_FRAMES).await - frames0);
        rows.push(Row::new("presence", if presence { "presence_cpu_per_join_and_leave" } else { "plain_cpu_per_join_and_leave" }, cpu[i], "us"));
        if presence {
            rows.push(Row::new("presence", "count_frames_per_batch_window", frames / (took.as_secs_f64() / 0.2), "x"));
            rows.push(Row::new("presence", "deliveries_per_join", delivered / joins as f64, "x"));
            rows.push(Row::new("presence", "count_frames", frames, "frames"));
        }
        drop(held);
    }
    rows.push(Row::new("presence", "added_cpu_per_join_and_leave", cpu[1] - cpu[0], "us"));
    Ok(rows)
}
