//! Presence in Redis: the members of each presence topic on every node, summed, so that
//! every node answers the same; and the member changes sent to every node's batches.
//!
//! Keys (`P` is `--redis-prefix`, `{h}` a hash of the topic, so that a topic's keys share
//! a Cluster slot whatever bytes its name holds):
//! - `P:pm:{h}`: a sorted set of the members' uids, every score 0, so that a page is a
//!   `ZRANGEBYLEX` from the cursor and the count a `ZCARD`;
//! - `P:pi:{h}`: a hash, uid -> the info its member shows;
//! - `P:pc:{h}`: a hash, uid -> its connections on every node;
//! - `P:pt:{h}`: the topic's connections on every node (gone at 0);
//! - `P:pn:{h}:<node>:<epoch>`: a hash, uid -> its connections on that run of that node.
//!   A node writes its count, not a difference, so writing it twice changes nothing, and
//!   what a dead run held is known and taken back;
//! - `P:pruns:<node>:<epoch>`: the topics a run has written members of, for the reaper.
//!
//! A change of a member (the first connection of a uid anywhere, or its last) is
//! published on the topic's fan-out channel as a `Target::Members` relay, which every node
//! hands to its presence batches, with its version: the Redis server's clock in
//! microseconds when the script ran, which orders changes that reach a node by different
//! paths (a topic's keys live on one server). An empty topic leaves no key behind.

use std::sync::Arc;

use compact_str::CompactString;
use redis::{Cmd, Value};
use serde_json::value::RawValue;

use super::relay::{Relay, Target, Told};
use crate::history::redis::RedisHistory;
use crate::history::Stream;
use crate::presence::{Listed, Page, Presence, Stats};
use crate::redis_link::{Invocation, Redis, Script};
use crate::telemetry::RedisCommand;
use crate::webhooks::Webhooks;

/// The script's version of a change: the server's clock, in microseconds.
const VERSION: &str = "local function version() local t = redis.call('TIME') return t[1] * 1000000 + t[2] end\n";

/// Sets one run's connections of a uid in a topic. KEYS: pm pi pc pt pn. ARGV: uid,
/// the run's connections now, the info (empty: none). Returns `{0}` when the uid's
/// membership did not change, else `{1 joined | 2 left, version, members}`.
const SET: &str = r#"
local uid, now = ARGV[1], tonumber(ARGV[2])
local delta = now - tonumber(redis.call('HGET', KEYS[5], uid) or '0')
if delta == 0 then return {0} end
if now > 0 then redis.call('HSET', KEYS[5], uid, now) else redis.call('HDEL', KEYS[5], uid) end
if redis.call('INCRBY', KEYS[4], delta) <= 0 then redis.call('DEL', KEYS[4]) end
local total = redis.call('HINCRBY', KEYS[3], uid, delta)
if total <= 0 then
  redis.call('HDEL', KEYS[3], uid)
  if redis.call('ZREM', KEYS[1], uid) == 1 then
    redis.call('HDEL', KEYS[2], uid)
    return {2, version(), redis.call('ZCARD', KEYS[1])}
  end
elseif total == delta then
  redis.call('ZADD', KEYS[1], 0, uid)
  if ARGV[3] ~= '' then redis.call('HSET', KEYS[2], uid, ARGV[3]) end
  return {1, version(), redis.call('ZCARD', KEYS[1])}
end
return {0}
"#;

/// Takes back everything a dead run held in a topic. KEYS: pm pi pc pt pn (of the dead
/// run). Returns `{version, members, uid...}` with the uids that left (none: `{0, 0}`).
const REAP: &str = r#"
local held = redis.call('HGETALL', KEYS[5])
local left = {}
for i = 1, #held, 2 do
  local uid, n = held[i], tonumber(held[i + 1])
  if redis.call('INCRBY', KEYS[4], -n) <= 0 then redis.call('DEL', KEYS[4]) end
  if redis.call('HINCRBY', KEYS[3], uid, -n) <= 0 then
    redis.call('HDEL', KEYS[3], uid)
    if redis.call('ZREM', KEYS[1], uid) == 1 then
      redis.call('HDEL', KEYS[2], uid)
      left[#left + 1] = uid
    end
  end
end
redis.call('DEL', KEYS[5])
if #left == 0 then return {0, 0} end
return {version(), redis.call('ZCARD', KEYS[1]), unpack(left)}
"#;

/// A topic's Cluster hash tag: a hash of its name, so that any bytes it holds give its
/// keys one slot.
pub fn topic_tag(topic: &str) -> String {
    use sha1::Digest;
    let digest = sha1::Sha1::digest(topic.as_bytes());
    crate::wire::hex(&digest[..8])
}

/// The set script with its version function: made once, kept for the process.
fn set_script() -> &'static str {
    static SCRIPT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SCRIPT.get_or_init(|| format!("{VERSION}{SET}"))
}

