//! Open-loop pacing: the intended send time of every message comes from a
//! fixed schedule (start time and rate), never from when the previous
//! answer arrived, so a slow answer cannot hide the requests it delays
//! (no coordinated omission). Latency is always measured from the
//! intended time.

use std::time::{Duration, Instant};

/// Nanoseconds after the start at which burst `index` is due, for bursts of
/// `burst` messages at `rate` messages per second (exact integer arithmetic:
/// no drift over long runs).
pub fn burst_due_ns(index: u64, burst: u64, rate: u64) -> u64 {
    let ns = u128::from(index) * u128::from(burst) * 1_000_000_000 / u128::from(rate.max(1));
    u64::try_from(ns).unwrap_or(u64::MAX)
}

/// How many bursts of the schedule are due in `[from_ns, to_ns)`.
pub fn bursts_due_in(from_ns: u64, to_ns: u64, burst: u64, rate: u64) -> u64 {
    // First index due at or after t: ceil(t * rate / (burst * 1e9)).
    let first = |t: u64| -> u64 {
        let num = u128::from(t) * u128::from(rate);
        let den = u128::from(burst.max(1)) * 1_000_000_000;
        u64::try_from(num.div_ceil(den)).unwrap_or(u64::MAX)
    };
    first(to_ns).saturating_sub(first(from_ns))
}

/// Makes this thread's sleeps wake close to their deadline (Linux timer
/// slack is 50 µs by default).
pub fn tighten_timer_slack() {
    // SAFETY: prctl(PR_SET_TIMERSLACK) only changes this thread's timer slack.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
    }
}

/// Sleeps until `t`: the kernel sleeps for most of the wait, then the thread
/// yields until the deadline (a spin would starve the cluster of CPU on a
/// small machine; a plain sleep overshoots by tens of microseconds).
pub fn sleep_until(t: Instant) {
    const SPIN: Duration = Duration::from_micros(60);
    loop {
        let now = Instant::now();
        if now >= t {
            return;
        }
        let left = t - now;
        if left > SPIN {
            std::thread::sleep(left - SPIN);
        } else {
            std::thread::yield_now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_is_exact_and_evenly_spaced() {
        // 1k msg/s in bursts of 20: a burst every 20 ms.
        assert_eq!(burst_due_ns(0, 20, 1000), 0);
        assert_eq!(burst_due_ns(1, 20, 1000), 20_000_000);
        assert_eq!(burst_due_ns(50, 20, 1000), 1_000_000_000);
        // 200k msg/s: every 100 µs; no drift after a million bursts.
        assert_eq!(burst_due_ns(1_000_000, 20, 200_000), 100_000_000_000);
        // A rate that does not divide evenly still lands exactly on whole seconds.
        assert_eq!(burst_due_ns(3 * 7, 20, 3 * 7 * 20), 1_000_000_000);
        // Non-decreasing.
        let mut prev = 0;
        for i in 0..10_000 {
            let t = burst_due_ns(i, 20, 333_333);
            assert!(t >= prev);
            prev = t;
        }
    }

    #[test]
    fn counts_bursts_due_in_a_window() {
        // 1k msg/s, bursts of 20: 50 bursts per second.
        assert_eq!(bursts_due_in(0, 1_000_000_000, 20, 1000), 50);
        assert_eq!(bursts_due_in(1_000_000_000, 6_000_000_000, 20, 1000), 250);
        // Boundaries: a burst due exactly at `from` counts, one at `to` does not.
        assert_eq!(bursts_due_in(20_000_000, 40_000_000, 20, 1000), 1);
        assert_eq!(bursts_due_in(20_000_001, 40_000_001, 20, 1000), 1);
        // Agrees with enumerating the schedule.
        let (from, to, rate) = (123_456_789, 987_654_321, 77_777);
        let n = (0..100_000)
            .map(|i| burst_due_ns(i, 20, rate))
            .filter(|t| (from..to).contains(t))
            .count() as u64;
        assert_eq!(bursts_due_in(from, to, 20, rate), n);
    }
}
