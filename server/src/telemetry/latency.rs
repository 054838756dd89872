//! The delivery-latency histogram, counted in integer buckets as each message is written
//! (two relaxed atomic adds, no allocation) and rendered as a Prometheus histogram when
//! scraped. The exporter's own histograms keep every sample, a float and a timestamp, until
//! upkeep drains them: an allocation's share per delivery, on the fan-out's hottest path.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub struct LatencyHistogram {
    /// Upper bounds, in nanoseconds, ascending.
    bounds_ns: Box<[u64]>,
    /// Observations per bucket (not cumulative); the last is above every bound.
    counts: Box<[AtomicU64]>,
    sum_ns: AtomicU64,
}

impl LatencyHistogram {
    /// `bounds`: upper bounds in seconds, ascending.
    pub fn new(bounds: &[f64]) -> LatencyHistogram {
        LatencyHistogram {
            bounds_ns: bounds.iter().map(|s| (s * 1e9) as u64).collect(),
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
        }
    }

    pub fn record(&self, latency: Duration) {
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        let bucket = self.bounds_ns.partition_point(|bound| *bound < ns);
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Appends the histogram to a Prometheus text exposition.
    pub fn render(&self, name: &str, help: &str, out: &mut String) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, count) in self.counts.iter().enumerate() {
            cumulative += count.load(Ordering::Relaxed);
            match self.bounds_ns.get(i) {
                Some(bound) => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"{}\"}} {cumulative}", *bound as f64 / 1e9);
                }
                None => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
                }
            }
        }
        let _ = writeln!(out, "{name}_sum {}", self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9);
        let _ = writeln!(out, "{name}_count {cumulative}\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_cumulative_buckets_sum_and_count() {
        let h = LatencyHistogram::new(&[0.001, 0.01, 1.0]);
        h.record(Duration::from_micros(500));
        h.record(Duration::from_millis(1));
        h.record(Duration::from_millis(5));
        h.record(Duration::from_secs(3));
        let mut out = String::new();
        h.render("x_seconds", "help", &mut out);
        for line in [
            r#"x_seconds_bucket{le="0.001"} 2"#,
            r#"x_seconds_bucket{le="0.01"} 3"#,
            r#"x_seconds_bucket{le="1"} 3"#,
            r#"x_seconds_bucket{le="+Inf"} 4"#,
            "x_seconds_sum 3.0065",
            "x_seconds_count 4",
            "# TYPE x_seconds histogram",
        ] {
            assert!(out.lines().any(|l| l == line), "no `{line}` in\n{out}");
        }
    }
}
