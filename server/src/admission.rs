//! Admission: the `--max-connections` places and whether new connections are taken at
//! all. A place is a [`Slot`], taken at the handshake and held by the connection's task
//! until it ends, so shutdown can wait for every task by waiting for every slot.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use crate::error::{Error, Kind};

pub struct Admission {
    max: usize,
    /// Slots held: registered connections plus handshakes under way.
    held: AtomicUsize,
    accepting: AtomicBool,
    all_released: Notify,
}

/// A place among `max_connections`, held from the handshake until the connection's task
/// ends. Dropping it gives the place back.
pub struct Slot {
    admission: Arc<Admission>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.admission.held.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.admission.all_released.notify_waiters();
        }
    }
}

impl Admission {
    pub fn new(max_connections: usize) -> Admission {
        Admission { max: max_connections, held: AtomicUsize::new(0), accepting: AtomicBool::new(true), all_released: Notify::new() }
    }

    /// Takes a place for a new connection, or says why there is none.
    pub fn reserve(self: &Arc<Self>) -> Result<Slot, Error> {
        if !self.is_accepting() {
            return Err(Error::new(Kind::ShuttingDown, "server is shutting down"));
        }
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.max).then_some(n + 1))
            .map_err(|_| Error::new(Kind::AtCapacity, format!("server is at max_connections ({})", self.max)))?;
        Ok(Slot { admission: self.clone() })
    }

    pub fn is_accepting(&self) -> bool {
        self.accepting.load(Ordering::Acquire)
    }

    /// Refuses new connections from now on.
    pub fn stop_accepting(&self) {
        self.accepting.store(false, Ordering::Release);
    }

    /// Waits until every slot is given back, or `grace` passes; returns how many are
    /// still held. Call after asking every connection to close.
    pub async fn released(&self, grace: Duration) -> usize {
        let all_released = self.all_released.notified();
        tokio::pin!(all_released);
        all_released.as_mut().enable();
        if self.held.load(Ordering::Acquire) == 0 {
            return 0;
        }
        let _ = tokio::time::timeout(grace, all_released).await;
        self.held.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn slots_are_counted_and_waited_for() {
        let admission = Arc::new(Admission::new(1));
        let slot = admission.reserve().ok().unwrap();
        assert_eq!(admission.reserve().err().unwrap().kind, Kind::AtCapacity);
        let waiting = tokio::spawn({
            let admission = admission.clone();
            async move { admission.released(Duration::from_secs(10)).await }
        });
        tokio::task::yield_now().await;
        drop(slot);
        assert_eq!(waiting.await.unwrap(), 0);
        admission.stop_accepting();
        assert_eq!(admission.reserve().err().unwrap().kind, Kind::ShuttingDown);
    }
}
