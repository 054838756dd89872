//! Admission: whether a new connection is taken, and what it holds while it lives.
//!
//! - `--max-connections` places: taken at the handshake (a [`Reservation`]), handed over
//!   to the connection, and given back when it ends ([`Admission::release`]), so shutdown
//!   can wait for every connection by waiting for every place;
//! - `--max-connect-rate`: a token bucket over new connections, so a reconnect storm is
//!   let in at a steady rate; refusals tell clients jittered delays, so their retries
//!   spread;
//! - `--max-connections-per-ip`: open connections per source address, counted in a
//!   table whose entry id the connection carries (`Conn::address`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::error::{Error, Kind};

/// The address id of a connection whose address is not counted.
pub const UNCOUNTED: u32 = u32::MAX;

pub struct Limits {
    pub max_connections: usize,
    /// New connections per second; 0: no limit.
    pub connect_rate: u32,
    /// Open connections per source address; 0: no limit.
    pub per_address: u32,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

#[derive(Default)]
struct Addresses {
    ids: HashMap<IpAddr, u32>,
    /// (address, open connections) by id.
    entries: Vec<(IpAddr, u32)>,
    free: Vec<u32>,
}

pub struct Admission {
    limits: Limits,
    /// Slots held: registered connections plus handshakes under way.
    held: AtomicUsize,
    accepting: AtomicBool,
    all_released: Notify,
    bucket: Mutex<Bucket>,
    addresses: Mutex<Addresses>,
}

/// A place among `max_connections` a handshake holds; dropped before the connection takes
/// it over, it gives the place back.
struct Slot {
    admission: Arc<Admission>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.admission.release_place();
    }
}

/// What a handshake took: its slot, and its address's count until the connection takes
/// both over ([`Reservation::hand_over`]).
pub struct Reservation {
    slot: Option<Slot>,
    address: u32,
}

impl Reservation {
    /// Hands the place and the address's count to the connection, which gives both back
    /// with [`Admission::release`] when it ends (a connection holds no pointer for them);
    /// returns the address's id.
    pub fn hand_over(mut self) -> u32 {
        if let Some(slot) = self.slot.take() {
            std::mem::forget(slot);
        }
        std::mem::replace(&mut self.address, UNCOUNTED)
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(slot) = &self.slot {
            slot.admission.release_address(self.address);
        }
    }
}

impl Admission {
    pub fn new(limits: Limits) -> Admission {
        let tokens = limits.connect_rate as f64;
        Admission {
            limits,
            held: AtomicUsize::new(0),
            accepting: AtomicBool::new(true),
            all_released: Notify::new(),
            bucket: Mutex::new(Bucket { tokens, at: Instant::now() }),
            addresses: Mutex::new(Addresses::default()),
        }
    }

    /// Takes a place for a new connection from `from`, or says why there is none.
    pub fn reserve(self: &Arc<Self>, from: IpAddr) -> Result<Reservation, Error> {
        if !self.is_accepting() {
            return Err(Error::new(Kind::ShuttingDown, "server is shutting down"));
        }
        self.take_token()?;
        let max = self.limits.max_connections;
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .map_err(|_| Error::new(Kind::AtCapacity, format!("server is at max_connections ({max})")))?;
        let slot = Slot { admission: self.clone() };
        let address = self.count_address(from)?;
        Ok(Reservation { slot: Some(slot), address })
    }

    fn take_token(&self) -> Result<(), Error> {
        let rate = self.limits.connect_rate as f64;
        if rate == 0.0 {
            return Ok(());
        }
        let mut bucket = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        bucket.tokens = (bucket.tokens + now.duration_since(bucket.at).as_secs_f64() * rate).min(rate);
        bucket.at = now;
        if bucket.tokens < 1.0 {
            let spread = 1 + (crate::clock::now_ms() ^ (bucket.tokens.to_bits() >> 11)) % 5;
            return Err(Error::new(Kind::RateLimited, format!("new connections are over --max-connect-rate ({rate}/s); retry later"))
                .with_retry_after(spread as u32));
        }
        bucket.tokens -= 1.0;
        Ok(())
    }

