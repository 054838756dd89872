//! One Redis, a Redis Cluster, or the master a set of Sentinels names (followed across
//! failovers) behind one handle: every command timed, counted and probed, and the pub/sub
//! messages this node subscribes to handed out on a channel. `rediss://` links take the
//! CA and client certificate from `--redis-ca`, `--redis-client-cert`, `--redis-client-key`.
//!
//! Both speak RESP3 so that commands and subscriptions share one multiplexed connection;
//! the `redis` crate reconnects and resubscribes by itself after a connection is lost,
//! and a Cluster link that stops answering altogether is made anew ([`cluster`]).

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::{AsyncPushSender, ConnectionManager, ConnectionManagerConfig, SendError};
use redis::cluster::ClusterClientBuilder;
use redis::{ClientTlsConfig, Cmd, ConnectionInfo, FromRedisValue, IntoConnectionInfo, ProtocolVersion, PushInfo, RedisResult, RedisWrite, TlsCertificates, ToRedisArgs, Value};
use tokio::sync::mpsc::{self, error::TrySendError, Receiver};

mod cluster;
mod sentinel;

use cluster::Cluster;
use sentinel::{sentinel_client, Following};

use crate::config::{redacted_all, Config, RegistryKind};
use crate::cores::Cores;
use crate::error::Error;
use crate::telemetry::{probes, DropReason, Metrics, RedisCommand};

/// Time to open a connection to one Redis server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Time a command may take before it counts as failed; bounds a publish during an outage.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Messages from other nodes waiting to be delivered here. Past it, new ones are
/// dropped and counted (`relay_backlog`): a node that cannot keep up with the others must
/// not buffer without bound.
pub const RELAY_BACKLOG: usize = 1024;

/// Hands what Redis pushes (messages on subscribed channels, subscription changes,
/// disconnections) to the relay reader, without blocking the connection and without
/// growing past [`RELAY_BACKLOG`]; what it drops, it notes for the reader.
#[derive(Clone)]
struct Pushes {
    tx: mpsc::Sender<PushInfo>,
    metrics: Arc<Metrics>,
    breaks: Arc<AtomicU64>,
    dropped: Arc<AtomicU8>,
}

/// What the relay backlog dropped since the reader last asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DroppedPushes {
    None,
    /// Messages only: this node's clients missed them.
    Messages,
    /// A disconnection or subscription change too: the node may no longer be subscribed.
    Notices,
}

const DROPPED_MESSAGES: u8 = 1;
const DROPPED_NOTICES: u8 = 2;

impl DroppedPushes {
    fn take(dropped: &AtomicU8) -> DroppedPushes {
        match dropped.swap(0, Ordering::AcqRel) {
            0 => DroppedPushes::None,
            DROPPED_MESSAGES => DroppedPushes::Messages,
            _ => DroppedPushes::Notices,
        }
    }
}

impl AsyncPushSender for Pushes {
    fn send(&self, info: PushInfo) -> Result<(), SendError> {
        if info.kind == redis::PushKind::Disconnection {
            self.breaks.fetch_add(1, Ordering::Relaxed);
        }
        let message = matches!(info.kind, redis::PushKind::Message | redis::PushKind::SMessage);
        match self.tx.try_send(info) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => {
                self.metrics.dropped(DropReason::RelayBacklog, 1);
                self.dropped.fetch_or(if message { DROPPED_MESSAGES } else { DROPPED_NOTICES }, Ordering::AcqRel);
                Ok(())
            }
            // The reader stopped: this node is shutting down.
            Err(TrySendError::Closed(_)) => Err(SendError),
        }
    }
}

#[derive(Clone)]
enum Link {
    Single(ConnectionManager),
    Cluster(Arc<Cluster>),
    Sentinel(Arc<Following>),
}

