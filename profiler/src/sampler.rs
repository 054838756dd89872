//! The profiler's own thread: finds the process's threads (`/proc/self/task`), gives each
//! a timer on its own CPU clock that sends it `SIGPROF` every period of CPU it uses, and
//! drains what the handler ([`crate::signal`]) recorded into the table.
//!
//! Why this mechanism: a timer on a thread's CPU clock fires only while that thread runs,
//! in proportion to the CPU it uses, so no thread is favoured (a process-wide
//! `ITIMER_PROF` is, golang/go#35057) and an idle thread costs nothing. It needs no
//! privilege (`perf_event_open` needs `perf_event_paranoid` <= 1 or CAP_PERFMON), and
//! the timers are made from here for every thread, so threads started later, by the
//! server or by a library, are sampled from the next pass on.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::signal::RING;
use crate::table::Count;
use crate::Shared;

/// How often the ring is drained and the thread list read.
const PASS: Duration = Duration::from_millis(100);

/// Passes in which a thread's name is read again after the thread is found: a new thread
/// names itself once running, at once; reading every thread's name on every pass would be
/// a file opened per thread ten times a second (thousands a second over the 60 processes
/// of `pushline-bench scale`).
const NAMING_PASSES: u8 = 3;

/// A thread's CPU-time timer, and the thread's name as last read.
struct Timer {
    id: libc::timer_t,
    name_id: u64,
    name: String,
    /// Passes since the thread was found, up to [`NAMING_PASSES`].
    passes: u8,
}

/// The CPU clock of thread `tid` of this process (Linux: `MAKE_THREAD_CPUCLOCK`).
fn thread_cpu_clock(tid: i32) -> libc::clockid_t {
    ((!(tid as u32)) << 3 | 6) as libc::clockid_t
}

/// Every `1/hz` of CPU; `hz` 0 disarms.
fn interval(hz: u32) -> libc::itimerspec {
    let ns = if hz == 0 { 0 } else { 1_000_000_000 / hz as i64 };
    let spec = libc::timespec { tv_sec: ns / 1_000_000_000, tv_nsec: ns % 1_000_000_000 };
    libc::itimerspec { it_interval: spec, it_value: spec }
}

impl Timer {
    fn create(tid: i32, hz: u32, name_id: u64, name: String) -> Option<Timer> {
        // SAFETY: a zeroed sigevent filled in as SIGEV_THREAD_ID asks; `id` is written by
        // the kernel on success.
        unsafe {
            let mut event: libc::sigevent = std::mem::zeroed();
            event.sigev_notify = libc::SIGEV_THREAD_ID;
            event.sigev_signo = libc::SIGPROF;
            event.sigev_notify_thread_id = tid;
            let mut id: libc::timer_t = std::ptr::null_mut();
            if libc::timer_create(thread_cpu_clock(tid), &mut event, &mut id) != 0 {
                return None;
            }
            let timer = Timer { id, name_id, name, passes: 0 };
            timer.set(hz);
            Some(timer)
        }
    }

    fn set(&self, hz: u32) {
        // SAFETY: our timer, a valid itimerspec.
        unsafe { libc::timer_settime(self.id, 0, &interval(hz), std::ptr::null_mut()) };
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        // SAFETY: our timer, deleted once.
        unsafe { libc::timer_delete(self.id) };
    }
}

/// Thread ids of this process.
fn threads() -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else { return Vec::new() };
    dir.filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok()).collect()
}

/// The name of thread `tid` of this process.
fn thread_name(tid: i32) -> String {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).unwrap_or_default().trim_end().to_owned()
}

pub fn run(shared: Arc<Shared>) {
    let own = unsafe { libc::syscall(libc::SYS_gettid) } as i32;
    let mut timers: HashMap<i32, Timer> = HashMap::new();
    let mut hz_set = 0;
    let mut stack = Vec::with_capacity(crate::signal::MAX_DEPTH + 1);
    while !shared.stopping.load(Ordering::Acquire) {
        // First what was recorded since the last pass, while the timers (and names) of
        // the threads that recorded it are still known, even if they have just ended.
        let period_ns = 1_000_000_000 / hz_set.max(1) as u64;
        let minute = crate::unix_minute();
        {
            let mut table = shared.lock_table();
            let mut burst = shared.lock_burst();
            RING.drain(|body| {
                let Some(timer) = timers.get(&body.tid) else {
                    shared.stats.unknown_thread.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                stack.clear();
                stack.push(timer.name_id);
                stack.extend_from_slice(&body.frames[..body.depth as usize]);
                let id = table.intern(&stack);
                let weight = body.weight as u64;
                let count = Count { samples: weight, cpu_ns: weight * period_ns };
                table.count(minute, id, count);
                if let Some(burst) = burst.as_mut() {
                    let entry = burst.entry(table.stack(id)).or_default();
                    entry.samples += weight;
                    entry.cpu_ns += weight * period_ns;
                }
            });
        }
        // Then the threads: ended ones lose their timer, new ones get one, and a name set
        // just after a thread was found (a new thread names itself once running) is taken
        // in its first passes.
        let hz = shared.hz();
        let live = threads();
        timers.retain(|tid, _| live.contains(tid));
        {
            let mut table = shared.lock_table();
            for &tid in live.iter().filter(|tid| **tid != own) {
                match timers.get_mut(&tid) {
                    Some(timer) if timer.passes < NAMING_PASSES => {
                        timer.passes += 1;
                        let name = thread_name(tid);
                        if timer.name != name {
                            timer.name_id = table.thread_id(&name);
                            timer.name = name;
                        }
                    }
                    Some(_) => {}
                    None => {
                        // A thread that ended since the list was read gets none; one
                        // whose timer could not be made is tried again on the next pass.
                        let name = thread_name(tid);
                        if let Some(timer) = Timer::create(tid, hz_set.max(hz), table.thread_id(&name), name) {
                            timers.insert(tid, timer);
                        }
                    }
                }
            }
        }
        if hz != hz_set {
            for timer in timers.values() {
                timer.set(hz);
            }
            hz_set = hz;
        }
        std::thread::sleep(PASS);
    }
}
