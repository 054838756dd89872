//! The threads client connections live on: one single-threaded runtime per core, each
//! given accepted connections in turn. A connection's reads, writes and timers all run on
//! its own thread, so a ping is read and answered without another thread being woken to
//! steal work (tokio's multi-threaded scheduler wakes a second worker whenever one epoll
//! pass readies more than one task: about one futex wake per six heartbeats here, see
//! flamegraphs/README.md). The first core also accepts (see `Server::start`). What is not
//! a connection (the sweeper, Redis, the admin listener) stays on the runtimes it was
//! started on.

use std::cell::Cell;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::Duration;

use pushline_alloc::Site;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

thread_local! {
    /// Which core runtime this thread runs, if it is one: its `Cores`' id and its index.
    static CORE: Cell<Option<(usize, usize)>> = const { Cell::new(None) };
}

/// Tells apart the `Cores` of servers run in one process (tests).
static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

/// Task counts over every runtime serving clients, for metrics and the admin.
#[derive(Debug, Clone, Copy, Default)]
pub struct RuntimeCounts {
    pub workers: usize,
    pub alive_tasks: usize,
    pub queued_tasks: usize,
}

pub struct Cores {
    id: usize,
    handles: Vec<Handle>,
    next: AtomicUsize,
    stop: CancellationToken,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Cores {
    /// Starts `count` threads, each running a runtime of its own (0: one per core).
    pub fn start(count: usize) -> io::Result<Cores> {
        let count = if count == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { count };
        let stop = CancellationToken::new();
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let mut handles = Vec::with_capacity(count);
        let mut threads = Vec::with_capacity(count);
        for core in 0..count {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            handles.push(runtime.handle().clone());
            let stopping = stop.clone();
            threads.push(std::thread::Builder::new().name(format!("pushline-core-{core}")).spawn(move || {
                CORE.with(|c| c.set(Some((id, core))));
                pushline_alloc::allocator::thread_caches::start();
                let _site = Site::ConnectionTask.enter();
                runtime.block_on(stopping.cancelled());
                runtime.shutdown_timeout(Duration::from_millis(100));
                pushline_alloc::allocator::thread_caches::stop();
            })?);
        }
        Ok(Cores { id, handles, next: AtomicUsize::new(0), stop, threads: Mutex::new(threads) })
    }

    /// The core the next connection goes to, in turn.
    pub fn next(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len()
    }

    /// The runtime of `core`.
    pub fn handle(&self, core: usize) -> &Handle {
        &self.handles[core]
    }

    /// Every core's runtime, in order.
    pub fn handles(&self) -> impl Iterator<Item = &Handle> {
        self.handles.iter()
    }

    /// The index of the core whose thread calls this, if it is one of these.
    pub fn current(&self) -> Option<usize> {
        CORE.with(Cell::get).filter(|(id, _)| *id == self.id).map(|(_, core)| core)
    }

    /// Every core's runtime but the calling thread's, for work split across cores.
    pub fn others(&self) -> impl Iterator<Item = &Handle> {
        let mine = self.current();
        self.handles.iter().enumerate().filter(move |(i, _)| Some(*i) != mine).map(|(_, h)| h)
    }

    /// The core runtimes' counts added to `also`'s (the main runtime: Redis, the sweeper).
    pub fn counts(&self, also: &Handle) -> RuntimeCounts {
        self.handles.iter().chain([also]).map(Handle::metrics).fold(RuntimeCounts::default(), |sum, m| RuntimeCounts {
            workers: sum.workers + m.num_workers(),
            alive_tasks: sum.alive_tasks + m.num_alive_tasks(),
            queued_tasks: sum.queued_tasks + m.global_queue_depth(),
        })
    }

    /// Ends every core's runtime (its connections are closed by then) and waits for the
    /// threads, at most `grace`.
    pub async fn stop(&self, grace: Duration) {
        self.stop.cancel();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        let joined = tokio::task::spawn_blocking(move || threads.into_iter().for_each(|t| drop(t.join())));
        if tokio::time::timeout(grace, joined).await.is_err() {
            tracing::warn!("the core runtimes did not stop within {grace:?}; leaving them");
        }
    }
}

impl Drop for Cores {
    /// A server that failed to start still ends its core threads.
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