    fn count_address(&self, from: IpAddr) -> Result<u32, Error> {
        let max = self.limits.per_address;
        if max == 0 {
            return Ok(UNCOUNTED);
        }
        let mut table = self.addresses.lock().unwrap_or_else(|e| e.into_inner());
        let Addresses { ids, entries, free } = &mut *table;
        let id = match ids.get(&from) {
            Some(id) => *id,
            None => {
                let id = free.pop().unwrap_or(entries.len() as u32);
                if id as usize == entries.len() {
                    entries.push((from, 0));
                } else {
                    entries[id as usize] = (from, 0);
                }
                ids.insert(from, id);
                id
            }
        };
        let open = &mut entries[id as usize].1;
        if *open >= max {
            return Err(Error::new(Kind::TooManyFromAddress, format!("{from} has {max} connections open here, the most allowed")));
        }
        *open += 1;
        Ok(id)
    }

    /// A connection that was handed its place ([`Reservation::hand_over`]) ended: its
    /// place and its address's count (`address`) are given back.
    pub fn release(&self, address: u32) {
        self.release_address(address);
        self.release_place();
    }

    fn release_place(&self) {
        if self.held.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.all_released.notify_waiters();
        }
    }

    fn release_address(&self, id: u32) {
        if id == UNCOUNTED {
            return;
        }
        let mut table = self.addresses.lock().unwrap_or_else(|e| e.into_inner());
        let Addresses { ids, entries, free } = &mut *table;
        let Some((address, open)) = entries.get_mut(id as usize) else { return };
        *open = open.saturating_sub(1);
        if *open == 0 {
            ids.remove(address);
            free.push(id);
        }
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

    const HOME: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    fn admission(max_connections: usize, connect_rate: u32, per_address: u32) -> Arc<Admission> {
        Arc::new(Admission::new(Limits { max_connections, connect_rate, per_address }))
    }

    #[tokio::test]
    async fn slots_are_counted_and_waited_for() {
        let admission = admission(1, 0, 0);
        let reservation = admission.reserve(HOME).ok().unwrap();
        assert_eq!(admission.reserve(HOME).err().unwrap().kind, Kind::AtCapacity);
        let waiting = tokio::spawn({
            let admission = admission.clone();
            async move { admission.released(Duration::from_secs(10)).await }
        });
        tokio::task::yield_now().await;
        drop(reservation);
        assert_eq!(waiting.await.unwrap(), 0);
        admission.stop_accepting();
        assert_eq!(admission.reserve(HOME).err().unwrap().kind, Kind::ShuttingDown);
    }

    #[test]
    fn addresses_are_counted_until_their_connections_end() {
        let admission = admission(100, 0, 2);
        let other: IpAddr = "10.0.0.7".parse().unwrap();
        let (a, b) = (admission.reserve(HOME).ok().unwrap(), admission.reserve(HOME).ok().unwrap());
        assert_eq!(admission.reserve(HOME).err().unwrap().kind, Kind::TooManyFromAddress);
        assert!(admission.reserve(other).is_ok(), "another address has its own count");
        let held = admission.held.load(Ordering::Acquire);
        let address = a.hand_over();
        assert!(admission.reserve(HOME).is_err(), "a handed-over connection still counts");
        assert_eq!(admission.held.load(Ordering::Acquire), held, "and still holds its place");
        admission.release(address);
        assert_eq!(admission.held.load(Ordering::Acquire), held - 1);
        let c = admission.reserve(HOME).ok().unwrap();
        drop((b, c));
        assert!(admission.addresses.lock().unwrap().ids.get(&HOME).is_none(), "no entry once none is open");
    }

    #[test]
    fn the_connect_rate_is_a_bucket_with_jittered_refusals() {
        let admission = admission(100, 3, 0);
        for _ in 0..3 {
            drop(admission.reserve(HOME).ok().unwrap());
        }
        let refused = admission.reserve(HOME).err().unwrap();
        assert_eq!(refused.kind, Kind::RateLimited);
        assert!((1..=5).contains(&refused.retry_after().unwrap()));
    }
}
