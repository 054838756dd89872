//! The profiler counts what a thread really spent: a thread that burns a known amount of
//! CPU in a known function gets the samples its CPU time is worth, at the always-on rate
//! and in a burst, and the samples land in that function.

use std::time::Duration;

use pushline_profiler::{unix_minute, Profiler, Settings};

/// This thread's CPU time.
fn thread_cpu() -> Duration {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

/// Spins until this thread has used `cpu` of CPU time.
#[inline(never)]
fn burn(cpu: Duration) -> u64 {
    let until = thread_cpu() + cpu;
    let mut x = 0u64;
    while thread_cpu() < until {
        for i in 0..1000 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(i);
        }
    }
    x
}

/// A thread named `name` that burns `cpu`, once the profiler has found it and set its
/// timer (it looks for threads, and applies a burst's rate, every 100 ms).
fn burner(name: &str, cpu: Duration) {
    let handle = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            std::hint::black_box(burn(cpu))
        })
        .unwrap();
    handle.join().unwrap();
}

/// Samples of thread `name` in `samples`, and how many of them are in `burn`.
fn of(samples: &pushline_profiler::table::Samples, name: &str) -> (u64, u64) {
    let start = burn as *const () as usize as u64;
    let (mut all, mut in_burn) = (0, 0);
    for (thread, frames, count) in &samples.stacks {
        if thread == name {
            all += count.samples;
            // The leaf, or a caller a few calls up (thread_cpu and what it calls, from the
            // loop). A sample in a function's first instructions, before it set up its
            // frame, misses its caller: those few are allowed for.
            if frames.iter().take(8).any(|f| (start..start + 4096).contains(f)) {
                in_burn += count.samples;
            }
        }
    }
    (all, in_burn)
}

#[test]
fn a_thread_gets_the_samples_its_cpu_is_worth() {
    let profiler = Profiler::start(Settings { hz: 19, window_minutes: 5, max_frames: 1 << 16 }).unwrap();
    let before = unix_minute();
    burner("burn-19hz", Duration::from_secs(2));
    // The sampler drains every 100 ms.
    std::thread::sleep(Duration::from_millis(300));
    let samples = profiler.window(before, unix_minute());
    let (all, in_burn) = of(&samples, "burn-19hz");
    assert!((32..=44).contains(&all), "2 s of CPU at 19 Hz: {all} samples (38 +- 6)");
    assert!(in_burn * 10 >= all * 8, "{in_burn} of {all} samples in burn()");

    let burst = profiler.start_burst(99).unwrap();
    assert!(profiler.start_burst(99).is_none(), "one burst at a time");
    burner("burn-99hz", Duration::from_secs(2));
    std::thread::sleep(pushline_profiler::DRAINED_WITHIN);
    let (samples, _) = profiler.finish(burst);
    let (all, in_burn) = of(&samples, "burn-99hz");
    assert!((178..=218).contains(&all), "2 s of CPU at 99 Hz: {all} samples (198 +- 20)");
    assert!(in_burn * 10 >= all * 8, "{in_burn} of {all} samples in burn()");
    let stats = profiler.stats();
    assert_eq!(stats.dropped_ring_full, 0);
}
