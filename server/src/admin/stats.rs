//! `/debug/stats`: what the dashboard draws, in one JSON object: counters as totals (the
//! page takes rates between two polls), the delivery-latency histogram's buckets (the page
//! takes quantiles over the same window), and memory per connection by component. Built
//! from the same metrics `/metrics` exports, when asked: nothing is sampled while no page
//! is open, and a poll's cost does not grow with connections (kernel buffers are read from
//! a sample of the sockets).

use std::collections::BTreeMap;

use serde_json::{json, Value};

use pushline_alloc::socket::SocketMemory;

use super::{memory, Admin};

/// Sockets whose SO_MEMINFO a poll reads, spread over the fd table: a poll's cost stays
/// flat as connections grow.
pub const SOCKETS_SAMPLED: usize = 512;

/// Series of the Prometheus text, as `name{labels}` -> value.
fn series(text: &str) -> BTreeMap<&str, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter_map(|(name, value)| Some((name, value.parse().ok()?)))
        .collect()
}

/// The values of `name{label="...",...}` series by the value of `label`.
fn by_label(all: &BTreeMap<&str, f64>, name: &str, label: &str) -> BTreeMap<String, f64> {
    let prefix = format!("{name}{{");
    let needle = format!("{label}=\"");
    all.iter()
        .filter(|(k, _)| k.starts_with(&prefix))
        .filter_map(|(k, v)| {
            let at = k.find(&needle)? + needle.len();
            let end = k[at..].find('"')? + at;
            Some((k[at..end].to_owned(), *v))
        })
        .fold(BTreeMap::new(), |mut out, (key, v)| {
            *out.entry(key).or_insert(0.0) += v;
            out
        })
}

pub fn stats(admin: &Admin) -> Value {
    // Counters and histograms only: the gauges a scrape refreshes (open files among them,
    // which reads every fd) are read here from `memory_with`, or not shown.
    let text = admin.metrics.exposition();
    let all = series(&text);
    let get = |name: &str| all.get(name).copied().unwrap_or(0.0);
    let sum = |name: &str, label: &str| by_label(&all, name, label).values().sum::<f64>();
    let mut buckets: Vec<(f64, f64)> = by_label(&all, "pushline_delivery_latency_seconds_bucket", "le")
        .into_iter()
        .map(|(le, count)| (if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap_or(f64::INFINITY) }, count))
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let memory = memory::memory_with(admin, SocketMemory::sample_of_this_process(SOCKETS_SAMPLED));
    json!({
        "time_ms": crate::clock::wall_ms(),
        "connections": memory["connections"],
        // Gauges kept as connections open and close, not refreshed by a scrape.
        "transports": by_label(&all, "pushline_connections", "transport"),
        "pusher_apps": by_label(&all, "pushline_pusher_connections", "app"),
        "published": sum("pushline_messages_published_total", "kind"),
        "delivered": get("pushline_messages_delivered_total"),
        "dropped": by_label(&all, "pushline_messages_dropped_total", "reason"),
        "refused": by_label(&all, "pushline_connections_refused_total", "reason"),
        // Cumulative counts at each upper bound, seconds; `null` for +Inf.
        "latency_buckets": buckets.iter().map(|(le, n)| json!([if le.is_finite() { json!(le) } else { Value::Null }, n])).collect::<Vec<_>>(),
        "memory": {
            "per_connection": memory["per_connection"],
            "kernel_socket_structs": memory["per_connection"]["kernel_socket_structs"],
            "rss": memory["process"]["rss_bytes"],
            "jemalloc": memory["jemalloc"],
        },
        "redis": {
            "up": all.get("pushline_redis_up").copied(),
            "errors": sum("pushline_redis_errors_total", "command"),
            "round_trips": sum("pushline_redis_command_seconds_count", "command"),
            "seconds": sum("pushline_redis_command_seconds_sum", "command"),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_by_label_sum_over_other_labels() {
        let text = "# HELP x\nm{kind=\"a\",z=\"1\"} 2\nm{kind=\"a\",z=\"2\"} 3\nm{kind=\"b\"} 1\nn 7\n";
        let all = series(text);
        assert_eq!(all["n"], 7.0);
        let by = by_label(&all, "m", "kind");
        assert_eq!((by["a"], by["b"]), (5.0, 1.0));
    }
}
