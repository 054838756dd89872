//! The one timer for all connections: closes WebSocket connections that have been silent
//! past `idle_timeout` and connections whose queue has stayed full, unread, past
//! `slow_consumer_timeout`, and sends server pings and SSE keep-alives when they are due,
//! and `pusher:ping` to a Pusher client silent for its `activity_timeout`.
//!
//! A timer per connection would cost a timer-wheel entry and a wake-up each; one sweep
//! over the hub costs a few nanoseconds per connection, and nothing between sweeps.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::clock::now_ms;
use crate::hub::Hub;
use crate::telemetry::CloseReason;
use crate::wire::Transport;

/// The deadlines the sweeper keeps; zero turns pings or keep-alives off.
#[derive(Clone, Copy)]
pub struct Timers {
    pub idle_timeout: Duration,
    pub ping_interval: Duration,
    pub sse_keepalive: Duration,
    /// A connection whose queue stays full, unread, this long is closed as a slow consumer.
    pub slow_consumer_timeout: Duration,
    /// A connection whose token expired is closed this long after (4001), unless refreshed.
    pub refresh_grace: Duration,
    /// The `activity_timeout` told to Pusher clients (zero when no app is served): one
    /// silent this long is pinged. pusher-js pings only when it has heard nothing for it,
    /// so a client of a busy channel would never speak, and be closed as idle.
    pub pusher_activity: Duration,
}

impl Timers {
    /// How often to sweep: a quarter of the shortest deadline kept, within 50 ms..30 s.
    fn period(&self) -> Duration {
        let deadlines = [self.idle_timeout, self.ping_interval, self.sse_keepalive, self.slow_consumer_timeout, self.refresh_grace, self.pusher_activity];
        let shortest = deadlines.into_iter().filter(|d| !d.is_zero()).min();
        (shortest.unwrap_or(self.idle_timeout) / 4).clamp(Duration::from_millis(50), Duration::from_secs(30))
    }
}

/// Whether `silent` passed a multiple of `every` since the last sweep: a Pusher client that
/// does not answer is pinged once per `activity_timeout` of silence (until it is closed as
/// idle), not at every sweep.
fn crossed(silent: u64, since_last_sweep: u64, every: u64) -> bool {
    every > 0 && silent >= every && silent / every > silent.saturating_sub(since_last_sweep) / every
}

pub async fn run(hub: Arc<Hub>, timers: Timers, stop: CancellationToken) {
    let idle_ms = timers.idle_timeout.as_millis() as u64;
    let ping_ms = timers.ping_interval.as_millis() as u64;
    let keepalive_ms = timers.sse_keepalive.as_millis() as u64;
    let stuck_ms = timers.slow_consumer_timeout.as_millis() as u64;
    let activity_ms = timers.pusher_activity.as_millis() as u64;
    let mut ticks = tokio::time::interval(timers.period());
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut last_ping, mut last_keepalive, mut last_sweep) = (now_ms(), now_ms(), now_ms());
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let now = now_ms();
        let since_last_sweep = now.saturating_sub(std::mem::replace(&mut last_sweep, now));
        let ping_due = ping_ms > 0 && now - last_ping >= ping_ms;
        let keepalive_due = keepalive_ms > 0 && now - last_keepalive >= keepalive_ms;
        if ping_due {
            last_ping = now;
        }
        if keepalive_due {
            last_keepalive = now;
        }
        let wall_ms = crate::clock::wall_ms();
        let grace_ms = timers.refresh_grace.as_millis() as u64;
        hub.for_each(|conn| {
            if conn.full_since_ms().is_some_and(|since| now.saturating_sub(since) >= stuck_ms) {
                // Whatever the policy: a queue that nobody reads holds the node's budget.
                return conn.request_close(CloseReason::SlowConsumer);
            }
            let (expired, tickets) = match conn.state().grant.as_deref_mut() {
                Some(grant) => {
                    let mut tickets = Vec::new();
                    grant.tickets.retain(|t| {
                        let ended = wall_ms >= t.expires_at * 1000;
                        if ended {
                            tickets.push(t.topic.clone());
                        }
                        !ended
                    });
                    let expired = grant.expired(wall_ms).then(|| (grant.expires_at * 1000, std::mem::replace(&mut grant.expiry_told, true)));
                    (expired, tickets)
                }
                None => (None, Vec::new()),
            };
            if !tickets.is_empty() {
                // What a per-subscription token granted ends with it.
                hub.unsubscribe(conn, &tickets);
                if let Some(grant) = conn.state().grant.as_deref_mut() {
                    grant.revoked.extend(tickets);
                }
                conn.tickets_expired();
            }
            if let Some((expired_ms, told)) = expired {
                if wall_ms >= expired_ms + grace_ms {
                    return conn.request_close(CloseReason::TokenExpired);
                }
                if !told {
                    conn.token_expired();
                }
            }
            match conn.transport {
                Transport::WebSocket | Transport::Pusher => {
                    let silent = conn.silent_ms(now);
                    if silent >= idle_ms {
                        conn.request_close(CloseReason::IdleTimeout);
                    } else if ping_due || (conn.transport == Transport::Pusher && crossed(silent, since_last_sweep, activity_ms)) {
                        conn.ping();
                    }
                }
                Transport::Sse => {
                    if keepalive_due {
                        conn.ping();
                    }
                }
            }
        });
    }
}
