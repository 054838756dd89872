//! Following the master a set of Redis Sentinels name, across failovers: the redis
//! crate finds the master (and checks it answers as one), but its connection manager
//! stays on the address it was given, so the link here is a manager on the current
//! master, replaced (its channels subscribed again) when the Sentinels name another.

use std::future::Future;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use pushline_alloc::Site;
use redis::aio::{AsyncPushSender, ConnectionManager, MultiplexedConnection};
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, ProtocolVersion, PushInfo, RedisResult, TlsCertificates};
use tokio::sync::Notify;

use super::{manager, Pushes, CONNECT_TIMEOUT};
use crate::config::redacted_all;
use crate::error::Error;
use crate::telemetry::Metrics;

/// A client of the Sentinels `sentinels` for the master whose name is `master`'s host;
/// the master is reached with `master`'s user, password, database and TLS, the Sentinels
/// with the first Sentinel URL's user and password.
pub(super) fn sentinel_client(master: &ConnectionInfo, sentinels: &[String], certificates: Option<TlsCertificates>) -> Result<(SentinelClient, String), Error> {
    let shown = redacted_all(sentinels);
    let bad = |e: redis::RedisError| Error::config(format!("--sentinel {shown}: {e}"));
    let infos = sentinels.iter().map(|u| u.as_str().into_connection_info()).collect::<RedisResult<Vec<_>>>().map_err(bad)?;
    let (name, tls) = match master.addr() {
        ConnectionAddr::Tcp(host, _) => (host.clone(), false),
        ConnectionAddr::TcpTls { host, .. } => (host.clone(), true),
        ConnectionAddr::Unix(_) => return Err(Error::config("--redis-url for redis-sentinel names the master: redis[s]://[user:password@]NAME[/db]")),
        _ => return Err(Error::config("--redis-url: an address kind Sentinel cannot name")),
    };
    let settings = master.redis_settings();
    let mut builder = SentinelClientBuilder::new(infos.iter().map(|i| i.addr().clone()), &name, SentinelServerType::Master)
        .map_err(bad)?
        .set_client_to_redis_db(settings.db())
        .set_client_to_redis_protocol(ProtocolVersion::RESP3);
    if let Some(user) = settings.username() {
        builder = builder.set_client_to_redis_username(user);
    }
    if let Some(password) = settings.password() {
        builder = builder.set_client_to_redis_password(password);
    }
    if tls {
        builder = builder.set_client_to_redis_tls_mode(redis::TlsMode::Secure);
    }
    if let Some(first) = infos.first() {
        if let Some(user) = first.redis_settings().username() {
            builder = builder.set_client_to_sentinel_username(user);
        }
        if let Some(password) = first.redis_settings().password() {
            builder = builder.set_client_to_sentinel_password(password);
        }
    }
    if let Some(certificates) = certificates {
        if infos.iter().any(|i| matches!(i.addr(), ConnectionAddr::TcpTls { .. })) {
            builder = builder.set_client_to_sentinel_certificates(certificates.clone());
        }
        if tls {
            builder = builder.set_client_to_redis_certificates(certificates);
        }
    }
    Ok((builder.build().map_err(bad)?, name))
}

/// How often the Sentinels are asked where the master is; a command that fails on a
/// connection error or a read-only replica asks at once.
const SENTINEL_POLL: Duration = Duration::from_millis(500);

/// The master the Sentinels name, followed across failovers: the link is a connection
/// manager on the current master, replaced (its channels subscribed again) when the
/// Sentinels name another.
pub(super) struct Following {
    master: RwLock<(String, ConnectionManager)>,
    channels: Mutex<Vec<String>>,
    pushes: Pushes,
    asked: Notify,
    metrics: Arc<Metrics>,
}

impl Following {
    /// `shown`: the master's URL and the Sentinels', passwords masked, for errors.
    pub(super) async fn start(mut sentinel: SentinelClient, name: String, pushes: Pushes, metrics: Arc<Metrics>, shown: &str) -> Result<Arc<Following>, Error> {
        // The redis crate asks the Sentinels, then the master they name for its role: a
        // failure may be either's (a Sentinel down, the master's password or TLS wrong).
        let client = tokio::time::timeout(CONNECT_TIMEOUT * 5, sentinel.async_get_client())
            .await
            .map_err(|_| Error::unavailable(format!("cannot reach the Redis master {shown}: timed out")))?
            .map_err(|e| Error::unavailable(format!("cannot reach the Redis master {shown}: {e}")))?;
        let address = address(&client);
        let manager = manager(&client, Some(pushes.clone()), &address).await?;
        tracing::info!(master = %address, "Sentinel names the Redis master");
        let following = Arc::new(Following {
            master: RwLock::new((address, manager)),
            channels: Mutex::new(Vec::new()),
            pushes,
            asked: Notify::new(),
            metrics,
        });
        tokio::spawn(Site::Redis.instrument(Following::follow(Arc::downgrade(&following), sentinel, name)));
        Ok(following)
    }

