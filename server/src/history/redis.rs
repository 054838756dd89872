//! History in Redis, for the Redis registries, so that a client resumes on whichever node
//! it reconnects to.
//!
//! Keys of a stream (`P` is `--redis-prefix`, `g` the stream's group, `name` its kind and
//! length-prefixed name, `u5:alice`, `t4:news`, `b`), all in one hash slot:
//! - `P:h:{gN}:name`: a Redis Stream of its last `--history-size` messages, entry id
//!   `<offset>-0`, fields `i` (message id) and `e` (the envelope);
//! - `P:h:{gN}:name:m`: a hash, `epoch` and `last` (offset);
//! - `P:h:{gN}:name:i`: a topic's interest key, set by nodes with subscribers to it;
//! - `P:h:{gN}:name:k:<key>`: an idempotency key's first message id, then its reply.
//!
//! Every one expires: the stream and its hash `--history-ttl` after the last message, the
//! interest key `--history-ttl` after its last subscriber left, the idempotency key
//! after `--idempotency-window`. `P:h:{gN}:born` holds when the group's history began
//! (a flushed Redis begins again), refreshed at each node start. Outside the streams,
//! `P:k:<key>` holds the fingerprint and message id of the request that used an
//! idempotency key first, for `--idempotency-window`.
//!
//! [`APPEND`] gives a message its offset, keeps it and publishes it, in one script on the
//! stream's shard, onto channels in the same slot: every node receives a stream's
//! messages in offset order. Reads for resuming clients are coalesced: resumes of one
//! stream that arrive together share one read.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pushline_alloc::Site;
use redis::Value;
use tokio::sync::{Notify, OnceCell};

use super::idempotency::Key;
use super::read::{select, Found, From, Loss};
use super::{new_epoch, Settings, Stream, GROUPS};
use crate::telemetry::{EpochReset, Metrics};
use crate::error::Error;
use crate::redis_link::{Invocation, Redis, Script};
use crate::telemetry::RedisCommand;
use crate::wire::cursor::EpochText;
use crate::wire::{envelope_position, Message};

/// Appends a message to its stream and publishes it. KEYS: the stream, its hash, its
/// interest key, its idempotency key (or the stream again), the group's `born` key, the
/// group's sequence, the group's generation, the Redis run the generation was set under.
/// ARGV: 1 an epoch for a new stream, 2 history size, 3 TTL ms, 4 `1` if the stream keeps
/// history only while listened to (a topic, but a Pusher cache channel), 5 idempotency window ms (`0`: no key),
/// 6 message id, 7 the stream's key as envelopes write it, 8 the envelope without its
/// closing brace, 9 the relay header (the script writes the sequence into it), 10 PUBLISH
/// or SPUBLISH, 11 now (ms), 12 the idempotency key's record (the request's fingerprint and the message id), 13 the
/// highest group sequence this node has seen, 14 a generation for the group should it
/// need a new one, 15 `1` to check the Redis run, 16 empty, or (a uid's stream on one
/// Redis) `<this node> <its epoch> <1 if it holds the uid> <group>`: the script finds the
/// uid's nodes itself, 17 `--redis-prefix` (locating only), 18.. channels (when not
/// locating). Locating reads the uid's sessions (KEYS[9]) and each of their nodes'
/// liveness keys (not declared: one Redis only), deletes dead nodes' entries, and
/// publishes to the live nodes' channels, then this node's if it holds the uid: a push
/// is one round trip, not a lookup and then the script.
///
/// Every kept append takes the group's next sequence number. One at or below what this
/// node has already seen means the group's data went back (a failover to a replica that
/// had not received the last writes, a restore): the group takes a new generation, and a
/// stream written under another generation than its group's starts a new epoch before
/// anything is appended, so no (epoch, offset) ever names two messages. Its live
/// subscribers are told first, on the same channels (relay id 0, a notice): a `gap` from
/// past the last offset the old epoch still holds.
///
/// A node's memory does not outlive it: when every node that saw the lost writes has
/// restarted too (a host rebooted with its Redis, one node restored from an old RDB), no
/// floor is high enough. So the first append of each group after this node started, and
/// after each time its link broke (a Redis restart or failover always breaks it), checks
/// the Redis run (`run_id`) the group's generation was set under: another run means the
/// data may have come back from a snapshot or a replica, and the group takes a new
/// generation (a restart or failover that lost nothing starts new epochs all the same).
/// Returns one string (an array's values each cost the node a parse and an allocation, a
/// few microseconds a push): `0 RECORD` for a repeated idempotency key (the first
/// request's fingerprint, then its message id, or its reply once known), else
/// `1 EPOCH OFFSET SEQUENCE RESET HEARD` (offset 0: not kept, and the epoch empty; reset
/// `1` when this append found the group's history behind this node, `2` when under
/// another Redis run; HEARD the subscribers per channel, comma-separated), and when it
/// located, ` NODES SESSIONS` (the other nodes that hold the uid's live sessions, in the
/// order of their channels, and how many each; both comma-separated).
pub const APPEND: &str = r#"
local function redis_run()
  return string.match(redis.call('INFO', 'server'), 'run_id:(%w+)')