#[derive(Clone)]
pub struct Redis {
    link: Link,
    /// One more connection to a single Redis per core runtime, driven on that core: a
    /// command sent from a core thread (a publish's session lookup and append) is written
    /// and answered there, and wakes no other thread, where the main link's connection
    /// task lives on the main runtime. Subscriptions stay on the main link. None through
    /// Sentinel or on a Cluster, whose links keep one connection task per server.
    core_links: Option<Arc<CoreLinks>>,
    metrics: Arc<Metrics>,
    breaks: Arc<AtomicU64>,
    dropped: Arc<AtomicU8>,
}

struct CoreLinks {
    cores: Arc<Cores>,
    links: Box<[ConnectionManager]>,
}

impl CoreLinks {
    /// Opens a link to `client`'s Redis on each of `cores`' runtimes.
    async fn connect(client: &redis::Client, cores: &Arc<Cores>, shown: &str) -> Result<CoreLinks, Error> {
        let mut links = Vec::new();
        for handle in cores.handles() {
            let (client, shown) = (client.clone(), shown.to_owned());
            // Made by a task on that core, so the connection's own task is spawned there.
            let made = handle.spawn(async move { manager(&client, None, &shown).await }).await;
            links.push(made.map_err(|e| Error::unavailable(format!("opening a core's Redis link: {e}")))??);
        }
        Ok(CoreLinks { cores: cores.clone(), links: links.into() })
    }
}

impl Redis {
    /// Connects to the Redis `config` names: one server (from the calling runtime, and
    /// from each of `cores`), a cluster's seed nodes, or the master the Sentinels name.
    /// Messages from channels this node subscribes to, and a `Disconnection` each time the
    /// link drops or moves to a new master, arrive on the returned receiver.
    pub async fn connect(config: &Config, metrics: Arc<Metrics>, cores: &Arc<Cores>) -> Result<(Redis, Receiver<PushInfo>), Error> {
        let (tx, received) = mpsc::channel(RELAY_BACKLOG);
        let breaks = Arc::new(AtomicU64::new(0));
        let dropped = Arc::new(AtomicU8::new(0));
        let pushes = Pushes { tx, metrics: metrics.clone(), breaks: breaks.clone(), dropped: dropped.clone() };
        let urls = &config.redis_url;
        let shown = redacted_all(urls);
        let bad_url = |e: redis::RedisError| Error::config(format!("--redis-url {shown}: {e}"));
        let certificates = certificates(config)?;
        let mut core_links = None;
        let link = match config.registry {
            RegistryKind::Memory => return Err(Error::config("the memory registry has no Redis")),
            RegistryKind::Redis => {
                let info = resp3(urls[0].as_str().into_connection_info().map_err(bad_url)?);
                let client = match certificates {
                    Some(certificates) => redis::Client::build_with_tls(info, certificates),
                    None => redis::Client::open(info),
                }
                .map_err(bad_url)?;
                let main = manager(&client, Some(pushes), &shown).await?;
                core_links = Some(Arc::new(CoreLinks::connect(&client, cores, &shown).await?));
                Link::Single(main)
            }
            RegistryKind::RedisCluster => {
                let mut builder = ClusterClientBuilder::new(urls.iter().map(String::as_str))
                    .use_protocol(ProtocolVersion::RESP3)
                    .push_sender(pushes.clone())
                    .retries(1)
                    .connection_timeout(CONNECT_TIMEOUT)
                    .response_timeout(RESPONSE_TIMEOUT);
                if let Some(certificates) = certificates {
                    builder = builder.certs(certificates);
                }
                let client = builder.build().map_err(bad_url)?;
                Link::Cluster(Cluster::connect(client, pushes, shown.clone()).await?)
            }
            RegistryKind::RedisSentinel => {
                let master = urls[0].as_str().into_connection_info().map_err(bad_url)?;
                let (sentinel, name) = sentinel_client(&master, &config.sentinel, certificates)?;
                let asked = format!("{shown} (through the Sentinels at {})", redacted_all(&config.sentinel));
                Link::Sentinel(Following::start(sentinel, name, pushes, metrics.clone(), &asked).await?)
            }
        };
        Ok((Redis { link, core_links, metrics, breaks, dropped }, received))
    }