    pub(super) fn master(&self) -> ConnectionManager {
        self.master.read().unwrap_or_else(|e| e.into_inner()).1.clone()
    }

    /// Runs `command`, asking the Sentinels at once if it failed the way a dead or demoted
    /// master fails.
    pub(super) async fn checked<T>(&self, command: impl Future<Output = RedisResult<T>>) -> RedisResult<T> {
        let result = command.await;
        if let Err(e) = &result {
            self.check(e);
        }
        result
    }

    pub(super) fn check(&self, e: &redis::RedisError) {
        if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout() || e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly) {
            self.asked.notify_one();
        }
    }

    pub(super) async fn subscribe(&self, channel: &str) -> RedisResult<()> {
        {
            let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
            if !channels.iter().any(|c| c == channel) {
                channels.push(channel.to_owned());
            }
        }
        self.checked(self.master().subscribe(channel)).await
    }

    /// Asks a Sentinel where the master is every [`SENTINEL_POLL`], or at once when a
    /// command failed, and moves the link when it names another (checked, as the redis
    /// crate does, by asking that server its role); ends with the link.
    async fn follow(this: Weak<Following>, mut sentinel: SentinelClient, name: String) {
        let mut asking: Option<MultiplexedConnection> = None;
        // Said once when no Sentinel answers (the node could not follow a failover), once
        // when one does again.
        let mut unanswered = false;
        loop {
            let Some(asked) = this.upgrade().map(|f| async move { f.asked.notified().await }) else { return };
            tokio::select! {
                _ = tokio::time::sleep(SENTINEL_POLL) => {}
                _ = asked => {}
            }
            let named = tokio::time::timeout(CONNECT_TIMEOUT * 2, Following::named(&mut sentinel, &mut asking, &name)).await;
            let Some(following) = this.upgrade() else { return };
            let named = match named {
                Ok(Ok(address)) => address,
                failed => {
                    if !unanswered {
                        let error = failed.map_or_else(|_| "timed out".to_owned(), |r| r.err().map(|e| e.to_string()).unwrap_or_default());
                        tracing::warn!(error, "no Sentinel answers where the Redis master is: this node cannot follow a failover until one does");
                    }
                    unanswered = true;
                    asking = None;
                    continue;
                }
            };
            if std::mem::take(&mut unanswered) {
                tracing::info!("a Sentinel answers again");
            }
            if following.master.read().unwrap_or_else(|e| e.into_inner()).0 == named {
                continue;
            }
            match tokio::time::timeout(CONNECT_TIMEOUT * 2, sentinel.async_get_client()).await {
                Ok(Ok(client)) => following.move_to(&client, address(&client)).await,
                Ok(Err(e)) => tracing::debug!(error = %e, "the master a Sentinel names does not answer as master yet"),
                Err(_) => {}
            }
        }
    }

    /// `host:port` of the master a Sentinel names, over one kept connection to it.
    async fn named(sentinel: &mut SentinelClient, asking: &mut Option<MultiplexedConnection>, name: &str) -> RedisResult<String> {
        let connection = match asking {
            Some(connection) => connection,
            None => asking.insert(sentinel.async_get_sentinel_client().await?.get_multiplexed_async_connection().await?),
        };
        let (host, port): (String, u16) = redis::cmd("SENTINEL").arg("get-master-addr-by-name").arg(name).query_async(connection).await?;
        Ok(format!("{host}:{port}"))
    }

    /// Replaces the link by one to the new master and subscribes its channels there.
    async fn move_to(&self, client: &redis::Client, address: String) {
        let Ok(manager) = manager(client, Some(self.pushes.clone()), &address).await else { return };
        let channels = self.channels.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for channel in &channels {
            if let Err(e) = manager.clone().subscribe(channel).await {
                tracing::warn!(channel, error = %e, "cannot subscribe at the new master; trying again");
                return;
            }
        }
        let before = std::mem::replace(&mut *self.master.write().unwrap_or_else(|e| e.into_inner()), (address.clone(), manager)).0;
        self.metrics.redis_master_changes.increment(1);
        tracing::warn!(from = %before, to = %address, "Sentinel names a new Redis master; the link moved there");
        // Whatever was published while the link moved is lost to this node's relay, as
        // after any reconnect: say so the same way.
        let _ = self.pushes.send(PushInfo { kind: redis::PushKind::Disconnection, data: Vec::new() });
    }
}

fn address(client: &redis::Client) -> String {
    client.get_connection_info().addr().to_string()
}

