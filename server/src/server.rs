//! A node from start to stop: binds both listeners, builds each part and hands it what
//! it needs, and runs the shutdown phases in order.
//!
//! Shutdown ([`Phase`]): stop accepting (readyz turns 503) and let accepted publishes
//! finish; close every client with 1001 after it has been sent what was queued for it;
//! (on Redis) remove this node's sessions and liveness key; send the webhook events still
//! queued; stop the sweeper and the admin listener. Each phase is bounded by
//! `shutdown_grace`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pushline_alloc::Site;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use arc_swap::ArcSwap;

use crate::admission::{self, Admission};
use crate::auth::api_keys::ApiKeys;
use crate::auth::{Auth, Credentials};
use crate::api::Api;
use crate::client::sweep::{self, Timers};
use crate::client::publish::Publishing;
use crate::client::{self, Clients};
use crate::config::Config;
use crate::conn::queue::Limits;
use crate::cores::Cores;
use crate::error::{Error, Kind};
use crate::gateway::Gateway;
use crate::history::idempotency::Idempotency;
use crate::tls::{self, Tls};
use crate::history::memory::MemoryHistory;
use crate::hub::{self, Hub};
use crate::listener::{self, Router};
use crate::presence::{self, Presence};
use crate::registry::{self, Attached, Registry};
use crate::session::{MessageIds, SessionIds};
use crate::shutdown::{Phase, Shutdown};
use crate::telemetry::{CloseReason, Metrics};
use crate::admin;
use crate::application::Application;
use crate::hooks::Hooks;
use crate::webhooks::Webhooks;

/// A running node.
pub struct Server {
    client_addr: SocketAddr,
    admin_addr: SocketAddr,
    grace: Duration,
    shutdown: Arc<Shutdown>,
    admission: Arc<Admission>,
    hub: Arc<Hub>,
    accepting: JoinHandle<()>,
    registry: Option<Attached>,
    /// Cancelled when another process holds this node's id; never, on the memory registry.
    evicted: CancellationToken,
    /// Credentials, swapped by [`Server::reload`].
    auth: Arc<ArcSwap<Auth>>,
    api_keys: Arc<ArcSwap<ApiKeys>>,
    /// TLS on the client listener, its certificate reloaded with the credentials.
    tls: Option<Arc<Tls>>,
    metrics: Arc<Metrics>,
    sweeper: CancellationToken,
    /// The webhook senders, and what stops them (after the registry has left).
    webhooks: Option<(tokio::task::JoinSet<()>, CancellationToken)>,
    admin: admin::Running,
    cores: Arc<Cores>,
}

/// Forgets history and abandoned topics past the TTL, a quarter of it at a time.
async fn expire_history(history: Arc<MemoryHistory>, hub: Arc<Hub>, ttl: Duration, stop: CancellationToken) {
    let mut every = tokio::time::interval((ttl / 4).clamp(Duration::from_millis(250), Duration::from_secs(30)));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        Site::History.scope(|| history.expire());
        hub.forget_abandoned(ttl.as_millis() as u64);
    }
}

/// The process's CPU profiler, started by the first server of the process (tests run
/// several in one): signals and per-thread timers are the process's, so there is one.
fn profiler(config: &Config) -> std::io::Result<Arc<pushline_profiler::Profiler>> {
    // A lock, not a OnceLock: two servers starting at once must not both start one.
    static PROFILER: std::sync::Mutex<Option<Arc<pushline_profiler::Profiler>>> = std::sync::Mutex::new(None);
    let mut profiler = PROFILER.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(profiler) = profiler.as_ref() {
        return Ok(profiler.clone());
    }
    let settings = pushline_profiler::Settings {
        hz: config.profile_hz,
        window_minutes: (config.profile_window.as_secs() / 60).max(1),
        max_frames: PROFILE_MAX_FRAMES,
    };
    Ok(profiler.insert(Arc::new(pushline_profiler::Profiler::start(settings)?)).clone())
}

/// Frames the profiler's stack table holds (8 bytes each, plus about 50 per stack).
const PROFILE_MAX_FRAMES: usize = 128 * 1024;

fn io_error(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::new(Kind::Io, format!("{what}: {e}"))
}

