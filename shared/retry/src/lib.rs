//! One retry policy for every service: exponential backoff with jitter.
//!
//! The delays come from backon's exponential backoff; what is ours is the shape every caller
//! shares. A sequence starts at `initial` and doubles up to `max`; each wait is drawn between
//! half and all of its step, so replicas, shards and lanes that failed together do not retry
//! together, and no wait exceeds `max`. A caller keeps one [`Backoff`] per retry sequence and
//! [`Backoff::reset`]s it after a success.
//!
//! Used by the catalog's conflicting writes, the SQS client's failed batch entries, the
//! relay's catalog and queue retries, and the Kinesis readers.

use std::time::Duration;

use backon::{BackoffBuilder as _, ExponentialBackoff, ExponentialBuilder};

/// The waits of one retry sequence.
#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    delays: ExponentialBackoff,
}

impl Backoff {
    /// A sequence whose first wait is at most `initial`, each step doubling up to `max`.
    /// A zero `initial` is taken as 1 ms, so a retry loop never spins without yielding.
    pub fn new(initial: Duration, max: Duration) -> Self {
        let initial = initial.max(Duration::from_millis(1));
        let max = max.max(initial);
        // backon adds a random share of the step on top of it (up to twice the step): from
        // half steps, every wait lands between half and all of the step, never above `max`.
        let builder = ExponentialBuilder::default()
            .with_min_delay(initial / 2)
            .with_max_delay(max / 2)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times();
        Self {
            builder,
            delays: builder.build(),
        }
    }

    /// The wait before the next attempt; the step doubles for the one after.
    pub fn next_delay(&mut self) -> Duration {
        // Without a maximum number of attempts the sequence never ends; the fallback is the
        // first step, in case it ever did.
        self.delays
            .next()
            .unwrap_or_else(|| self.builder.build().next().unwrap_or_default())
    }

    /// Forgets earlier failures: the next wait is at most `initial` again.
    pub fn reset(&mut self) {
        self.delays = self.builder.build();
    }

    /// The wait after `failures` failures in a row (1 is the first), without keeping a
    /// sequence: for retries counted elsewhere, such as a queue message's receive count.
    pub fn after(initial: Duration, max: Duration, failures: u32) -> Duration {
        let mut backoff = Self::new(initial, max);
        let mut delay = backoff.next_delay();
        for _ in 1..failures.min(64) {
            delay = backoff.next_delay();
        }
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn waits_double_up_to_the_maximum_and_never_exceed_it() {
        let mut backoff = Backoff::new(100 * MS, 1_000 * MS);
        for step in [100, 200, 400, 800, 1_000, 1_000, 1_000] {
            let delay = backoff.next_delay();
            assert!(
                delay >= step * MS / 2 && delay <= step * MS,
                "{delay:?} is outside half to all of the {step} ms step"
            );
        }
    }

    #[test]
    fn reset_starts_over() {
        let mut backoff = Backoff::new(10 * MS, 10_000 * MS);
        for _ in 0..10 {
            backoff.next_delay();
        }
        backoff.reset();
        assert!(backoff.next_delay() <= 10 * MS);
    }

    #[test]
    fn waits_are_spread_out() {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..50 {
            seen.insert(Backoff::new(1_000 * MS, 1_000 * MS).next_delay());
        }
        assert!(seen.len() > 10, "jitter spreads the first wait: {seen:?}");
    }

    #[test]
    fn after_counts_failures_from_one() {
        assert!(Backoff::after(100 * MS, 10_000 * MS, 1) <= 100 * MS);
        let fifth = Backoff::after(100 * MS, 10_000 * MS, 5);
        assert!(fifth >= 800 * MS && fifth <= 1_600 * MS, "{fifth:?}");
        assert!(Backoff::after(100 * MS, 500 * MS, 1_000) <= 500 * MS);
    }

    #[test]
    fn a_zero_initial_wait_still_yields() {
        assert!(Backoff::new(Duration::ZERO, Duration::ZERO).next_delay() >= MS / 2);
    }
}
