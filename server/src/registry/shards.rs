//! On a Redis Cluster, a mark of this node's in every shard, so that a shard that loses
//! keys with its link up is noticed.
//!
//! The liveness key lives in one shard. Another shard can lose keys while every link
//! stays up (a `FLUSHALL`, an eviction, a restore from an old snapshot), and with them the
//! sessions of its slots; no link broke, the liveness key is there, and pushes from any
//! node then found those clients offline, for good (attack 40, N2). So with each liveness
//! refresh the node also sets `P:shard:{TAG}:<id>` (its epoch, with the node's TTL) in
//! each range of slots `CLUSTER SLOTS` lists, `TAG` chosen to hash into that range, and
//! reads back what it replaced: a mark it had set that is gone says its shard lost keys.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use redis::{Cmd, Value};

use crate::redis_link::Redis;
use crate::telemetry::RedisCommand;

const SLOTS: u16 = 16384;

/// The marks this node has set, by the first slot of their range.
#[derive(Default)]
pub struct ShardMarks {
    set: HashSet<u16>,
    /// A hash tag for each slot asked for so far.
    tags: HashMap<u16, String>,
}

impl ShardMarks {
    /// Sets this node's mark (`key` of a hash tag) to its `epoch` in every range of slots;
    /// true when a mark it had set was gone (its shard lost keys), None when the Cluster
    /// could not be asked.
    pub async fn refresh(&mut self, redis: &Redis, key: impl Fn(&str) -> String, epoch: u64, ttl: Duration) -> Option<bool> {
        let ranges: Value = redis.query(RedisCommand::Set, redis::cmd("CLUSTER").arg("SLOTS")).await.ok()?;
        let firsts = first_slots(&ranges);
        if firsts.is_empty() {
            return None;
        }
        let cmds: Vec<Cmd> = firsts
            .iter()
            .map(|slot| {
                let tag = self.tags.entry(*slot).or_insert_with(|| tag_for(*slot));
                let mut cmd = redis::cmd("SET");
                cmd.arg(key(tag)).arg(epoch).arg("PX").arg(ttl.as_millis() as u64).arg("GET");
                cmd
            })
            .collect();
        let answers = redis.batch_results(RedisCommand::Set, cmds).await.ok()?;
        let mut lost = false;
        for (slot, answer) in firsts.into_iter().zip(answers) {
            match answer {
                // Set before; only the first time is a missing mark expected.
                Ok(Value::Nil) => lost |= !self.set.insert(slot),
                Ok(_) => {
                    self.set.insert(slot);
                }
                Err(e) => tracing::debug!(slot, error = %e, "a shard mark could not be set"),
            }
        }
        Some(lost)
    }
}

/// The first slot of each range in a `CLUSTER SLOTS` answer.
fn first_slots(ranges: &Value) -> Vec<u16> {
    let Value::Array(ranges) = ranges else { return Vec::new() };
    ranges
        .iter()
        .filter_map(|range| match range {
            Value::Array(fields) => match fields.first() {
                Some(Value::Int(first)) => u16::try_from(*first).ok().filter(|s| *s < SLOTS),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// A short hash tag whose key slot is `slot` (Redis Cluster's CRC16, XMODEM).
fn tag_for(slot: u16) -> String {
    // About 16,384 tries, each a few bytes of CRC: well under a millisecond, once per slot.
    (0u32..)
        .map(|n| n.to_string())
        .find(|tag| crc16::State::<crc16::XMODEM>::calculate(tag.as_bytes()) % SLOTS == slot)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tag_hashes_into_the_slot_it_was_made_for() {
        // The Redis Cluster specification's own example: "123456789" is slot 12739.
        assert_eq!(crc16::State::<crc16::XMODEM>::calculate(b"123456789") % SLOTS, 12739);
        for slot in [0, 1, 5460, 5461, 10922, 10923, 16383] {
            let tag = tag_for(slot);
            assert_eq!(crc16::State::<crc16::XMODEM>::calculate(tag.as_bytes()) % SLOTS, slot, "{tag}");
        }
    }

    #[test]
    fn the_first_slot_of_each_range_is_read_from_cluster_slots() {
        let node = |port| Value::Array(vec![Value::BulkString(b"127.0.0.1".to_vec()), Value::Int(port)]);
        let ranges = Value::Array(vec![
            Value::Array(vec![Value::Int(0), Value::Int(5460), node(7000)]),
            Value::Array(vec![Value::Int(5461), Value::Int(10922), node(7001)]),
            Value::Array(vec![Value::Int(99_999), Value::Int(99_999), node(7002)]),
            Value::Nil,
        ]);
        assert_eq!(first_slots(&ranges), [0, 5461]);
        assert!(first_slots(&Value::Nil).is_empty());
    }
}
