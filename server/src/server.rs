//! Starting and stopping a node: binds both listeners, wires the parts together, and
//! runs the one graceful shutdown sequence.
//!
//! Shutdown, in order: stop accepting (readyz turns 503), let in-flight publishes finish,
//! then close every client with 1001 after it has been sent what was queued for it, then
//! (on Redis) remove this node's sessions and liveness key; each step bounded by
//! `shutdown_grace`.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::alloc::sites::Site;
use crate::config::Config;
use crate::gateway::auth::Auth;
use crate::hub::Hub;
use crate::registry::{self, Registry};
use crate::telemetry::{CloseReason, Metrics};
use crate::{admin, conn, listener};

/// What the client-facing parts of a node share.
pub struct Shared {
    pub hub: Arc<Hub>,
    pub metrics: Arc<Metrics>,
    pub auth: Auth,
    pub api_key: Option<String>,
    pub registry: Registry,
    /// Fires when shutdown begins: API connections finish their request and close.
    pub stopping: CancellationToken,
    /// Publishes under way, so shutdown can wait for them.
    pub in_flight: TaskTracker,
}

/// A running node.
pub struct Server {
    client_addr: SocketAddr,
    admin_addr: SocketAddr,
    stop: CancellationToken,
    lifecycle: JoinHandle<()>,
}

impl Server {
    /// Binds, starts serving, and returns once both listeners are open.
    pub async fn start(config: Config) -> Result<Server, String> {
        config.validate()?;
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
            .map_err(|e| format!("cannot listen on {} (--listen): {e}", config.listen))?;
        let admin_listener = std::net::TcpListener::bind(config.admin_listen)
            .map_err(|e| format!("cannot listen on {} (--admin-listen): {e}", config.admin_listen))?;
        let client_addr = client.local_addr().map_err(|e| e.to_string())?;
        let admin_addr = admin_listener.local_addr().map_err(|e| e.to_string())?;
        let client = tokio::net::TcpListener::from_std(client).map_err(|e| e.to_string())?;

        let metrics = Arc::new(Site::Metrics.scope(Metrics::new));
        let connected = registry::connect(&config, metrics.clone()).await?;
        let node = connected.as_ref().map_or(config.node_id.unwrap_or(0), |c| c.node);
        let changes = connected.as_ref().map(|c| c.changes());
        let hub = Arc::new(Site::Sessions.scope(|| Hub::new(config.clone(), node, metrics.clone(), changes)));
        let (registry, attached) = match connected {
            None => (Registry::Memory, None),
            Some(connected) => {
                let (registry, attached) = connected.attach(hub.clone()).await?;
                (registry, Some(attached))
            }
        };
        let stop = CancellationToken::new();
        let shared = Arc::new(Shared {
            hub: hub.clone(),
            metrics: metrics.clone(),
            auth: Auth::new(config.jwt_secret.as_deref()),
            api_key: config.api_key.clone(),
            registry,
            stopping: stop.child_token(),
            in_flight: TaskTracker::new(),
        });
        let admin_stop = CancellationToken::new();
        let admin = admin::Admin { hub: hub.clone(), metrics, runtime: tokio::runtime::Handle::current() };
        let admin_thread = admin::start(admin_listener, admin, admin_stop.clone())
            .map_err(|e| format!("cannot start the admin listener: {e}"))?;

        let sweeper_stop = CancellationToken::new();
        tokio::spawn(conn::sweep::run(hub.clone(), sweeper_stop.clone()));
        let accept_loop = listener::accept_loop(client, shared.clone(), shared.stopping.clone());
        // Sockets are registered with the runtime as they are accepted: connection memory.
        let accepting = tokio::spawn(Site::ConnectionTask.instrument(accept_loop));

        tracing::info!(config = %serde_json::to_string(&config).unwrap_or_default(), "effective configuration");
        tracing::info!("node {node} listening client={client_addr} admin={admin_addr}");

        let lifecycle = {
            let (shared, stop, grace) = (shared.clone(), stop.clone(), config.shutdown_grace);
            tokio::spawn(async move {
                stop.cancelled().await;
                tracing::info!("shutting down: no new connections");
                shared.hub.stop_accepting();
                let _ = accepting.await;
                shared.in_flight.close();
                if tokio::time::timeout(grace, shared.in_flight.wait()).await.is_err() {
                    tracing::warn!("publishes still running after {grace:?}; closing clients anyway");
                }
                let left = shared.hub.close_all(CloseReason::Shutdown, grace).await;
                if left > 0 {
                    tracing::warn!(connections = left, "connections still open after {grace:?}");
                }
                if let Some(attached) = attached {
                    attached.leave(grace).await;
                }
                sweeper_stop.cancel();
                admin_stop.cancel();
                let _ = tokio::task::spawn_blocking(move || admin_thread.join()).await;
                tracing::info!("shutdown complete");
            })
        };
        Ok(Server { client_addr, admin_addr, stop, lifecycle })
    }

    pub fn client_addr(&self) -> SocketAddr {
        self.client_addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Runs the graceful shutdown and waits for it to finish.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.lifecycle.await;
    }
}