end
if ARGV[5] ~= '0' then
  local first = redis.call('GET', KEYS[4])
  if first then return '0 ' .. first end
end
local size = tonumber(ARGV[2])
local keep = size > 0
if keep and ARGV[4] == '1' and redis.call('EXISTS', KEYS[3]) == 0 then
  redis.call('DEL', KEYS[1], KEYS[2])
  keep = false
end
local epoch, offset, seq, rolled, gap = '', 0, 0, 0, false
local envelope = ARGV[8]
if keep then
  seq = redis.call('INCR', KEYS[6])
  local floor = tonumber(ARGV[13])
  local gen = redis.call('GET', KEYS[7])
  if seq <= floor then
    seq = floor + 1
    redis.call('SET', KEYS[6], seq)
    gen = false
    rolled = 1
  end
  local stamped = false
  if ARGV[15] == '1' then
    local run = redis_run()
    local written_under = redis.call('GET', KEYS[8])
    if written_under ~= run then
      if rolled == 0 and gen and written_under then
        rolled = 2
      end
      redis.call('SET', KEYS[8], run)
      gen = false
    end
    stamped = true
  end
  if not gen then
    gen = ARGV[14]
    redis.call('SET', KEYS[7], gen)
    -- A generation is always stamped with its run: one set without it (after a FLUSHALL,
    -- by a node that had checked the run before) made the next node that checks take
    -- the group for a restored one, and start every stream again over what it held.
    if not stamped then
      redis.call('SET', KEYS[8], redis_run())
    end
  end
  local meta = redis.call('HMGET', KEYS[2], 'epoch', 'gen', 'last')
  epoch = meta[1]
  if not epoch or (meta[2] and meta[2] ~= gen) then
    if epoch then
      gap = '{"type":"gap","stream":"' .. ARGV[7] .. '","epoch":"' .. epoch .. '","from":' .. (tonumber(meta[3] or '0') + 1) .. ',"reason":"epoch_changed"}'
    elseif rolled > 0 then
      gap = '{"type":"gap","stream":"' .. ARGV[7] .. '","reason":"epoch_changed"}'
    end
    epoch = ARGV[1]
    redis.call('DEL', KEYS[1], KEYS[2])
    redis.call('HSET', KEYS[2], 'epoch', epoch)
    redis.call('SET', KEYS[5], ARGV[11], 'NX')
  end
  if meta[2] ~= gen then
    redis.call('HSET', KEYS[2], 'gen', gen)
  end
  offset = redis.call('HINCRBY', KEYS[2], 'last', 1)
  envelope = envelope .. ',"stream":"' .. ARGV[7] .. '","epoch":"' .. epoch .. '","offset":' .. offset .. '}'
  redis.call('XADD', KEYS[1], 'MAXLEN', size, offset .. '-0', 'i', ARGV[6], 'e', envelope)
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
else
  envelope = envelope .. '}'
