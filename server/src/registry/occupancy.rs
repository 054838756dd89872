//! Which topics have subscribers on some node, kept in Redis so that `topic_occupied` and
//! `topic_vacated` are told to the application once, by the node whose write made the
//! change, however many nodes hold the topic, and so that any node can say which Pusher
//! channels are occupied. Written for every topic when webhooks want occupancy, and for
//! Pusher channels when Pusher apps are configured.
//!
//! Keys (`P` is `--redis-prefix`, `{h}` a hash of the topic, so a topic's key has one
//! Cluster slot whatever its name):
//! - `P:ot:{h}`: a set of the runs (`<node>:<epoch>`) with subscribers to the topic; gone
//!   when empty. A Pusher channel's is `P:ot:{a}:<h>`, `{a}` a hash of its app, in the
//!   slot of
//! - `P:pch:{a}`: the app's occupied channels but users' (a sorted set, all scores 0, so it
//!   reads by name prefix), changed by the same script as the channel's set;
//! - `P:oruns:<node>:<epoch>`: the topics a run has written, for the reaper.

use std::sync::Arc;

use redis::Value;

use super::members::topic_tag;
use crate::pusher;
use crate::redis_link::{Invocation, Redis, Script};
use crate::telemetry::RedisCommand;
use crate::webhooks::Webhooks;

/// Sets whether a run holds a topic. KEYS: ot, and for a Pusher channel its app's pch.
/// ARGV: run, 1 (holds) or 0, and for a Pusher channel its name. Returns 1 when the topic
/// became occupied, 2 when it became vacant, else 0.
const SET: &str = r#"
if ARGV[2] == '1' then
  if redis.call('SADD', KEYS[1], ARGV[1]) == 1 and redis.call('SCARD', KEYS[1]) == 1 then
    if KEYS[2] then redis.call('ZADD', KEYS[2], 0, ARGV[3]) end
    return 1
  end
elseif redis.call('SREM', KEYS[1], ARGV[1]) == 1 and redis.call('SCARD', KEYS[1]) == 0 then
  if KEYS[2] then redis.call('ZREM', KEYS[2], ARGV[3]) end
  return 2
end
return 0
"#;

/// Where a topic's occupancy is: its set's key, and for a Pusher channel (not a user's)
/// its app's channel index and its name there.
fn keys(prefix: &str, topic: &str) -> (Vec<u8>, Option<(Vec<u8>, String)>) {
    match pusher::app_and_channel(topic) {
        // A user's channel is not listed among the app's channels.
        Some((app, channel)) if !channel.starts_with(pusher::SERVER_TO_USER) => {
            let app_tag = topic_tag(&format!("{}{app}", pusher::PREFIX));
            let set = format!("{prefix}:ot:{{{app_tag}}}:{}", topic_tag(topic)).into_bytes();
            (set, Some((format!("{prefix}:pch:{{{app_tag}}}").into_bytes(), channel.to_owned())))
        }
        _ => (format!("{prefix}:ot:{{{}}}", topic_tag(topic)).into_bytes(), None),
    }
}

/// The script's keys and arguments for `run` holding `topic` or not.
fn invocation(prefix: &str, topic: &str, run: &str, held: bool) -> Invocation {
    let (set, index) = keys(prefix, topic);
    let mut call = Invocation::default();
    call.key(&[&set]);
    if let Some((index, _)) = &index {
        call.key(&[index]);
    }
    call.arg(&[run.as_bytes()]).arg(&[if held { b"1" } else { b"0" }]);
    if let Some((_, channel)) = &index {
        call.arg(&[channel.as_bytes()]);
    }
    call
}

/// The occupied channels of Pusher app `app_id` whose names start with `prefix`, at most
/// `limit`, by name.
pub async fn channels(redis: &Redis, key_prefix: &str, app_id: &str, prefix: &str, limit: usize) -> redis::RedisResult<Vec<String>> {
    let app_tag = topic_tag(&format!("{}{app_id}", pusher::PREFIX));
    let index = format!("{key_prefix}:pch:{{{app_tag}}}");
    // Names are of the channel alphabet: `\x7f` sorts after every one of them.
    let (from, to) = if prefix.is_empty() { ("-".to_owned(), "+".to_owned()) } else { (format!("[{prefix}"), format!("[{prefix}\x7f")) };
    redis.query(RedisCommand::Occupancy, redis::cmd("ZRANGEBYLEX").arg(index).arg(from).arg(to).arg("LIMIT").arg(0).arg(limit)).await
}

