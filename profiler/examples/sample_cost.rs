//! What one sample costs: a thread does the same fixed work in rounds, alternately with
//! the profiler sampling it at 999 Hz (a burst) and not sampling it; the extra CPU the
//! thread used, over the samples it took, is the cost of a sample where it lands (the
//! timer's signal, the handler's frame walk); the rest of the process's extra CPU over
//! the same samples is the profiler thread's (draining, interning, counting).
//!
//! `cargo run --release -p pushline-profiler --example sample_cost`

use std::time::Duration;

use pushline_profiler::{Profiler, Settings, DRAINED_WITHIN};

fn cpu(clock: libc::clockid_t) -> Duration {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec to write into.
    unsafe { libc::clock_gettime(clock, &mut now) };
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

#[inline(never)]
fn work(iterations: u64) -> u64 {
    let mut x = 0u64;
    for i in 0..iterations {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(i);
        std::hint::black_box(x);
    }
    x
}

/// (this thread's CPU, the process's CPU) for one round of the work.
fn round(iterations: u64) -> (Duration, Duration) {
    let (thread, process) = (cpu(libc::CLOCK_THREAD_CPUTIME_ID), cpu(libc::CLOCK_PROCESS_CPUTIME_ID));
    std::hint::black_box(work(iterations));
    (cpu(libc::CLOCK_THREAD_CPUTIME_ID) - thread, cpu(libc::CLOCK_PROCESS_CPUTIME_ID) - process)
}

fn main() {
    const ROUNDS: usize = 10;
    const ITERATIONS: u64 = 1_500_000_000;
    let profiler = Profiler::start(Settings { hz: 0, window_minutes: 1, max_frames: 131_072 }).expect("profiler starts");
    // The worker: told when to run a round, says what it used.
    let (go, rounds) = std::sync::mpsc::channel::<()>();
    let (used, results) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("worker".into())
        .spawn(move || {
            while rounds.recv().is_ok() {
                used.send(round(ITERATIONS)).unwrap();
            }
        })
        .unwrap();
    // Let the profiler find the worker.
    std::thread::sleep(Duration::from_millis(300));
    let (mut plain, mut sampled, mut samples) = ((Duration::ZERO, Duration::ZERO), (Duration::ZERO, Duration::ZERO), 0u64);
    for _ in 0..ROUNDS {
        go.send(()).unwrap();
        let (thread, process) = results.recv().unwrap();
        plain = (plain.0 + thread, plain.1 + process);

        let burst = profiler.start_burst(999).expect("no other burst");
        // The burst's rate reaches the worker's timer within the profiler's next pass.
        std::thread::sleep(Duration::from_millis(200));
        go.send(()).unwrap();
        let (thread, process) = results.recv().unwrap();
        std::thread::sleep(DRAINED_WITHIN);
        let (counted, _) = profiler.finish(burst);
        samples += counted.stacks.iter().filter(|(name, _, _)| name == "worker").map(|(_, _, c)| c.samples).sum::<u64>();
        sampled = (sampled.0 + thread, sampled.1 + process);
    }
    let per_sample = |extra: Duration| extra.as_nanos() as f64 / samples.max(1) as f64;
    let on_thread = per_sample(sampled.0.saturating_sub(plain.0));
    let elsewhere = per_sample((sampled.1 - sampled.0).saturating_sub(plain.1 - plain.0));
    println!("rounds {ROUNDS} x2, worker CPU {:?} plain, {:?} sampled, {samples} samples", plain.0, sampled.0);
    println!("cost of a sample on the sampled thread: {on_thread:.0} ns; in the profiler thread: {elsewhere:.0} ns");
    println!("at 19 Hz: {:.4}% of a thread's CPU", 19.0 * (on_thread + elsewhere) / 1e9 * 100.0);
}
