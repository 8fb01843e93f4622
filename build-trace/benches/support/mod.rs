//! What the benchmarks share: CPU time of the measuring thread, so a shared machine skews
//! ratios little.

use std::time::{Duration, Instant};

/// CPU time this thread has run (`/proc/thread-self/schedstat`): the machine may be shared, and
/// the goal is about one core's work.
pub fn cpu() -> Duration {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .map(Duration::from_nanos)
        .unwrap_or_default()
}

/// (wall, CPU) of `f`.
pub fn timed(f: impl FnOnce()) -> (Duration, Duration) {
    let (w, c) = (Instant::now(), cpu());
    f();
    (w.elapsed(), cpu() - c)
}