/// Where a topic's presence is in Redis.
pub struct Members {
    redis: Redis,
    prefix: String,
    node: u16,
    epoch: u64,
    set: Script,
    /// Told of the member changes this node's writes made, and of a dead run's members.
    webhooks: Option<Arc<Webhooks>>,
}

impl Members {
    pub fn new(redis: Redis, prefix: &str, node: u16, epoch: u64, webhooks: Option<Arc<Webhooks>>) -> Members {
        Members { redis, prefix: prefix.to_owned(), node, epoch, set: Script::new(set_script()), webhooks }
    }

    /// The topic's keys: pm pi pc pt, and pn of the run `node:epoch`.
    fn keys(&self, topic: &str, node: u16, epoch: u64) -> Vec<Vec<u8>> {
        let tag = topic_tag(topic);
        let p = &self.prefix;
        ["pm", "pi", "pc", "pt"]
            .iter()
            .map(|k| format!("{p}:{k}:{{{tag}}}").into_bytes())
            .chain([format!("{p}:pn:{{{tag}}}:{node}:{epoch}").into_bytes()])
            .collect()
    }

    fn runs_topics(&self, node: u16, epoch: u64) -> String {
        format!("{}:pruns:{node}:{epoch}", self.prefix)
    }

    /// Writes this node's connections of each (topic, uid) as `presence` holds them now,
    /// and tells every node what changed. `new_topics` are recorded for the reaper first.
    pub async fn write(&self, presence: &Presence, members: &[(Arc<str>, CompactString)], new_topics: &[Arc<str>]) -> redis::RedisResult<()> {
        if !new_topics.is_empty() {
            let mut add = redis::cmd("SADD");
            add.arg(self.runs_topics(self.node, self.epoch));
            new_topics.iter().for_each(|t| {
                add.arg(t.as_bytes());
            });
            self.redis.query::<Value>(RedisCommand::Presence, &add).await?;
        }
        let mut infos = Vec::with_capacity(members.len());
        let invocations: Vec<Invocation> = members
            .iter()
            .map(|(topic, uid)| {
                let (connections, info) = presence.local(topic, uid);
                let mut call = Invocation::default();
                for key in self.keys(topic, self.node, self.epoch) {
                    call.key(&[&key]);
                }
                call.arg(&[uid.as_bytes()]).number(connections).arg(&[info.as_ref().map_or(&b""[..], |i| i.get().as_bytes())]);
                infos.push(info);
                call
            })
            .collect();
        let answers = self.redis.scripts(RedisCommand::Presence, &self.set, &invocations).await?;
        let mut told = Vec::new();
        for (((topic, uid), info), answer) in members.iter().zip(&infos).zip(answers) {
            let Ok((change, version, count)) = redis::from_redis_value::<(u8, u64, usize)>(answer) else { continue };
            if let Some(webhooks) = &self.webhooks {
                webhooks.member(topic, uid, change == 1, info.as_deref());
            }
            let told_now = Told { joined: change == 1, version, members: count, uids: vec![uid.as_str().into()], info: info.as_deref() };
            told.push(self.tell(topic, &told_now));
        }
        self.redis.batch(RedisCommand::Publish, told).await.map(drop)
    }

    /// The relay that tells every node of a member change.
    fn tell(&self, topic: &str, told: &Told) -> Cmd {
        let envelope = serde_json::to_string(told).unwrap_or_default();
        let group = Stream::Topic(topic.into()).group();
        let relay = Relay { origin: self.node, id: 0, published_ms: crate::clock::wall_ms(), group: group as u8, sequence: 0, except: None, target: Target::Members(topic), envelope: &envelope };
        self.redis.publish_cmd(&RedisHistory::fanout_channel(&self.prefix, group), &relay.encode())
    }

