//! Which topics have subscribers on some node, kept in Redis so that `topic_occupied` and
//! `topic_vacated` are told to the application once, by the node whose write made the
//! change, however many nodes hold the topic. Written only when webhooks want them.
//!
//! Keys (`P` is `--redis-prefix`, `{h}` a hash of the topic, so a topic's key has one
//! Cluster slot whatever its name):
//! - `P:ot:{h}`: a set of the runs (`<node>:<epoch>`) with subscribers to the topic; gone
//!   when empty;
//! - `P:oruns:<node>:<epoch>`: the topics a run has written, for the reaper.

use std::sync::Arc;

use redis::Value;

use super::members::topic_tag;
use crate::redis_link::{Invocation, Redis, Script};
use crate::telemetry::RedisCommand;
use crate::webhooks::Webhooks;

/// Sets whether a run holds a topic. KEYS: ot. ARGV: run, 1 (holds) or 0. Returns 1 when
/// the topic became occupied, 2 when it became vacant, else 0.
const SET: &str = r#"
if ARGV[2] == '1' then
  if redis.call('SADD', KEYS[1], ARGV[1]) == 1 and redis.call('SCARD', KEYS[1]) == 1 then return 1 end
elseif redis.call('SREM', KEYS[1], ARGV[1]) == 1 and redis.call('SCARD', KEYS[1]) == 0 then
  return 2
end
return 0
"#;

pub struct Occupancy {
    redis: Redis,
    prefix: String,
    node: u16,
    epoch: u64,
    set: Script,
    webhooks: Arc<Webhooks>,
}

impl Occupancy {
    pub fn new(redis: Redis, prefix: &str, node: u16, epoch: u64, webhooks: Arc<Webhooks>) -> Occupancy {
        Occupancy { redis, prefix: prefix.to_owned(), node, epoch, set: Script::new(SET), webhooks }
    }

    fn key(&self, topic: &str) -> Vec<u8> {
        format!("{}:ot:{{{}}}", self.prefix, topic_tag(topic)).into_bytes()
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
        let invocations: Vec<Invocation> =
            topics.iter().map(|(topic, held)| (vec![self.key(topic)], vec![run.clone().into_bytes(), vec![if *held { b'1' } else { b'0' }]])).collect();
        let answers = self.redis.scripts(RedisCommand::Occupancy, &self.set, &invocations).await?;
        for ((topic, _), answer) in topics.iter().zip(answers) {
            match redis::from_redis_value::<u8>(answer) {
                Ok(1) => self.webhooks.topic(topic, true),
                Ok(2) => self.webhooks.topic(topic, false),
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
        let invocations: Vec<Invocation> = topics.iter().map(|t| (vec![self.key(t)], vec![run.clone().into_bytes(), b"0".to_vec()])).collect();
        let answers = self.redis.scripts(RedisCommand::Occupancy, &self.set, &invocations).await?;
        let mut vacated = 0;
        for (topic, answer) in topics.iter().zip(answers) {
            if matches!(redis::from_redis_value::<u8>(answer), Ok(2)) {
                self.webhooks.topic(topic, false);
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