impl Server {
    /// Binds, starts serving, and returns once both listeners are open.
    pub async fn start(config: Config) -> Result<Server, Error> {
        config.validate()?;
        let credentials = Credentials::load(&config)?;
        match listener::raise_nofile_limit() {
            Ok(limit) if (config.max_connections as u64).saturating_add(64) > limit => tracing::warn!(
                max_connections = config.max_connections,
                open_file_limit = limit,
                "max_connections is above the open-file limit: connections past it will fail to accept (raise `ulimit -n`, see README)"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "could not read or raise the open-file limit"),
        }
        let client = listener::bind(config.listen, config.reuse_port)
            .map_err(io_error(format!("cannot listen on {} (--listen)", config.listen)))?;
        let admin_listener = std::net::TcpListener::bind(config.admin_listen)
            .map_err(io_error(format!("cannot listen on {} (--admin-listen)", config.admin_listen)))?;
        let client_addr = client.local_addr().map_err(io_error("client listener".into()))?;
        let admin_addr = admin_listener.local_addr().map_err(io_error("admin listener".into()))?;

        let cores = Arc::new(Cores::start(config.io_threads).map_err(io_error("cannot start the core runtimes (--io-threads)".into()))?);
        // Accepted on the first core's runtime: a connection handed to that core is spawned
        // there with no thread woken, and with one core (`--io-threads 1`) none ever is.
        let accepting_core = cores.handle(0).clone();
        let client = {
            let _entered = accepting_core.enter();
            listener::watch(client).map_err(io_error("client listener".into()))?
        };
        let pusher = match config.pusher_apps().map_err(Error::config)? {
            apps if apps.is_empty() => None,
            apps => Some(Arc::new(apps)),
        };
        let app_ids: Vec<&str> = pusher.iter().flat_map(|apps| apps.iter().map(|app| app.id.as_str())).collect();
        let metrics = Arc::new(Site::Metrics.scope(|| Metrics::with_pusher_apps(&app_ids)));
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => {
                let files = tls::Files { cert: cert.clone(), key: key.clone(), ticket_key: config.tls_ticket_key.clone() };
                let tls = Arc::new(Site::Tls.scope(|| Tls::load(files))?);
                metrics.tls_not_after.store(tls.not_after(), std::sync::atomic::Ordering::Relaxed);
                Some(tls)
            }
            _ => None,
        };
        let app_webhooks = pusher.iter().any(|apps| apps.iter().any(|app| app.webhook_url.is_some()));
        let wants_application = config.connect_hook.is_some() || config.subscribe_hook.is_some() || config.webhook_url.is_some() || config.pusher_webhook_url.is_some() || app_webhooks;
        let application = match wants_application {
            true => Some(Arc::new(Application::new(config.hook_ca.as_deref(), config.hook_max_concurrency, config.hook_timeout.min(config.webhook_timeout))?)),
            false => None,
        };
        let hooks = Hooks::from_config(&config, application.clone(), &metrics)?.map(Arc::new);
        let (webhooks, webhook_senders) = match Webhooks::from_config(&config, application, pusher.as_deref(), &metrics)? {
            Some((webhooks, senders)) => (Some(webhooks), senders),
            None => (None, Vec::new()),
        };
        let connected = registry::connect(&config, metrics.clone(), &cores).await?;
        let node = connected.as_ref().map_or(config.node_id.unwrap_or(0), |c| c.node);
        crate::telemetry::logging::set_node(node);
        let settings = hub::Settings {
            limits: Limits { max_messages: config.queue_max_messages, max_bytes: config.queue_max_bytes, policy: config.slow_consumer },
            max_topics_per_connection: config.max_topics_per_connection,
            max_connections_per_uid: config.max_connections_per_uid,
            fanout_batch: config.fanout_batch,
        };
        let changes = connected.as_ref().map(|c| c.changes());
        // Pusher presence channels keep their members here too.
        let presence = (!config.presence_topics.is_empty() || pusher.is_some()).then(|| {
            let settings = presence::Settings {
                topics: crate::rights::Rights::parse(&config.presence_topics, "").unwrap_or_default(),
                batch: config.presence_batch,
                events_max_members: config.presence_events_max_members,
                info_bytes: config.presence_info_bytes,
            };
            Arc::new(Presence::new(settings, metrics.clone(), changes.clone(), webhooks.clone()))
        });
        let watcher = presence.clone().map(|p| p as Arc<dyn hub::Watcher>);
        // On Redis, the registry decides where a topic's subscribers are summed.
        let occupancy = webhooks.clone().filter(|_| changes.is_none()).map(|w| w as Arc<dyn hub::Occupancy>);
        let observers = hub::Observers { changes, watcher, occupancy };
        let hub = Arc::new(Site::Sessions.scope(|| Hub::new(settings, metrics.clone(), cores.clone(), observers)));
        let history = Arc::new(Site::History.scope(|| MemoryHistory::new(crate::history::Settings::from_config(&config), metrics.clone())));
        let (registry, attached) = match connected {
            None => (Registry::Memory { history: history.clone(), idempotency: Idempotency::new(config.idempotency_window, config.idempotency_max_keys) }, None),
            Some(connected) => {
                let (registry, attached) = connected.attach(hub.clone(), presence.clone(), webhooks.clone(), pusher.is_some()).await?;
                (registry, Some(attached))
            }
        };

