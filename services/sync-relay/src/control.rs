//! What every part of a replica shares about the relay's state: the pause switch (kept in
//! the database, so every replica and every restart follows it), the last error, and the
//! apply rate.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::store::RelayStore;

/// The shared state of one replica; cheap to clone.
#[derive(Debug, Clone)]
pub struct Control {
    store: RelayStore,
    paused: Arc<watch::Sender<bool>>,
    /// Counts this replica's own changes of the switch: a read of the database that overlapped
    /// one must not undo it (compared as counters, not clocks, which differ across replicas).
    local_changes: Arc<AtomicU64>,
    last_error: Arc<Mutex<Option<(String, SystemTime)>>>,
    rate: Arc<Mutex<RateMeter>>,
}

impl Control {
    /// Reads the pause switch once; the state starts from it.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn load(store: RelayStore) -> anyhow::Result<Self> {
        let switch = store.pause_state().await?;
        Ok(Self {
            store,
            paused: Arc::new(watch::channel(switch.paused).0),
            local_changes: Arc::default(),
            last_error: Arc::default(),
            rate: Arc::new(Mutex::new(RateMeter::starting(Instant::now()))),
        })
    }

    /// Follows the pause switch, as it changes, until the receiver is dropped.
    pub fn paused(&self) -> watch::Receiver<bool> {
        self.paused.subscribe()
    }

    /// Whether this replica is paused now.
    pub fn is_paused(&self) -> bool {
        *self.paused.borrow()
    }

    /// Sets the switch for every replica; this one follows at once, others within their
    /// poll interval.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn set_paused(&self, paused: bool, reason: &str) -> anyhow::Result<()> {
        self.store.set_paused(paused, reason).await?;
        self.paused.send_replace(paused);
        self.local_changes.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Re-reads the switch every `interval` until `shutdown`, so a pause set through another
    /// replica reaches this one.
    ///
    /// # Errors
    /// Never; failures are logged and retried.
    pub async fn follow(
        self,
        interval: Duration,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(interval) => {}
            }
            let before = self.local_changes.load(Ordering::Acquire);
            match self.store.pause_state().await {
                // A change made here while this read ran is newer than what it read.
                Ok(_) if self.local_changes.load(Ordering::Acquire) != before => {}
                Ok(switch) => {
                    self.paused.send_if_modified(|current| {
                        let changed = *current != switch.paused;
                        *current = switch.paused;
                        changed
                    });
                }
                Err(error) => tracing::warn!(error = %error, "failed to read the pause switch"),
            }
        }
    }

    /// Remembers an error that stopped a read, send or apply (no payloads in it).
    pub fn record_error(&self, error: impl std::fmt::Display) {
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some((error.to_string(), SystemTime::now()));
        }
    }

    /// The last recorded error and when it happened.
    pub fn last_error(&self) -> Option<(String, SystemTime)> {
        self.last_error.lock().ok().and_then(|last| last.clone())
    }

    /// Counts `changes` as applied now, for [`Control::changes_per_second`].
    pub fn record_applied(&self, changes: usize) {
        if let Ok(mut rate) = self.rate.lock() {
            rate.add(Instant::now(), changes);
        }
    }

    /// Changes applied per second, averaged over the last min(60 s, uptime).
    pub fn changes_per_second(&self) -> f64 {
        self.rate
            .lock()
            .map(|mut rate| rate.per_second(Instant::now()))
            .unwrap_or_default()
    }
}

/// Counts per second over a sliding minute, or over the uptime while it is shorter (so a
/// replica that just started does not report a fraction of its real rate).
#[derive(Debug)]
struct RateMeter {
    /// When counting began.
    started: Instant,
    /// (second, count) pairs, oldest first.
    seconds: VecDeque<(Instant, usize)>,
}

const WINDOW: Duration = Duration::from_secs(60);

impl RateMeter {
    fn starting(now: Instant) -> Self {
        Self {
            started: now,
            seconds: VecDeque::new(),
        }
    }

    fn add(&mut self, now: Instant, count: usize) {
        match self.seconds.back_mut() {
            Some((start, total)) if now.duration_since(*start) < Duration::from_secs(1) => {
                *total += count;
            }
            _ => self.seconds.push_back((now, count)),
        }
        self.trim(now);
    }

    fn per_second(&mut self, now: Instant) -> f64 {
        self.trim(now);
        let total: usize = self.seconds.iter().map(|(_, c)| c).sum();
        // At least a second, so the first moments do not divide by almost nothing.
        let span = now
            .duration_since(self.started)
            .clamp(Duration::from_secs(1), WINDOW);
        total as f64 / span.as_secs_f64()
    }

    fn trim(&mut self, now: Instant) {
        while self
            .seconds
            .front()
            .is_some_and(|(start, _)| now.duration_since(*start) > WINDOW)
        {
            self.seconds.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_covers_the_last_minute_only() {
        let start = Instant::now();
        let mut meter = RateMeter::starting(start - Duration::from_secs(600));
        meter.add(start, 600);
        meter.add(start + Duration::from_millis(500), 600);
        assert!((meter.per_second(start + Duration::from_secs(1)) - 20.0).abs() < 1e-9);
        assert!(meter.per_second(start + Duration::from_secs(62)).abs() < 1e-9);
    }

    #[test]
    fn a_young_replica_averages_over_its_uptime() {
        let start = Instant::now();
        let mut meter = RateMeter::starting(start);
        meter.add(start + Duration::from_secs(1), 1_000);
        meter.add(start + Duration::from_secs(3), 1_000);
        let rate = meter.per_second(start + Duration::from_secs(4));
        assert!((rate - 500.0).abs() < 1e-9, "{rate}");
    }
}
