//! A Redis Cluster link that is made anew when it stops answering altogether.
//!
//! The redis crate's cluster connection can hang in its own recovery: after a shard
//! restarted under load, its slot refresh never finished and every command, on every
//! shard, timed out from then on (attack 40, 4 of 22 restarts; compare redis-rs #1953 and
//! #2092). The node never talked to Redis again, its clients unreachable from the others.
//! Here, once no command has been answered for [`REMAKE_AFTER`] while commands kept
//! failing, a new connection from the same client replaces the old one, and the relay is
//! told the link broke, as after any dropped connection: it subscribes its channels again
//! (on the new link) and the registrar writes every session again.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use pushline_alloc::Site;
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::aio::AsyncPushSender;
use redis::{Cmd, PushInfo, PushKind, RedisError, RedisResult, Value};

use super::{Pushes, CONNECT_TIMEOUT};
use crate::clock;
use crate::error::Error;

/// How long commands may go unanswered (every one failing on a timeout or a dead
/// connection) before the link is made anew: five response timeouts, longer than a shard
/// restart or a failover keeps the whole Cluster from answering.
pub const REMAKE_AFTER: Duration = Duration::from_secs(10);

pub(super) struct Cluster {
    client: ClusterClient,
    connection: RwLock<ClusterConnection>,
    stall: Stall,
    remaking: AtomicBool,
    pushes: Pushes,
    /// The seed URLs, passwords masked, for the log.
    shown: String,
}

impl Cluster {
    pub(super) async fn connect(client: ClusterClient, pushes: Pushes, shown: String) -> Result<Arc<Cluster>, Error> {
        let connection = open(&client).await.map_err(|e| Error::unavailable(format!("cannot reach the Redis Cluster at {shown}: {e}")))?;
        Ok(Arc::new(Cluster { client, connection: RwLock::new(connection), stall: Stall::default(), remaking: AtomicBool::new(false), pushes, shown }))
    }

    /// Runs `command` on the current connection, noting whether it was answered.
    pub(super) async fn run<T, F, Fut>(self: &Arc<Self>, command: F) -> RedisResult<T>
    where
        F: FnOnce(ClusterConnection) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let connection = self.connection.read().unwrap_or_else(|e| e.into_inner()).clone();
        let result = command(connection).await;
        let answered = result.as_ref().map_or_else(|e| !unanswered(e), |_| true);
        if self.stall.note(answered, clock::now_ms()) && !self.remaking.swap(true, Ordering::AcqRel) {
            tokio::spawn(Site::Redis.instrument(self.clone().remake()));
        }
        result
    }

    async fn remake(self: Arc<Self>) {
        let shown = &self.shown;
        match open(&self.client).await {
            Ok(connection) => {
                *self.connection.write().unwrap_or_else(|e| e.into_inner()) = connection;
                self.stall.reset();
                tracing::warn!(cluster = %shown, "the Redis Cluster link answered nothing for {}s: replaced it with a new connection", REMAKE_AFTER.as_secs());
                // Told as a dropped connection is: channels subscribed again, sessions
                // written again, and this node's clients told of the gap.
                let _ = self.pushes.send(PushInfo { kind: PushKind::Disconnection, data: vec![] });
            }
            Err(e) => {
                // The next try is another REMAKE_AFTER of silence away.
                self.stall.failing_from(clock::now_ms());
                tracing::warn!(cluster = %shown, "the Redis Cluster link answered nothing for {}s, and a new one could not be opened: {e}", REMAKE_AFTER.as_secs());
            }
        }
        self.remaking.store(false, Ordering::Release);
    }

    /// Runs each of `cmds` at once over the shard connections (a pipeline must stay within
    /// one slot), one result each.
    pub(super) async fn each(self: &Arc<Self>, cmds: &[Cmd]) -> Vec<RedisResult<Value>> {
        let each = cmds.iter().map(|cmd| self.run(move |mut c| async move { cmd.query_async::<Value>(&mut c).await }));
        futures_util::future::join_all(each).await
    }

    pub(super) async fn subscribe(self: &Arc<Self>, channel: &str) -> RedisResult<()> {
        self.run(|mut c| async move { c.ssubscribe(channel).await }).await
    }
}

/// A new connection, within five connect timeouts: opening one can hang too (redis-rs #1953).
async fn open(client: &ClusterClient) -> Result<ClusterConnection, String> {
    match tokio::time::timeout(CONNECT_TIMEOUT * 5, client.get_async_connection()).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

/// An error that says the link did not answer (as opposed to Redis answering with an
/// error, such as CLUSTERDOWN or NOSCRIPT, over a link that works).
fn unanswered(e: &RedisError) -> bool {
    e.is_timeout() || e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal()
}

/// Since when commands have gone unanswered.
#[derive(Default)]
struct Stall {
    /// Process-clock ms (plus one, so 0 means none) of the first unanswered command since
    /// the last answered one; 0 while answered.
    failing_since: AtomicU64,
}

impl Stall {
    /// Notes a command's outcome at `now_ms`; true when nothing has been answered for
    /// [`REMAKE_AFTER`].
    fn note(&self, answered: bool, now_ms: u64) -> bool {
        if answered {
            self.reset();
            return false;
        }
        let since = match self.failing_since.compare_exchange(0, now_ms + 1, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => now_ms + 1,
            Err(since) => since,
        };
        (now_ms + 1).saturating_sub(since) >= REMAKE_AFTER.as_millis() as u64
    }

    fn failing_from(&self, now_ms: u64) {
        self.failing_since.store(now_ms + 1, Ordering::Release);
    }

    fn reset(&self) {
        self.failing_since.store(0, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_stalls_only_after_nothing_is_answered_for_the_whole_wait() {
        let stall = Stall::default();
        let wait = REMAKE_AFTER.as_millis() as u64;
        assert!(!stall.note(false, 1_000));
        assert!(!stall.note(false, 1_000 + wait - 1), "not yet");
        assert!(!stall.note(true, 1_000 + wait - 1), "an answer ends the stall");
        assert!(!stall.note(false, 1_000 + wait), "the wait starts again at the next failure");
        assert!(stall.note(false, 1_000 + 2 * wait), "nothing answered for the whole wait");
        assert!(stall.note(false, 1_000 + 2 * wait + 5), "and stays stalled until answered");
        stall.failing_from(1_000 + 2 * wait + 5);
        assert!(!stall.note(false, 1_000 + 3 * wait), "a failed remake waits the whole wait again");
        assert!(stall.note(false, 1_000 + 3 * wait + 5));
        // From the first moment of the process clock too.
        let stall = Stall::default();
        assert!(!stall.note(false, 0));
        assert!(stall.note(false, wait));
    }

    #[test]
    fn redis_answering_with_an_error_is_an_answer() {
        let answered = RedisError::from((redis::ErrorKind::Server(redis::ServerErrorKind::ClusterDown), "CLUSTERDOWN"));
        assert!(!unanswered(&answered));
        let timed_out = RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut));
        assert!(unanswered(&timed_out));
    }
}