        let shutdown = Arc::new(Shutdown::new());
        let limits = admission::Limits {
            max_connections: config.max_connections,
            connect_rate: config.max_connect_rate,
            per_address: config.max_connections_per_ip,
        };
        let admission = Arc::new(Admission::new(limits));
        let auth = Arc::new(ArcSwap::from_pointee(credentials.auth));
        let api_keys = Arc::new(ArcSwap::from_pointee(credentials.api_keys));
        let registry = Arc::new(registry);
        let message_ids = Arc::new(MessageIds::new(node));
        let bytes_in_flight = Arc::new(tokio::sync::Semaphore::new(config.max_publish_bytes_in_flight.div_ceil(1024)));
        let clients = Arc::new(Clients {
            hub: hub.clone(),
            admission: admission.clone(),
            metrics: metrics.clone(),
            auth: auth.clone(),
            max_message: config.max_client_frame_bytes,
            max_commands_per_second: config.max_commands_per_second,
            max_topic_changes_per_minute: config.max_topic_changes_per_minute,
            refresh_grace_ms: config.token_refresh_grace.as_millis() as u64,
            publishing: Publishing {
                registry: registry.clone(),
                message_ids: message_ids.clone(),
                max_message_bytes: config.max_message_bytes,
                node_queue_max_bytes: config.node_queue_max_bytes,
                max_per_second: config.max_client_publishes_per_second,
                bytes_in_flight: bytes_in_flight.clone(),
            },
            presence: presence.clone(),
            hooks,
            webhooks: webhooks.clone(),
            pusher: pusher.clone(),
        });
        let inboxes = client::driver::start(&cores, &clients).map_err(io_error("cannot start the connection drivers".into()))?;
        let router = Arc::new(Router {
            cores: cores.clone(),
            gateway: Gateway {
                admission: admission.clone(),
                history: registry.history(),
                clients,
                session_ids: SessionIds::new(node),
                metrics: metrics.clone(),
                allowed_origins: config.allowed_origins.clone(),
                inboxes,
                presence_info_bytes: config.presence_info_bytes,
                pusher_activity_timeout: crate::pusher::activity_timeout(config.idle_timeout),
            },
            api: Arc::new(Api {
                registry,
                hub: hub.clone(),
                message_ids,
                presence: presence.clone(),
                metrics: metrics.clone(),
                api_keys: api_keys.clone(),
                max_message_bytes: config.max_message_bytes,
                max_batch: config.max_batch,
                max_push_uids: config.max_push_uids,
                max_batch_bytes: config.max_batch_bytes.min(config.max_publish_bytes_in_flight),
                node_queue_max_bytes: config.node_queue_max_bytes,
                request_timeout: config.handshake_timeout,
                bodies: bytes_in_flight,
                shutdown: shutdown.clone(),
                demo: config.demo,
                pusher: pusher.clone(),
            }),
            api_connections: Arc::new(tokio::sync::Semaphore::new(config.max_api_connections)),
            handshakes: Arc::new(tokio::sync::Semaphore::new(config.max_handshakes)),
            tls: tls.clone(),
            handshake_timeout: config.handshake_timeout,
            metrics: metrics.clone(),
        });
        let metrics_handle = metrics.clone();
        let admin = admin::Admin {
            hub: hub.clone(),
            metrics,
            shutdown: shutdown.clone(),
            runtime: tokio::runtime::Handle::current(),
            cores: cores.clone(),
            token: config.admin_token.clone(),
            profiler: profiler(&config).map_err(io_error("cannot start the CPU profiler".into()))?,
        };
        let admin = admin::start(admin_listener, admin).map_err(io_error("cannot start the admin listener".into()))?;