    /// This core thread's own link, on a core thread of a node on a single Redis.
    fn core_link(&self) -> Option<ConnectionManager> {
        let core = self.core_links.as_ref()?;
        core.cores.current().and_then(|i| core.links.get(i)).cloned()
    }

    /// Sends on a single Redis's link for this thread: its core's, else `main`. A core link
    /// that has not reconnected since Redis came back answers its next command with the
    /// refusal it met while Redis was down, having sent nothing; that command goes over the
    /// main link, which the node's own timers keep reconnected, and the core link
    /// reconnects meanwhile.
    async fn on_single<T, F, Fut>(&self, main: ConnectionManager, send: F) -> RedisResult<T>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let Some(core) = self.core_link() else { return send(main).await };
        match send(core).await {
            Err(e) if e.is_connection_refusal() => send(main).await,
            answer => answer,
        }
    }

    /// Times a link to a Redis server broke, moved to another master, or met a server
    /// without this node's scripts (it restarted): after each, what Redis holds may have
    /// come back from a snapshot or a replica.
    pub fn breaks(&self) -> u64 {
        self.breaks.load(Ordering::Relaxed)
    }

    /// What the relay backlog dropped since the last call.
    pub fn take_dropped_pushes(&self) -> DroppedPushes {
        DroppedPushes::take(&self.dropped)
    }

    /// Whether channels are sharded (Redis Cluster: SPUBLISH / SSUBSCRIBE).
    pub fn sharded(&self) -> bool {
        matches!(self.link, Link::Cluster(_))
    }

    /// Whether, after a break, the link may reach a server that lacks this node's last
    /// writes while still holding its liveness key: a Cluster shard that came back empty
    /// beside the shard holding that key, or a replica the Sentinels promoted before it had
    /// every write.
    pub fn breaks_may_lose_writes(&self) -> bool {
        matches!(self.link, Link::Cluster(_) | Link::Sentinel(_))
    }

    /// Runs one command.
    pub async fn query<T: FromRedisValue>(&self, command: RedisCommand, cmd: &Cmd) -> RedisResult<T> {
        self.timed(command, 1, async {
            match self.link.clone() {
                Link::Single(main) => self.on_single(main, |mut c| async move { cmd.query_async(&mut c).await }).await,
                Link::Cluster(c) => c.run(|mut c| async move { cmd.query_async(&mut c).await }).await,
                Link::Sentinel(f) => f.checked(cmd.query_async(&mut f.master())).await,
            }
        })
        .await
    }

    /// Runs commands (of the kind `command` names) as one batch: one pipeline (one round trip) on a single Redis; on a
    /// cluster, where a pipeline must stay within one slot, all at once over the
    /// multiplexed shard connections. Fails as a whole if any command failed.
    pub async fn batch(&self, command: RedisCommand, cmds: Vec<Cmd>) -> RedisResult<Vec<Value>> {
        if cmds.is_empty() {
            return Ok(Vec::new());
        }
        self.timed(command, cmds.len(), async {
            match self.link.clone() {
                Link::Single(main) => {
                    let pipe = &pipeline(cmds);
                    self.on_single(main, |mut c| async move { pipe.query_async(&mut c).await }).await
                }
                Link::Sentinel(f) => f.checked(pipeline(cmds).query_async(&mut f.master())).await,
                Link::Cluster(c) => c.each(&cmds).await.into_iter().collect(),
            }
        })
        .await
    }

    /// Runs `script` once per `(keys, args)` as one batch, like [`Redis::batch`], by hash
    /// (EVALSHA). Where Redis does not have the script (it restarted), it is loaded and
    /// those invocations, which did not run, are sent again, with the script's restart
    /// argument (if it has one) set to `1`. Fails if any failed.
    pub async fn scripts(&self, command: RedisCommand, script: &Script, invocations: &[Invocation]) -> RedisResult<Vec<Value>> {
        let evalsha = |call: &Invocation, restarted: bool| {
            let mut cmd = Cmd::with_capacity(call.ends.len() + 3, call.bytes.len() + script.hash.len() + 8);
            cmd.arg("EVALSHA").arg(&script.hash).arg(call.keys);
            for (i, item) in call.items().enumerate() {
                if restarted && i >= call.keys && Some(i - call.keys) == script.restart_arg {
                    cmd.arg(b"1");
                } else {
                    cmd.arg(item);
                }
            }
            cmd
        };
        let by_hash: Vec<Cmd> = invocations.iter().map(|i| evalsha(i, false)).collect();
        let mut results = self.batch_results(command, by_hash).await?;
        let missing: Vec<usize> = (0..results.len()).filter(|i| matches!(&results[*i], Err(e) if is_noscript(e))).collect();
        if !missing.is_empty() {
            self.breaks.fetch_add(1, Ordering::Relaxed);
            let mut load = redis::cmd("SCRIPT");
            load.arg("LOAD").arg(script.code);
            self.query::<Value>(command, &load).await?;
            let again: Vec<Cmd> = missing.iter().map(|i| evalsha(&invocations[*i], true)).collect();
            for (i, result) in missing.into_iter().zip(self.batch_results(command, again).await?) {
                results[i] = result;
            }
        }
        results.into_iter().collect()
    }

    /// A batch whose commands succeed or fail one by one.
    pub async fn batch_results(&self, command: RedisCommand, cmds: Vec<Cmd>) -> RedisResult<Vec<RedisResult<Value>>> {
        self.timed(command, cmds.len(), async {
            match self.link.clone() {
                Link::Single(main) => {
                    let mut pipe = pipeline(cmds);
                    let pipe = &*pipe.ignore_errors();
                    one_by_one(self.on_single(main, |mut c| async move { pipe.query_async(&mut c).await }).await)
                }
                Link::Sentinel(f) => {
                    let results = one_by_one(f.checked(pipeline(cmds).ignore_errors().query_async(&mut f.master())).await)?;
                    results.iter().filter_map(|r| r.as_ref().err()).for_each(|e| f.check(e));
                    Ok(results)
                }
                Link::Cluster(c) => Ok(c.each(&cmds).await),
            }
        })
        .await
    }

    /// Subscribes to `channel` (sharded on a cluster); kept across reconnects.
    pub async fn subscribe(&self, channel: &str) -> RedisResult<()> {
        self.timed(RedisCommand::Subscribe, 1, async {
            match self.link.clone() {
                Link::Single(mut c) => c.subscribe(channel).await,
                Link::Cluster(c) => c.subscribe(channel).await,
                Link::Sentinel(f) => f.subscribe(channel).await,
            }
        })
        .await
    }

    /// PUBLISH, or SPUBLISH on a cluster; its answer is the subscribers that got it.
    pub fn publish_cmd(&self, channel: &str, payload: &[u8]) -> Cmd {
        let mut cmd = redis::cmd(if self.sharded() { "SPUBLISH" } else { "PUBLISH" });
        cmd.arg(channel).arg(payload);
        cmd
    }

    async fn timed<T>(&self, command: RedisCommand, batch: usize, run: impl Future<Output = RedisResult<T>>) -> RedisResult<T> {
        probes::redis_start(command as u8, batch);
        let started = Instant::now();
        let result = run.await;
        let elapsed = started.elapsed();
        probes::redis_end(command as u8, elapsed.as_nanos() as u64, result.is_ok());
        self.metrics.redis_command(command, elapsed.as_secs_f64(), result.is_ok());
        result
    }
}