end
local channels, reached, counts = {}, {}, {}
if ARGV[16] == '' then
  for i = 18, #ARGV do channels[#channels + 1] = ARGV[i] end
else
  local me, mine, here, group = string.match(ARGV[16], '^(%d+) (%d+) (%d) (%d+)$')
  me, mine = tonumber(me), tonumber(mine)
  local held = redis.call('HGETALL', KEYS[9])
  local live, seen = {}, {}
  for i = 1, #held, 2 do
    -- A session id's top 16 bits are its node: long division, exact in doubles.
    local node, rest = 0, 0
    for d = 1, #held[i] do
      rest = rest * 10 + string.byte(held[i], d) - 48
      local digit = math.floor(rest / 281474976710656)
      node = node * 10 + digit
      rest = rest - digit * 281474976710656
    end
    local written = tonumber(held[i + 1])
    if node == me then
      -- Sessions here are the hub's; an older epoch is a previous run of this node.
      if written < mine then redis.call('HDEL', KEYS[9], held[i]) end
    else
      if live[node] == nil then
        live[node] = tonumber(redis.call('GET', ARGV[17] .. ':node:' .. node) or '0')
      end
      if live[node] == written then
        if not seen[node] then
          seen[node] = #reached + 1
          reached[#reached + 1] = node
          counts[#counts + 1] = 0
          channels[#channels + 1] = ARGV[17] .. ':to:' .. node .. ':{g' .. group .. '}'
        end
        counts[seen[node]] = counts[seen[node]] + 1
      elseif live[node] == 0 or live[node] > written then
        -- The node is gone, or a newer run holds its id (one newer than the key is
        -- neither delivered to nor deleted).
        redis.call('HDEL', KEYS[9], held[i])
      end
    end
  end
  if here == '1' then channels[#channels + 1] = ARGV[17] .. ':to:' .. me .. ':{g' .. group .. '}' end
end
local heard = {}
local header = string.sub(ARGV[9], 1, 20) .. string.format('%020d', seq) .. string.sub(ARGV[9], 41)
for i, channel in ipairs(channels) do
  if gap then
    redis.call(ARGV[10], channel, string.sub(header, 1, 3) .. string.rep('\0', 8) .. string.sub(header, 12) .. gap)
  end
  heard[i] = redis.call(ARGV[10], channel, header .. envelope)
end
if ARGV[5] ~= '0' then
  redis.call('SET', KEYS[4], ARGV[12], 'PX', ARGV[5])
end
local function ints(list)
  local out = {}
  for i, n in ipairs(list) do out[i] = string.format('%d', n) end
  return table.concat(out, ',')
end
local reply = string.format('1 %s %d %d %d %s', epoch, offset, seq, rolled, ints(heard))
if ARGV[16] == '' then
  return reply
end
return reply .. ' ' .. ints(reached) .. ' ' .. ints(counts)
"#;

/// The append script's argument (0-based) asking it to check the Redis run.
const CHECK_RUN_ARG: usize = 14;

/// Where the append script publishes a message.
pub enum Route<'a> {
    /// On these channels.
    Channels(&'a [String]),
    /// On the channels of the nodes that hold the uid's live sessions, found by the
    /// script (one Redis only): this node's id and epoch, and whether it holds the uid.
    Locate { uid_key: &'a [&'a [u8]], node: u16, epoch: u64, here: bool },
}

/// What the append script did.
#[derive(Debug, PartialEq, Eq)]
pub enum Appended {
    /// The idempotency key was used before: the first message's id, or the reply to it.
    Repeated(String),
    /// Published to `heard` subscribers on each channel; kept at `offset` (0: not kept),
    /// the group's `sequence`; `reset` when the group took a new generation, and why;
    /// `located` when the script found the uid's nodes: each other node with the uid's
    /// live sessions there, in the order of their channels.
    Published { epoch: u32, offset: u64, heard: Vec<usize>, sequence: u64, reset: Option<EpochReset>, located: Option<Vec<(u16, usize)>> },
}

impl Appended {
    /// Reads the append script's reply (see [`APPEND`]).
    pub fn parse(value: Value) -> Option<Appended> {
        let Value::BulkString(reply) = value else { return None };
        let reply = std::str::from_utf8(&reply).ok()?;
        if let Some(record) = reply.strip_prefix("0 ") {
            return Some(Appended::Repeated(record.to_owned()));
        }
        let numbers = |list: &str| -> Option<Vec<u64>> {
            match list {
                "" => Some(Vec::new()),
                list => list.split(',').map(|n| n.parse().ok()).collect(),
            }
        };
        let mut fields = reply.strip_prefix("1 ")?.split(' ');
        let (epoch, offset, sequence, reset, heard) = (fields.next()?, fields.next()?, fields.next()?, fields.next()?, fields.next()?);
        let located = match (fields.next(), fields.next(), fields.next()) {
            (None, None, None) => None,
            (Some(nodes), Some(sessions), None) => {
                let nodes = numbers(nodes)?.into_iter().map(|n| u16::try_from(n).ok());
                Some(nodes.zip(numbers(sessions)?).map(|(node, n)| Some((node?, n as usize))).collect::<Option<Vec<_>>>()?)
            }
            _ => return None,
        };
        let offset = offset.parse().ok()?;
        let epoch = if offset == 0 { 0 } else { super::parse_epoch(epoch)? };
        let reset = match reset {
            "0" => None,
            "1" => Some(EpochReset::Rollback),
            "2" => Some(EpochReset::RedisRun),
            _ => return None,
        };
        let heard = numbers(heard)?.into_iter().map(|n| n as usize).collect();
        Some(Appended::Published { epoch, offset, heard, sequence: sequence.parse().ok()?, reset, located })
    }
}

/// A stream as read for resuming clients.
struct StreamRead {
    /// Epoch and last offset; None when the stream is unknown.
    meta: Option<(u32, u64)>,
    entries: Vec<Arc<Message>>,
    /// When the group's history began (wall ms); None when Redis has lost that too.
    born_ms: Option<u64>,
    /// Written under an earlier generation of its group (see [`APPEND`]).
    stale: bool,
}

/// `stream`'s key (`PREFIX:h:{gN}:u5:alice`, `...:t4:news`, `...:b`), and the length of
/// its group's key prefix (`PREFIX:h:{gN}:`), which it starts with. Written without
/// the formatting machinery: a push on Redis names its stream every time.
fn stream_and_group_key(prefix: &str, stream: &Stream) -> (String, usize) {
    let mut digits = itoa::Buffer::new();
    let name = match stream {
        Stream::Uid(uid) => Some(('u', uid)),
        Stream::Topic(topic) => Some(('t', topic)),
        Stream::Broadcast => None,
    };
    let mut key = String::with_capacity(prefix.len() + 32 + name.map_or(0, |(_, n)| n.len()));
    key.push_str(prefix);
    key.push_str(":h:{g");
    key.push_str(digits.format(stream.group()));
    key.push_str("}:");
    let group = key.len();
    match name {
        Some((kind, name)) => {
            key.push(kind);
            key.push_str(digits.format(name.len()));
            key.push(':');
            key.push_str(name);
        }
        None => key.push('b'),
    }
    (key, group)
}

/// One read of a stream that resumes arriving together share.
#[derive(Default)]
struct Flight {
    result: OnceCell<Result<Arc<StreamRead>, String>>,
    done: Notify,
}

pub struct RedisHistory {
    redis: Redis,
    prefix: String,
    settings: Settings,
    script: Script,
    /// Reads not yet started, by stream key: a resume joins one, or starts one.
    flights: Mutex<HashMap<String, Arc<Flight>>>,
    /// Per group, the highest sequence an append of this node was given.
    seen: [AtomicU64; GROUPS as usize],
    /// Per group, the link's break count (plus one) when its Redis run was last checked.
    run_checked: [AtomicU64; GROUPS as usize],
    metrics: Arc<Metrics>,
}

/// `born` keys live this long unless a node starts and sets them again.
const BORN_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

impl RedisHistory {
    pub fn new(redis: Redis, prefix: &str, settings: Settings, metrics: Arc<Metrics>) -> RedisHistory {
        RedisHistory {
            redis,
            prefix: prefix.to_owned(),
            settings,
            script: Script::new(APPEND).told_of_restarts_at(CHECK_RUN_ARG),
            flights: Mutex::new(HashMap::new()),
            seen: std::array::from_fn(|_| AtomicU64::new(0)),
            run_checked: std::array::from_fn(|_| AtomicU64::new(0)),
            metrics,
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn redis(&self) -> &Redis {
        &self.redis
    }

    pub fn script(&self) -> &Script {
        &self.script
    }

    /// The key of a stream's entries; its other keys add a suffix.
    pub fn stream_key(&self, stream: &Stream) -> String {
        stream_and_group_key(&self.prefix, stream).0
    }

    pub fn interest_key(&self, topic: &str) -> String {
        format!("{}:i", self.stream_key(&Stream::Topic(topic.into())))
    }

    fn born_key(&self, group: u64) -> String {
        self.group_key(group, "born")
    }

    /// A key of the group's own: `born`, `seq` (its appends' sequence), `gen` (its
    /// generation), `run` (the Redis run_id it was set under).
    fn group_key(&self, group: u64, name: &str) -> String {
        format!("{}:h:{{g{group}}}:{name}", self.prefix)
    }

    /// What the append script answered for a stream of `group`: the highest sequence this
    /// node has seen grows, and a new generation is counted and logged.
    pub fn appended(&self, group: u64, sequence: u64, reset: Option<EpochReset>) {
        let before = self.seen[group as usize].fetch_max(sequence, Ordering::Relaxed);
        let Some(reset) = reset else { return };
        self.metrics.epoch_reset(reset);
        match reset {
            EpochReset::Rollback => tracing::warn!(
                group,
                seen = before,
                "Redis history is behind what this node saw (a failover to a replica that had not received the last writes, or a restore): this group's streams start new epochs, and resuming clients are told they were not recovered"
            ),
            EpochReset::RedisRun => tracing::warn!(
                group,
                "this group's history was written under another Redis run (Redis restarted or failed over, perhaps from a snapshot that lacks the last writes): its streams start new epochs, and resuming clients are told they were not recovered"
            ),
        }
    }

    /// Another node appended to `group` at `sequence` (it arrived on a channel): this node's
    /// floor covers it, so a rollback is found whichever node publishes first after it.
    pub fn observed(&self, group: u64, sequence: u64) {
        if let Some(seen) = self.seen.get(group as usize) {
            seen.fetch_max(sequence, Ordering::Relaxed);
        }
    }

    /// Whether the next append to `group` is to check the Redis run: the first since this
    /// node started and since its link last broke.
    fn check_run(&self, group: u64) -> bool {
        let now = self.redis.breaks() + 1;
        self.run_checked[group as usize].swap(now, Ordering::Relaxed) != now
    }

    /// Channels in the same slot as a group's streams: the fan-out channel every node
    /// reads, and each node's own.
    pub fn fanout_channel(prefix: &str, group: u64) -> String {
        format!("{prefix}:fanout:{{g{group}}}")
    }

    pub fn node_channel(prefix: &str, node: u16, group: u64) -> String {
        format!("{prefix}:to:{node}:{{g{group}}}")
    }

    /// Marks when each group's history began, unless it already has.
    pub async fn mark_born(&self) -> Result<(), Error> {
        let now = crate::clock::wall_ms();
        let cmds: Vec<redis::Cmd> = (0..GROUPS)
            .map(|g| redis::cmd("SET").arg(self.born_key(g)).arg(now).arg("NX").arg("PX").arg(BORN_TTL.as_millis() as u64).clone())
            .collect();
        self.redis.batch(RedisCommand::Set, cmds).await.map(drop).map_err(|e| Error::unavailable(format!("marking history in Redis: {e}")))
    }

    /// The keys and arguments of one append: `envelope` without its closing brace,
    /// `relay` the header each channel's message starts with; a Pusher client's event is
    /// published and not kept (see [`crate::wire::Draft::is_client_event`]).
    pub fn append_call(
        &self,
        stream: &Stream,
        draft: &crate::wire::Draft<'_>,
        envelope: &str,
        relay: &[u8],
        idempotency: Option<&Key>,
        route: Route<'_>,
    ) -> Invocation {
        let (key, group_key) = stream_and_group_key(&self.prefix, stream);
        let (key, group_key) = (key.as_bytes(), &key.as_bytes()[..group_key]);
        let group = stream.group();
        let (id, keep) = (draft.id, !draft.is_client_event());
        let kept = if keep && self.settings.keeps(stream) { self.settings.size } else { 0 };
        let window = idempotency.map_or(0, |_| self.settings.idempotency_window.as_millis() as u64);
        let channels = match &route {
            Route::Channels(channels) => channels.iter().map(|c| c.len()).sum(),
            Route::Locate { uid_key, .. } => uid_key.iter().map(|p| p.len()).sum::<usize>() + self.prefix.len() + 32,
        };
        // A key's name and its record (the fingerprint, `|` and a message id).
        let idempotency_bytes = idempotency.map_or(0, |k| k.scoped.len() + k.fingerprint.len() + 48);
        let mut call = Invocation::with_capacity(27, 8 * key.len() + 4 * group_key.len() + envelope.len() + relay.len() + idempotency_bytes + channels + 160);
        call.key(&[key]).key(&[key, b":m"]).key(&[key, b":i"]);
        match idempotency {
            Some(k) => call.key(&[key, b":k:", k.scoped.as_bytes()]),
            None => call.key(&[key]),
        };
        call.key(&[group_key, b"born"]).key(&[group_key, b"seq"]).key(&[group_key, b"gen"]).key(&[group_key, b"run"]);
        if let Route::Locate { uid_key, .. } = &route {
            call.key(uid_key);
        }
        // A Pusher cache channel keeps its last event for whoever subscribes next.
        let while_listened = matches!(stream, Stream::Topic(topic) if !crate::pusher::is_cache_topic(topic));
        let check_run = kept > 0 && self.check_run(group);
        call.arg(&[&EpochText(new_epoch()).digits()])
            .number(kept)
            .number(self.settings.ttl.as_millis() as u64)
            .arg(&[if while_listened { b"1" } else { b"0" }])
            .number(window)
            .number(id)
            .arg_with(|bytes| stream.key().write_to(bytes))
            .arg(&[envelope.as_bytes()])
            .arg(&[relay])
            .arg(&[if self.redis.sharded() { b"SPUBLISH" } else { b"PUBLISH" }])
            .number(crate::clock::wall_ms())
            .arg_with(|bytes| {
                if let Some(k) = idempotency {
                    k.write_record(id, bytes);
                }
            })
            .number(self.seen[group as usize].load(Ordering::Relaxed))
            .arg(&[&EpochText(new_epoch()).digits()])
            .arg(&[if check_run { b"1" } else { b"0" }]);
        match route {
            Route::Channels(channels) => {
                call.arg(&[]).arg(&[]);
                for channel in channels {
                    call.arg(&[channel.as_bytes()]);
                }
            }
            Route::Locate { node, epoch, here, .. } => {
                call.arg_with(|bytes| drop(write!(bytes, "{node} {epoch} {} {group}", here as u8))).arg(&[self.prefix.as_bytes()]);
            }
        }
        call
    }

    /// Where an idempotency key (`scoped`: its holder's) is claimed for the request that
    /// used it first, for the key's window.
    pub fn request_key(&self, scoped: &str) -> String {
        format!("{}:k:{scoped}", self.prefix)
    }

    /// The idempotency keys of streams that kept a repeated key's reply.
    pub fn idempotency_key(&self, stream: &Stream, key: &str) -> String {
        format!("{}:k:{key}", self.stream_key(stream))
    }

    /// Replaces the first message id under each idempotency key with the reply, for
    /// retries to be given; in the background, best effort (a retry without it is told
    /// the first message's id).
    pub fn remember(&self, keys: Vec<String>, reply: String) {
        if keys.is_empty() {
            return;
        }
        let redis = self.redis.clone();
        let cmds: Vec<redis::Cmd> = keys.iter().map(|k| redis::cmd("SET").arg(k).arg(&reply).arg("XX").arg("KEEPTTL").clone()).collect();
        tokio::spawn(async move {
            if let Err(e) = redis.batch(RedisCommand::Set, cmds).await {
                tracing::debug!(error = %e, "could not store a reply for its idempotency key");
            }
        });
    }

    /// What each stream of `plan` holds past where its client is.
    pub async fn read(&self, plan: &[(Stream, From)]) -> Result<Vec<Found>, Error> {
        let reads = futures_util::future::join_all(plan.iter().map(|(stream, _)| self.read_stream(stream))).await;
        let now = crate::clock::wall_ms();
        plan.iter()
            .zip(reads)
            .map(|((stream, from), read)| {
                let read = read.map_err(|e| Error::unavailable(format!("reading history from Redis: {e}; retry")))?;
                Ok(match read.meta {
                    Some(_) if read.stale => match from {
                        From::After(_) => Found { messages: Vec::new(), tail: None, loss: Some(Loss::EpochChanged) },
                        _ => Found::unknown(*from, now, self.settings.ttl),
                    },
                    None => Found::unknown(*from, read.born_ms.unwrap_or(now), self.settings.ttl),
                    Some((epoch, last)) => {
                        let tail = super::Position { key: stream.key(), epoch, offset: last };
                        select(*from, tail, &read.entries, self.settings.ttl)
                    }
                })
            })
            .collect()
    }

    async fn read_stream(&self, stream: &Stream) -> Result<Arc<StreamRead>, String> {
        let key = self.stream_key(stream);
        let (flight, leader) = {
            let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
            match flights.get(&key) {
                Some(flight) => (flight.clone(), false),
                None => {
                    let flight = Arc::new(Flight::default());
                    flights.insert(key.clone(), flight.clone());
                    (flight, true)
                }
            }
        };
        if !leader {
            loop {
                let done = flight.done.notified();
                if let Some(result) = flight.result.get() {
                    return result.clone();
                }
                done.await;
            }
        }
        // Resumes of this stream arriving meanwhile join this read. Each was registered
        // before it joined, so a read that starts after they join misses none of them.
        tokio::task::yield_now().await;
        self.flights.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
        let result = self.fetch(stream, &key).await.map(Arc::new).map_err(|e| e.to_string());
        let _ = flight.result.set(result.clone());
        flight.done.notify_waiters();
        result
    }

    async fn fetch(&self, stream: &Stream, key: &str) -> redis::RedisResult<StreamRead> {
        let born = self.born_key(stream.group());
        let cmds = [
            redis::cmd("HMGET").arg(format!("{key}:m")).arg("epoch").arg("last").arg("gen").clone(),
            redis::cmd("XRANGE").arg(key).arg("-").arg("+").clone(),
            redis::cmd("GET").arg(&born).clone(),
            redis::cmd("GET").arg(self.group_key(stream.group(), "gen")).clone(),
        ];
        let values = self.redis.batch(RedisCommand::History, Vec::from(cmds)).await?;
        let [meta, entries, born_ms, group_gen]: [Value; 4] =
            values.try_into().map_err(|_| redis::RedisError::from((redis::ErrorKind::Parse, "history read: not four replies")))?;
        let (epoch, last, gen): (Option<String>, Option<u64>, Option<String>) = redis::from_redis_value(meta)?;
        let group_gen: Option<String> = redis::from_redis_value(group_gen)?;
        // Written under an earlier generation of its group: what it holds may continue past
        // messages lost with a failover; its next append starts a new epoch.
        let stale = gen.is_some() && gen != group_gen;
        let meta = epoch.as_deref().and_then(super::parse_epoch).zip(last);
        let born_ms: Option<u64> = redis::from_redis_value(born_ms)?;
        if born_ms.is_none() {
            // Redis lost its history (flushed): from now on it can vouch again.
            let _ = self.mark_born().await;
        }
        let entries: Vec<(String, Vec<(String, String)>)> = redis::from_redis_value(entries)?;
        let accepted_at = Instant::now();
        let entries = Site::History.scope(|| {
            entries
                .into_iter()
                .filter_map(|(_, fields)| {
                    let field = |name: &str| fields.iter().find(|(f, _)| f == name).map(|(_, v)| v.as_str());
                    let (id, envelope) = (field("i")?.parse().ok()?, field("e")?);
                    Some(Arc::new(Message::from_envelope(id, envelope, envelope_position(envelope), accepted_at)))
                })
                .collect()
        });
        Ok(StreamRead { meta, entries, born_ms, stale })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_keys_are_written_as_before_their_numbers_left_the_formatting_machinery() {
        for stream in [Stream::Uid("alice".into()), Stream::Topic("news.eu".into()), Stream::Broadcast, Stream::Uid("é:{x}".into())] {
            let name = match &stream {
                Stream::Uid(uid) => format!("u{}:{uid}", uid.len()),
                Stream::Topic(topic) => format!("t{}:{topic}", topic.len()),
                Stream::Broadcast => "b".into(),
            };
            let (key, group) = stream_and_group_key("pl", &stream);
            assert_eq!(key, format!("pl:h:{{g{}}}:{name}", stream.group()));
            assert_eq!(&key[..group], format!("pl:h:{{g{}}}:", stream.group()));
        }
    }

    #[test]
    fn append_replies_parse() {
        let reply = |text: &str| Value::BulkString(text.as_bytes().to_vec());
        assert_eq!(Appended::parse(reply("1 0000002a 7 9 0 2,1")), Some(Appended::Published { epoch: 42, offset: 7, heard: vec![2, 1], sequence: 9, reset: None, located: None }));
        let unkept = reply("1  0 0 0 2");
        assert_eq!(Appended::parse(unkept), Some(Appended::Published { epoch: 0, offset: 0, heard: vec![2], sequence: 0, reset: None, located: None }));
        let found = Some(vec![(4, 3), (9, 1)]);
        assert_eq!(Appended::parse(reply("1 0000002a 7 9 2 0,1,0 4,9 3,1")), Some(Appended::Published { epoch: 42, offset: 7, heard: vec![0, 1, 0], sequence: 9, reset: Some(EpochReset::RedisRun), located: found }));
        let nowhere = reply("1 0000002a 7 9 0 1  ");
        assert_eq!(Appended::parse(nowhere), Some(Appended::Published { epoch: 42, offset: 7, heard: vec![1], sequence: 9, reset: None, located: Some(Vec::new()) }));
        assert_eq!(Appended::parse(reply("1  0 0 0 2 70000 1")), None, "a node id out of range");
        assert_eq!(Appended::parse(reply("1 0000002a 7 9 3 2")), None, "an unknown reset");
        assert_eq!(Appended::parse(reply("0 fingerprint|123")), Some(Appended::Repeated("fingerprint|123".into())));
        assert_eq!(Appended::parse(Value::Nil), None);
    }
}
