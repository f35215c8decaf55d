//! Rate-limited log lines: a flood of refused calls or failed handshakes must not become a
//! flood of log lines. The limit is governor's GCRA; the count of lines left out is ours.

use std::{
    num::NonZeroU32,
    sync::atomic::{AtomicU64, Ordering},
};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// Allows a burst of lines, then a steady rate, counting what it suppresses.
#[derive(Debug)]
pub(crate) struct Throttle {
    limiter: DefaultDirectRateLimiter,
    suppressed: AtomicU64,
}

impl Throttle {
    /// `per_minute` lines a minute, all of them allowed in a burst.
    pub(crate) fn per_minute(per_minute: u32) -> Self {
        let n = NonZeroU32::new(per_minute.max(1)).expect("at least one");
        Self {
            limiter: RateLimiter::direct(Quota::per_minute(n)),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(lines suppressed since the last allowed one)` when a line may be written now.
    pub(crate) fn allow(&self) -> Option<u64> {
        if self.limiter.check().is_ok() {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_a_burst_then_counts_what_it_suppresses() {
        let throttle = Throttle::per_minute(3);
        assert_eq!(throttle.allow(), Some(0));
        assert_eq!(throttle.allow(), Some(0));
        assert_eq!(throttle.allow(), Some(0));
        assert_eq!(throttle.allow(), None);
        assert_eq!(throttle.allow(), None);
        assert_eq!(throttle.suppressed.load(Ordering::Relaxed), 2);
    }
}