/// One argument made of `pieces` end to end, written straight into the command: a key
/// such as `prefix:uid:alice` costs no String of its own.
pub struct Joined<'a, const N: usize>(pub [&'a [u8]; N]);

impl<const N: usize> ToRedisArgs for Joined<'_, N> {
    fn write_redis_args<W: ?Sized + RedisWrite>(&self, out: &mut W) {
        use std::io::Write;
        let mut arg = out.writer_for_next_arg();
        for piece in self.0 {
            // The writer appends to the command's buffer in memory: it cannot fail.
            let _ = arg.write_all(piece);
        }
    }
}

fn pipeline(cmds: Vec<Cmd>) -> redis::Pipeline {
    let mut pipe = redis::Pipeline::with_capacity(cmds.len());
    for cmd in cmds {
        pipe.add_command(cmd);
    }
    pipe
}

/// A pipeline's answers (run with errors ignored) as one result per command.
fn one_by_one(values: RedisResult<Vec<Value>>) -> RedisResult<Vec<RedisResult<Value>>> {
    Ok(values?
        .into_iter()
        .map(|v| match v {
            Value::ServerError(e) => Err(e.into()),
            v => Ok(v),
        })
        .collect())
}

/// Both sides of the link speak RESP3, so that commands and subscriptions share one
/// multiplexed connection.
fn resp3(info: ConnectionInfo) -> ConnectionInfo {
    let settings = info.redis_settings().clone().set_protocol(ProtocolVersion::RESP3);
    info.set_redis_settings(settings)
}