/// Whether some node has subscribers to the Pusher channel `topic`.
pub async fn occupied(redis: &Redis, key_prefix: &str, topic: &str) -> redis::RedisResult<bool> {
    let (set, _) = keys(key_prefix, topic);
    let runs: usize = redis.query(RedisCommand::Occupancy, redis::cmd("SCARD").arg(set)).await?;
    Ok(runs > 0)
}

pub struct Occupancy {
    redis: Redis,
    prefix: String,
    node: u16,
    epoch: u64,
    set: Script,
    /// Told of occupied and vacated topics, when webhooks want them (then every topic is
    /// written; else only Pusher channels).
    webhooks: Option<Arc<Webhooks>>,
}

impl Occupancy {
    pub fn new(redis: Redis, prefix: &str, node: u16, epoch: u64, webhooks: Option<Arc<Webhooks>>) -> Occupancy {
        Occupancy { redis, prefix: prefix.to_owned(), node, epoch, set: Script::new(SET), webhooks }
    }

    /// Whether `topic`'s occupancy is written.
    pub fn tracks(&self, topic: &str) -> bool {
        self.webhooks.is_some() || topic.starts_with(pusher::PREFIX)
    }

    fn tell(&self, topic: &str, occupied: bool) {
        if let Some(webhooks) = &self.webhooks {
            webhooks.topic(topic, occupied);
        }
    }

    fn runs_topics(&self, node: u16, epoch: u64) -> String {
        format!("{}:oruns:{node}:{epoch}", self.prefix)
    }

    /// Writes whether this run holds each of `topics` now (`held`), and tells the
    /// application of the topics this made occupied or vacant.
    pub async fn write(&self, topics: &[(Arc<str>, bool)]) -> redis::RedisResult<()> {
        if topics.is_empty() {
            return Ok(());
        }
        let held: Vec<&[u8]> = topics.iter().filter(|(_, held)| *held).map(|(t, _)| t.as_bytes()).collect();
        if !held.is_empty() {
            let mut add = redis::cmd("SADD");
            add.arg(self.runs_topics(self.node, self.epoch)).arg(held);
            self.redis.query::<Value>(RedisCommand::Occupancy, &add).await?;
        }
        let run = format!("{}:{}", self.node, self.epoch);
        let invocations: Vec<Invocation> = topics.iter().map(|(topic, held)| invocation(&self.prefix, topic, &run, *held)).collect();
        let answers = self.redis.scripts(RedisCommand::Occupancy, &self.set, &invocations).await?;
        for ((topic, _), answer) in topics.iter().zip(answers) {
            match redis::from_redis_value::<u8>(answer) {
                Ok(1) => self.tell(topic, true),
                Ok(2) => self.tell(topic, false),
                _ => {}
            }
        }
        Ok(())
    }

    /// Takes a dead run out of the topics it held, telling the application of those left
    /// vacant. Returns how many.
    pub async fn reap(&self, node: u16, epoch: u64) -> redis::RedisResult<usize> {
        let index = self.runs_topics(node, epoch);
        let topics: Vec<String> = self.redis.query(RedisCommand::Occupancy, redis::cmd("SMEMBERS").arg(&index)).await?;
        if topics.is_empty() {
            return Ok(0);
        }
        let run = format!("{node}:{epoch}");
        let invocations: Vec<Invocation> = topics.iter().map(|t| invocation(&self.prefix, t, &run, false)).collect();
        let answers = self.redis.scripts(RedisCommand::Occupancy, &self.set, &invocations).await?;
        let mut vacated = 0;
        for (topic, answer) in topics.iter().zip(answers) {
            if matches!(redis::from_redis_value::<u8>(answer), Ok(2)) {
                self.tell(topic, false);
                vacated += 1;
            }
        }
        self.redis.query::<Value>(RedisCommand::Occupancy, redis::cmd("DEL").arg(&index)).await?;
        Ok(vacated)
    }

    /// This run is leaving, every topic written as vacant: no reaper needs its topics.
    pub async fn left(&self) -> redis::RedisResult<()> {
        self.redis.query::<Value>(RedisCommand::Occupancy, redis::cmd("DEL").arg(self.runs_topics(self.node, self.epoch))).await.map(drop)
    }
}
