//! USDT (SystemTap SDT) probes, provider `pushline`: a `nop` in the code and a note in
//! the ELF file, free until bpftrace (or perf, or SystemTap) attaches. `probes/*.bt` use
//! them. Every argument is a 64-bit integer.
//!
//! | probe | arguments |
//! |---|---|
//! | `conn_open` | session id, fd, transport (0 ws, 1 sse) |
//! | `conn_close` | session id, reason (`CloseReason` as u8), age in ms |
//! | `msg_enqueue` | session id, bytes, queue depth after |
//! | `msg_write` | session id, bytes, ns from publish accepted to written |
//! | `msg_drop` | reason (`DropReason` as u8), messages |
//! | `heartbeat` | session id, kind (0 JSON ping, 1 WebSocket ping, 2 WebSocket pong) |
//! | `alloc` | site (`pushline_alloc::Site` as u8), bytes; fired by `pushline-alloc` |
//! | `redis_start` | command (`RedisCommand` as u8), commands in the batch |
//! | `redis_end` | command, ns since start, 1 ok / 0 failed |
//! | `tls_handshake` | ns the handshake took, 1 resumed / 0 full |

#[inline(always)]
pub fn conn_open(session: u64, fd: i32, transport: u8) {
    probe::probe!(pushline, conn_open, session, fd as i64, transport as u64);
}

#[inline(always)]
pub fn conn_close(session: u64, reason: u8, age_ms: u64) {
    probe::probe!(pushline, conn_close, session, reason as u64, age_ms);
}

#[inline(always)]
pub fn msg_enqueue(session: u64, bytes: usize, depth: usize) {
    probe::probe!(pushline, msg_enqueue, session, bytes as u64, depth as u64);
}

#[inline(always)]
pub fn msg_write(session: u64, bytes: usize, latency_ns: u64) {
    probe::probe!(pushline, msg_write, session, bytes as u64, latency_ns);
}

#[inline(always)]
pub fn msg_drop(reason: u8, messages: usize) {
    probe::probe!(pushline, msg_drop, reason as u64, messages as u64);
}

#[inline(always)]
pub fn heartbeat(session: u64, kind: u8) {
    probe::probe!(pushline, heartbeat, session, kind as u64);
}

#[inline(always)]
pub fn redis_start(command: u8, batch: usize) {
    probe::probe!(pushline, redis_start, command as u64, batch as u64);
}

#[inline(always)]
pub fn redis_end(command: u8, ns: u64, ok: bool) {
    probe::probe!(pushline, redis_end, command as u64, ns, ok as u64);
}

#[inline(always)]
pub fn tls_handshake(ns: u64, resumed: bool) {
    probe::probe!(pushline, tls_handshake, ns, resumed as u64);
}