    /// Takes back the members of a dead run, topic by topic, telling every node who left.
    /// Returns how many left.
    pub async fn reap(&self, node: u16, epoch: u64) -> redis::RedisResult<usize> {
        let index = self.runs_topics(node, epoch);
        let topics: Vec<String> = self.redis.query(RedisCommand::Presence, redis::cmd("SMEMBERS").arg(&index)).await?;
        let mut left = 0;
        for topic in topics {
            let mut reap = redis::cmd("EVAL");
            reap.arg(format!("{VERSION}{REAP}")).arg(5).arg(self.keys(&topic, node, epoch));
            let answer: Vec<Value> = self.redis.query(RedisCommand::Presence, &reap).await?;
            let (Some(version), Some(members)) = (answer.first(), answer.get(1)) else { continue };
            let (Ok(version), Ok(members)) = (redis::from_redis_value::<u64>(version.clone()), redis::from_redis_value::<usize>(members.clone())) else { continue };
            let uids: Vec<String> = answer[2..].iter().filter_map(|v| redis::from_redis_value(v.clone()).ok()).collect();
            if uids.is_empty() {
                continue;
            }
            left += uids.len();
            if let Some(webhooks) = &self.webhooks {
                uids.iter().for_each(|uid| webhooks.member(&topic, uid, false, None));
            }
            let told = Told { joined: false, version, members, uids: uids.iter().map(|u| u.as_str().into()).collect(), info: None };
            self.redis.batch(RedisCommand::Publish, vec![self.tell(&topic, &told)]).await?;
        }
        self.redis.query::<Value>(RedisCommand::Presence, redis::cmd("DEL").arg(&index)).await?;
        Ok(left)
    }

    /// This run is leaving, its members written out: no reaper needs its topics.
    pub async fn left(&self) -> redis::RedisResult<()> {
        self.redis.query::<Value>(RedisCommand::Presence, redis::cmd("DEL").arg(self.runs_topics(self.node, self.epoch))).await.map(drop)
    }

    pub async fn stats(&self, topic: &str) -> redis::RedisResult<Stats> {
        let keys = self.keys(topic, self.node, self.epoch);
        let cmds = [redis::cmd("ZCARD").arg(&keys[0]).clone(), redis::cmd("GET").arg(&keys[3]).clone()];
        let answers = self.redis.batch(RedisCommand::Presence, Vec::from(cmds)).await?;
        let members: usize = redis::from_redis_value(answers[0].clone())?;
        let connections: Option<i64> = redis::from_redis_value(answers[1].clone())?;
        Ok(Stats { topic: topic.to_owned(), members, connections: connections.unwrap_or(0).max(0) as usize })
    }

    /// Up to `limit` members after `cursor`, in uid order, with their info and the counts.
    pub async fn page(&self, topic: &str, cursor: Option<&str>, limit: usize) -> redis::RedisResult<Page> {
        let keys = self.keys(topic, self.node, self.epoch);
        let from = cursor.map_or_else(|| b"-".to_vec(), |c| [b"(".as_slice(), c.as_bytes()].concat());
        let mut range = redis::cmd("ZRANGEBYLEX");
        range.arg(&keys[0]).arg(from).arg("+").arg("LIMIT").arg(0).arg(limit + 1);
        let mut uids: Vec<String> = self.redis.query(RedisCommand::Presence, &range).await?;
        let more = uids.len() > limit;
        uids.truncate(limit);
        let infos: Vec<Option<String>> = if uids.is_empty() {
            Vec::new()
        } else {
            self.redis.query(RedisCommand::Presence, redis::cmd("HMGET").arg(&keys[1]).arg(&uids)).await?
        };
        let stats = self.stats(topic).await?;
        let members = uids
            .iter()
            .zip(infos)
            .map(|(uid, info)| Listed { uid: uid.clone(), info: info.and_then(|i| RawValue::from_string(i).ok()) })
            .collect();
        let cursor = uids.last().filter(|_| more).cloned();
        Ok(Page { kind: None, topic: topic.to_owned(), members, count: stats.members, connections: stats.connections, cursor })
    }
}