        let sweeper = CancellationToken::new();
        let timers = Timers {
            idle_timeout: config.idle_timeout,
            ping_interval: config.ping_interval,
            sse_keepalive: config.sse_keepalive,
            slow_consumer_timeout: config.slow_consumer_timeout,
            refresh_grace: config.token_refresh_grace,
            // At most half the idle timeout: below 2 s the whole seconds clients are told
            // round up to all of it.
            pusher_activity: match pusher.is_some() {
                true => Duration::from_secs(crate::pusher::activity_timeout(config.idle_timeout).into()).min(config.idle_timeout / 2),
                false => Duration::ZERO,
            },
        };
        tokio::spawn(sweep::run(hub.clone(), timers, sweeper.clone()));
        if let Some(presence) = presence {
            tokio::spawn(presence.tell(hub.clone(), sweeper.clone()));
        }
        tokio::spawn(expire_history(history, hub.clone(), config.history_ttl, sweeper.clone()));
        let accepting = accepting_core.spawn(listener::accept_loop(client, router, shutdown.token()));
        let webhooks = (!webhook_senders.is_empty()).then(|| {
            let stop = CancellationToken::new();
            let mut sending = tokio::task::JoinSet::new();
            for (outlet, sender) in webhook_senders {
                sending.spawn(outlet.send(sender, stop.clone(), config.shutdown_grace));
            }
            (sending, stop)
        });

        let evicted = attached.as_ref().map_or_else(CancellationToken::new, Attached::evicted);
        tracing::info!(config = %serde_json::to_string(&config).unwrap_or_default(), "effective configuration");
        tracing::info!("node {node} listening client={client_addr} admin={admin_addr}");
        Ok(Server {
            client_addr,
            admin_addr,
            grace: config.shutdown_grace,
            shutdown,
            admission,
            hub,
            accepting,
            registry: attached,
            evicted,
            auth,
            api_keys,
            tls,
            metrics: metrics_handle,
            sweeper,
            webhooks,
            admin,
            cores,
        })
    }

    pub fn client_addr(&self) -> SocketAddr {
        self.client_addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Reads the credentials again (SIGHUP): client token keys and secrets, the public
    /// topics, the API keys. Open connections keep going; new tokens and publishes are
    /// checked with the new ones. A config that does not load leaves the old ones in place.
    pub fn reload(&self, config: &Config) -> Result<(), Error> {
        config.validate()?;
        let credentials = Credentials::load(config)?;
        self.auth.store(Arc::new(credentials.auth));
        self.api_keys.store(Arc::new(credentials.api_keys));
        tracing::info!("reloaded client token keys, public topics and API keys");
        if let Some(tls) = &self.tls {
            Site::Tls.scope(|| tls.reload())?;
            self.metrics.tls_not_after.store(tls.not_after(), std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }

    /// Resolves if the node must stop on its own: another process holds its node id.
    pub async fn evicted(&self) {
        self.evicted.cancelled().await
    }

    /// Runs the graceful shutdown, phase by phase, each bounded by the grace period.
    pub async fn shutdown(self) {
        let grace = self.grace;

        self.admission.stop_accepting();
        self.shutdown.enter(Phase::Draining);
        let _ = self.accepting.await;
        if !self.shutdown.publishes_done(grace).await {
            tracing::warn!("publishes still running after {grace:?}; closing clients anyway");
        }

        self.shutdown.enter(Phase::Closing);
        self.hub.close_all(CloseReason::Shutdown);
        let left = self.admission.released(grace).await;
        if left > 0 {
            tracing::warn!(connections = left, "connections still open after {grace:?}");
        }

        if let Some(attached) = self.registry {
            self.shutdown.enter(Phase::Leaving);
            attached.leave(grace).await;
        }

        if let Some((sending, stop)) = self.webhooks {
            // The last events (the topics this node's clients left) are queued by now.
            stop.cancel();
            sending.join_all().await;
        }

        self.shutdown.enter(Phase::Stopped);
        self.sweeper.cancel();
        self.admin.stop(grace).await;
        self.cores.stop(grace).await;
        tracing::info!("shutdown complete");
    }
}