/// A connection manager on `client`, on the runtime that calls it. With `pushes`, it hands
/// what Redis pushes there and subscribes again after reconnecting; without, it carries
/// commands only.
async fn manager(client: &redis::Client, pushes: Option<Pushes>, shown: &str) -> Result<ConnectionManager, Error> {
    let mut config = ConnectionManagerConfig::new()
        .set_number_of_retries(1)
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT));
    if let Some(pushes) = pushes {
        config = config.set_push_sender(pushes).set_automatic_resubscription();
    }
    tokio::time::timeout(CONNECT_TIMEOUT * 5, client.get_connection_manager_with_config(config))
        .await
        .map_err(|_| Error::unavailable(format!("cannot reach Redis at {shown}: timed out")))?
        .map_err(|e| Error::unavailable(format!("cannot reach Redis at {shown}: {e}")))
}

/// The CA and client certificate `--redis-ca`, `--redis-client-cert` and
/// `--redis-client-key` name, for `rediss://` links; None when none is given (the
/// system's roots are used).
fn certificates(config: &Config) -> Result<Option<TlsCertificates>, Error> {
    let read = |flag: &str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| Error::config(format!("{flag} {}: {e}", path.display())))
    };
    let root_cert = config.redis_ca.as_deref().map(|p| read("--redis-ca", p)).transpose()?;
    let client_tls = match (&config.redis_client_cert, &config.redis_client_key) {
        (Some(cert), Some(key)) => Some(ClientTlsConfig { client_cert: read("--redis-client-cert", cert)?, client_key: read("--redis-client-key", key)? }),
        _ => None,
    };
    Ok((root_cert.is_some() || client_tls.is_some()).then_some(TlsCertificates { client_tls, root_cert }))
}

fn is_noscript(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
}

/// One call of a script: its keys, then its arguments, packed into one buffer. A push
/// on Redis is one call with two dozen of them, and a buffer each was about two thirds
/// of the allocations of a batch's publishing node (perf).
#[derive(Default)]
pub struct Invocation {
    bytes: Vec<u8>,
    /// Where each key, then each argument, ends in `bytes`.
    ends: Vec<usize>,
    keys: usize,
}

impl Invocation {
    /// Room for `items` keys and arguments of `bytes` in all.
    pub fn with_capacity(items: usize, bytes: usize) -> Invocation {
        Invocation { bytes: Vec::with_capacity(bytes), ends: Vec::with_capacity(items), keys: 0 }
    }

    /// Adds a key; every key comes before the first argument.
    pub fn key(&mut self, pieces: &[&[u8]]) -> &mut Invocation {
        debug_assert_eq!(self.keys, self.ends.len(), "a key after an argument");
        self.keys += 1;
        self.arg(pieces)
    }

