//! What the benchmarks share: CPU time of the measuring thread (and of the whole process, for
//! multi-threaded runs), so a shared machine skews ratios little.
#![allow(dead_code)]

use std::time::{Duration, Instant};

/// Field `i` of this thread's `/proc/thread-self/schedstat`: 0 is the time on a CPU, 1 the time
/// spent runnable but waiting for one (nanoseconds; zero where it cannot be read).
pub fn schedstat(i: usize) -> Duration {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|t| t.split_whitespace().nth(i)?.parse().ok())
        .map(Duration::from_nanos)
        .unwrap_or_default()
}

/// CPU time this thread has run: the machine may be shared, and one-thread goals are about one
/// core's work.
pub fn cpu() -> Duration {
    schedstat(0)
}

/// CPU time of the whole process (every thread, finished ones included), from
/// `/proc/self/stat` (utime + stime, in clock ticks of 10 ms).
pub fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after_name = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    // Fields 14 and 15 of stat(5); `after_name` starts at field 3.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// (wall, CPU of this thread) of `f`.
pub fn timed(f: impl FnOnce()) -> (Duration, Duration) {
    let (w, c) = (Instant::now(), cpu());
    f();
    (w.elapsed(), cpu() - c)
}
