//! Shutdown, in one place: its phases, the signal every part of the server listens to,
//! and the process signals that start it. `Server::shutdown` runs the phases in order.
//!
//! SIGTERM or SIGINT starts a graceful shutdown; a second one exits at once. SIGHUP
//! reloads credentials.

use std::time::Duration;

use strum::IntoStaticStr;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tokio_util::task::task_tracker::TrackedFuture;
use tokio_util::task::TaskTracker;

/// Where a node is in its life. Each phase is bounded by `--shutdown-grace`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub enum Phase {
    Serving,
    /// No new connections or publishes; publishes already accepted finish.
    Draining,
    /// Every client is sent what was queued for it, then a close (1001).
    Closing,
    /// This node's sessions and liveness key are removed from Redis.
    Leaving,
    /// Background tasks and the admin listener are stopped.
    Stopped,
}

pub struct Shutdown {
    phase: watch::Sender<Phase>,
    begun: CancellationToken,
    /// Publishes under way, so draining can wait for them.
    publishes: TaskTracker,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown::new()
    }
}

impl Shutdown {
    pub fn new() -> Shutdown {
        Shutdown { phase: watch::Sender::new(Phase::Serving), begun: CancellationToken::new(), publishes: TaskTracker::new() }
    }

    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    pub fn is_serving(&self) -> bool {
        self.phase() == Phase::Serving
    }

    /// Moves to `phase`; the first move away from serving wakes everyone waiting on
    /// [`Shutdown::begun`].
    pub fn enter(&self, phase: Phase) {
        self.phase.send_replace(phase);
        tracing::info!(phase = <&str>::from(phase), "shutdown");
        self.begun.cancel();
    }

    /// Resolves when shutdown begins.
    pub fn begun(&self) -> WaitForCancellationFuture<'_> {
        self.begun.cancelled()
    }

    /// Resolves once the node has reached `phase`.
    pub async fn reached(&self, phase: Phase) {
        let _ = self.phase.subscribe().wait_for(|now| *now >= phase).await;
    }

    /// A token cancelled when shutdown begins, for tasks that outlive a borrow.
    pub fn token(&self) -> CancellationToken {
        self.begun.clone()
    }

    /// Runs a publish so that draining waits for it.
    pub fn track<F: std::future::Future>(&self, publish: F) -> TrackedFuture<F> {
        self.publishes.track_future(publish)
    }

    /// Waits for the publishes under way, up to `grace`; false if some were still running.
    pub async fn publishes_done(&self, grace: Duration) -> bool {
        self.publishes.close();
        tokio::time::timeout(grace, self.publishes.wait()).await.is_ok()
    }
}

/// What a process signal asks for.
pub enum Asked {
    /// SIGTERM or SIGINT: shut down gracefully.
    Stop,
    /// SIGHUP: read credentials (and certificates) again.
    Reload,
}

/// SIGTERM, SIGINT and SIGHUP, installed before the server listens, so that a signal that
/// arrives once it is listening is handled.
pub struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    pub fn install() -> std::io::Result<Signals> {
        Ok(Signals { term: signal(SignalKind::terminate())?, int: signal(SignalKind::interrupt())?, hup: signal(SignalKind::hangup())? })
    }

    pub async fn next(&mut self) -> Asked {
        tokio::select! {
            _ = self.term.recv() => Asked::Stop,
            _ = self.int.recv() => Asked::Stop,
            _ = self.hup.recv() => Asked::Reload,
        }
    }

    /// From now on, SIGTERM or SIGINT exits the process at once with status 130 (an
    /// operator who asks twice does not want to wait).
    pub fn exit_on_second(mut self) {
        tokio::spawn(async move {
            tokio::select! {
                _ = self.term.recv() => {}
                _ = self.int.recv() => {}
            }
            eprintln!("pushline: second signal; exiting without finishing the shutdown");
            std::process::exit(130);
        });
    }
}
