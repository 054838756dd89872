//! `/debug/query/<name>`: the talk's live debug hook, made safe. Instead of running code
//! sent to it, the admin runs one of a fixed set of read-only queries over the server's
//! live state, with parameters, and answers JSON. A name or parameter it does not know is
//! a 400 that names it.

use std::sync::Arc;
use std::time::Duration;

use pushline_alloc::table;
use serde_json::{json, Value};

use super::{Admin, Query};
use crate::conn::{Conn, ConnInfo};

/// One query: its name, its parameters (name, meaning), and what it answers.
struct QueryDef {
    name: &'static str,
    params: &'static [(&'static str, &'static str)],
    answers: &'static str,
}

const fn def(name: &'static str, params: &'static [(&'static str, &'static str)], answers: &'static str) -> QueryDef {
    QueryDef { name, params, answers }
}

const QUERIES: [QueryDef; 5] = [
    def("connections_of", &[("uid", "required"), ("min_queue", "queued messages, at least (0)")], "the uid's connections here with at least min_queue messages queued"),
    def("queued_above", &[("min_queue", "required"), ("limit", "rows (100)")], "connections with more than min_queue messages queued, deepest first"),
    def("idle_longer_than", &[("seconds", "required"), ("limit", "rows (100)")], "connections whose client sent nothing for longer than `seconds`, longest first"),
    def("top_topics", &[("limit", "rows (10)")], "topics by subscribers here, most first"),
    def("site_delta", &[("seconds", "1 to 60 (5)")], "how each allocation site's live bytes and allocations change over the next `seconds`"),
];

/// A 400's message.
pub type Refusal = String;

pub async fn run(admin: &Admin, name: &str, query: &Query) -> Result<Value, Refusal> {
    let Some(QueryDef { params, .. }) = QUERIES.iter().find(|q| q.name == name) else {
        let names: Vec<&str> = QUERIES.iter().map(|q| q.name).collect();
        return Err(format!("no query `{name}`; the queries are {}", names.join(", ")));
    };
    if let Some((unknown, _)) = query.0.iter().find(|(k, _)| !params.iter().any(|(p, _)| p == k)) {
        let known: Vec<&str> = params.iter().map(|(p, _)| *p).collect();
        return Err(format!("query `{name}` takes no parameter `{unknown}`; it takes {}", known.join(", ")));
    }
    let number = |key: &str, default: Option<u64>, range: std::ops::RangeInclusive<u64>| -> Result<u64, Refusal> {
        match (query.get(key), default) {
            (None, Some(d)) => Ok(d),
            (None, None) => Err(format!("query `{name}` needs parameter `{key}`")),
            (Some(text), _) => text
                .parse::<u64>()
                .ok()
                .filter(|n| range.contains(n))
                .ok_or_else(|| format!("parameter `{key}`={text}: expected a whole number from {} to {}", range.start(), range.end())),
        }
    };
    let now = crate::clock::now_ms();
    let rows = |mut conns: Vec<ConnInfo>, limit: u64| {
        conns.truncate(limit as usize);
        json!({ "query": name, "rows": conns.len(), "connections": conns })
    };
    Ok(match name {
        "connections_of" => {
            let uid = query.get("uid").ok_or_else(|| format!("query `{name}` needs parameter `uid`"))?;
            let min = number("min_queue", Some(0), 0..=u32::MAX as u64)? as usize;
            let conns: Vec<ConnInfo> = admin.hub.describe_uid(uid).into_iter().filter(|c| c.queued_messages >= min).collect();
            rows(conns, u64::MAX)
        }
        "queued_above" => {
            let min = number("min_queue", None, 0..=u32::MAX as u64)?;
            let limit = number("limit", Some(100), 1..=100_000)?;
            rows(largest(admin, now, limit, min, |c| c.queued().0 as u64), limit)
        }
        "idle_longer_than" => {
            let seconds = number("seconds", None, 0..=30 * 86_400)?;
            let limit = number("limit", Some(100), 1..=100_000)?;
            rows(largest(admin, now, limit, seconds * 1000, |c| c.silent_ms(now)), limit)
        }
        "top_topics" => {
            let limit = number("limit", Some(10), 1..=100_000)? as usize;
            let mut topics = admin.hub.topic_subscribers();
            topics.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            topics.truncate(limit);
            json!({ "query": name, "rows": topics.len(), "topics": topics.iter().map(|(t, n)| json!({ "topic": &**t, "subscribers": n })).collect::<Vec<_>>() })
        }
        "site_delta" => {
            let seconds = number("seconds", Some(5), 1..=60)?;
            let before = table::snapshot();
            tokio::time::sleep(Duration::from_secs(seconds)).await;
            let after = table::snapshot();
            let mut sites: Vec<Value> = after
                .iter()
                .zip(&before)
                .map(|(a, b)| json!({
                    "site": a.site,
                    "live_bytes": a.live_bytes - b.live_bytes,
                    "live_allocs": a.live_allocs - b.live_allocs,
                    "allocs": a.total_allocs - b.total_allocs,
                    "bytes_allocated": a.total_bytes - b.total_bytes,
                }))
                .collect();
            sites.sort_by_key(|s| std::cmp::Reverse(s["live_bytes"].as_i64().unwrap_or(0)));
            json!({ "query": name, "seconds": seconds, "sites": sites })
        }
        _ => unreachable!("every name in QUERIES is answered above"),
    })
}

/// Up to `limit` connections whose `measure` is above `floor`, largest first. Only those
/// are described: a description copies the uid and topics, too much to make for every
/// connection while the hub's shards are locked.
fn largest(admin: &Admin, now_ms: u64, limit: u64, floor: u64, measure: impl Fn(&Conn) -> u64) -> Vec<ConnInfo> {
    let mut found: Vec<(u64, Arc<Conn>)> = Vec::new();
    admin.hub.for_each(|c| {
        let m = measure(c);
        if m > floor {
            found.push((m, c.clone()));
        }
    });
    found.sort_by_key(|(m, _)| std::cmp::Reverse(*m));
    found.truncate(limit as usize);
    found.iter().map(|(_, c)| c.info(now_ms)).collect()
}

/// `/debug/query`: the queries and their parameters.
pub fn list() -> Value {
    json!(QUERIES
        .iter()
        .map(|q| json!({
            "query": q.name,
            "answers": q.answers,
            "parameters": q.params.iter().map(|(p, m)| json!({ "name": p, "meaning": m })).collect::<Vec<_>>(),
        }))
        .collect::<Vec<_>>())
}