    /// Adds an argument, the concatenation of `pieces`.
    pub fn arg(&mut self, pieces: &[&[u8]]) -> &mut Invocation {
        pieces.iter().for_each(|p| self.bytes.extend_from_slice(p));
        self.ends.push(self.bytes.len());
        self
    }

    /// Adds an argument written by `write` (numbers, formatted text).
    pub fn arg_with(&mut self, write: impl FnOnce(&mut Vec<u8>)) -> &mut Invocation {
        write(&mut self.bytes);
        self.ends.push(self.bytes.len());
        self
    }

    /// A number as an argument, in decimal (written with itoa: a push's append call has
    /// half a dozen, and the formatting machinery was a tenth of its node's time).
    pub fn number(&mut self, value: impl itoa::Integer) -> &mut Invocation {
        self.arg(&[itoa::Buffer::new().format(value).as_bytes()])
    }

    fn items(&self) -> impl Iterator<Item = &[u8]> {
        self.ends.iter().scan(0, |start, &end| {
            let item = &self.bytes[*start..end];
            *start = end;
            Some(item)
        })
    }
}

/// A Lua script, called by its hash.
pub struct Script {
    pub code: &'static str,
    hash: String,
    /// The argument (0-based) that tells the script the Redis server may have restarted.
    restart_arg: Option<usize>,
}

impl Script {
    pub fn new(code: &'static str) -> Script {
        use sha1::Digest;
        let hash = crate::wire::hex(&sha1::Sha1::digest(code.as_bytes()));
        Script { code, hash, restart_arg: None }
    }

    /// The script takes `1` at argument `index` (0-based) when the server may have
    /// restarted: it is set on invocations sent again after the server did not know the
    /// script, which a restarted server does not.
    pub fn told_of_restarts_at(self, index: usize) -> Script {
        Script { restart_arg: Some(index), ..self }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys, then arguments, each whole; `number of keys` is the keys alone.
    #[test]
    fn an_invocation_keeps_its_keys_and_arguments_apart_in_one_buffer() {
        let mut call = Invocation::with_capacity(2, 8);
        call.key(&[b"p:", b"k"]).key(&[b"k2"]).arg(&[]).number(42).arg_with(|b| b.extend_from_slice(b"x"));
        let items: Vec<&[u8]> = call.items().collect();
        assert_eq!(items, [&b"p:k"[..], b"k2", b"", b"42", b"x"]);
        assert_eq!(call.keys, 2);
    }

    #[test]
    fn a_full_inbox_drops_and_counts_instead_of_growing() {
        let metrics = Arc::new(Metrics::new());
        let (tx, mut rx) = mpsc::channel(RELAY_BACKLOG);
        let dropped = Arc::new(AtomicU8::new(0));
        let pushes = Pushes { tx, metrics: metrics.clone(), breaks: Arc::new(AtomicU64::new(0)), dropped: dropped.clone() };
        let message = || PushInfo { kind: redis::PushKind::Message, data: vec![] };
        for _ in 0..RELAY_BACKLOG + 3 {
            assert!(pushes.send(message()).is_ok(), "the connection keeps its push sender");
        }
        let text = metrics.render(Default::default());
        assert!(text.contains(r#"pushline_messages_dropped_total{reason="relay_backlog"} 3"#), "{text}");
        assert_eq!(DroppedPushes::take(&dropped), DroppedPushes::Messages, "the reader learns its clients missed messages");
        assert_eq!(DroppedPushes::take(&dropped), DroppedPushes::None, "once");
        assert!(pushes.send(PushInfo { kind: redis::PushKind::Disconnection, data: vec![] }).is_ok());
        assert!(pushes.send(message()).is_ok());
        assert_eq!(DroppedPushes::take(&dropped), DroppedPushes::Notices, "a lost disconnection is not just a lost message");
        let mut queued = 0;
        while rx.try_recv().is_ok() {
            queued += 1;
        }
        assert_eq!(queued, RELAY_BACKLOG);
        drop(rx);
        assert!(pushes.send(message()).is_err(), "a reader that stopped stops the pushes");
    }

}
