//! Exponential backoff with full jitter, for throttling, transient errors and sink failures.
//!
//! Full jitter (a uniformly random wait between zero and the current cap) keeps replicas and
//! shards that failed together from retrying together, which is what a throttled Kinesis shard
//! or a struggling queue needs.

use std::time::Duration;

/// The waits of one retry sequence; [`Backoff::reset`] after a success.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    /// Failures since the last success; the cap doubles with each, up to `max`.
    failures: u32,
}

impl Backoff {
    /// A sequence whose first cap is `initial`, doubling up to `max`.
    pub(crate) fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max: max.max(initial),
            failures: 0,
        }
    }

    /// Returns the wait before the next attempt and raises the cap for the one after.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let cap = self.cap();
        self.failures = self.failures.saturating_add(1);
        let millis = u64::try_from(cap.as_millis()).unwrap_or(u64::MAX);
        // At least 1 ms, so a retry loop never spins without yielding.
        Duration::from_millis(fastrand::u64(1..=millis.max(1)))
    }

    /// Forgets earlier failures: the next wait is capped by `initial` again.
    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }

    fn cap(&self) -> Duration {
        // 2^20 times any sensible initial wait is far beyond any sensible maximum.
        let factor = 1u32 << self.failures.min(20);
        self.initial.saturating_mul(factor).min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_stay_under_a_cap_that_doubles_up_to_the_maximum() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(1_000));
        for cap in [100, 200, 400, 800, 1_000, 1_000, 1_000] {
            let delay = backoff.next_delay();
            assert!(
                delay >= Duration::from_millis(1) && delay <= Duration::from_millis(cap),
                "{delay:?} exceeds the cap of {cap} ms"
            );
        }
    }

    #[test]
    fn reset_starts_again_from_the_initial_cap() {
        let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_secs(60));
        for _ in 0..30 {
            backoff.next_delay();
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(10));
    }

    #[test]
    fn many_failures_neither_overflow_nor_exceed_the_maximum() {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(5));
        for _ in 0..1_000 {
            assert!(backoff.next_delay() <= Duration::from_secs(5));
        }
    }
}
