//! Where a core's driver hears of its connections: those handed to it by their
//! handshake, and those with work (a [`Signals`](super::Signals) bit set: messages queued,
//! a ping due, a close asked). One per core; producers on any thread.

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use super::Conn;

#[derive(Default)]
pub struct Inbox {
    arrivals: Mutex<Vec<Arc<Conn>>>,
    /// Keys (in the driver's table) of connections signalled since the driver last looked.
    woken: Mutex<Vec<u32>>,
    notify: Notify,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves a consistent list; keep using it.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Inbox {
    /// Hands a connection, its `Io` in place, to the driver.
    pub fn arrive(&self, conn: Arc<Conn>) {
        lock(&self.arrivals).push(conn);
        self.notify.notify_one();
    }

    pub(super) fn wake(&self, key: u32) {
        let mut woken = lock(&self.woken);
        let first = woken.is_empty();
        woken.push(key);
        drop(woken);
        if first {
            self.notify.notify_one();
        }
    }

    /// Connections handed over since the last call, into `into` (empty).
    pub fn take_arrivals(&self, into: &mut Vec<Arc<Conn>>) {
        std::mem::swap(&mut *lock(&self.arrivals), into);
    }

    /// Keys signalled since the last call, into `into` (empty): the two vectors trade
    /// places, so neither is allocated again.
    pub fn take_woken(&self, into: &mut Vec<u32>) {
        std::mem::swap(&mut *lock(&self.woken), into);
    }

    /// Completes once something arrived or woke since the last call (at once if it did
    /// while no one was waiting).
    pub async fn notified(&self) {
        self.notify.notified().await
    }
}
