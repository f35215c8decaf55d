//! The partner's request rate, one limit for the whole Deployment.
//!
//! The limit is GCRA (the generic cell rate algorithm): one shared number, the earliest time
//! the next request may go (`next`). Taking `n` requests' slots moves it by `n` intervals
//! from `max(next, now)`, so slots never overlap, whichever replica took them, and the rate
//! holds however many replicas run. On PostgreSQL the state is a row of `rate_limits`,
//! updated under its row lock on the database's clock; on SQLite (one replica) it lives in
//! memory. A replica takes as many slots as it has requests waiting, at most [`BLOCK`]'s
//! worth (one round trip per block, not per request; slots nobody waits for are not taken
//! from the other replicas), and hands them to its requests one interval apart; slots it
//! could not use in time are dropped, never sent late in a burst. Requests wait for their
//! concurrency permit before their slot (see `outbound`), so a slot is used when it comes.
//!
//! Backoff: a 429 or a −1004 halves the rate for every replica (at most once per
//! [`BACKOFF_COOLDOWN`], so one burst of refusals counts once) and pushes `next` past the
//! partner's `Retry-After` (capped at `max_pause`); the rate then climbs back linearly to the configured one over
//! `rate_limit_recovery` (additive increase, multiplicative decrease).
//!
//! Written here rather than with `governor` (still a dependency of the tests' simulator):
//! governor keeps its state in process memory with a fixed quota, and this limit must be
//! shared through the database and change its rate at run time.

use std::{sync::Arc, time::Duration};

use mall_db::Backend;
use mall_grpc::ServiceError;
use sea_orm::{ConnectionTrait as _, DatabaseConnection, TransactionTrait as _};
use tokio::time::Instant;

use crate::{
    metrics::MemberMetrics,
    store::{db_error, now_micros},
};

/// How much time a replica reserves at once.
pub const BLOCK: Duration = Duration::from_millis(100);

/// Refusals closer together than this back off once.
pub const BACKOFF_COOLDOWN: Duration = Duration::from_secs(1);

/// The lowest rate backoff goes down to, in requests per second.
const FLOOR: f64 = 0.5;

/// The row of `rate_limits` that holds the partner's limit.
const ROW: &str = "partner";

/// The configured limit.
#[derive(Debug, Clone, Copy)]
pub struct RateSettings {
    /// Requests per second when the partner does not push back.
    pub per_second: f64,
    /// How long the rate takes to climb back from the floor to `per_second`.
    pub recovery: Duration,
    /// The longest pause a `Retry-After` may impose on every replica.
    pub max_pause: Duration,
}

/// The shared state; times in microseconds on the clock of whoever holds it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct State {
    /// When the next request may go.
    pub next: i64,
    /// The rate set by the latest backoff, if any.
    pub backoff_rate: Option<f64>,
    /// When that backoff happened.
    pub backoff_at: i64,
}

/// Slots taken: the first at `start`, then one every `interval` microseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reservation {
    /// The first slot.
    pub start: i64,
    /// Microseconds between slots.
    pub interval: f64,
    /// How many.
    pub count: u32,
    /// The rate in force, requests per second.
    pub rate: f64,
}

impl State {
    /// A limit nobody used yet.
    pub const NEW: Self = Self {
        next: 0,
        backoff_rate: None,
        backoff_at: 0,
    };

    /// The rate in force at `now`.
    pub fn rate(&self, now: i64, settings: &RateSettings) -> f64 {
        let full = settings.per_second.max(FLOOR);
        match self.backoff_rate {
            None => full,
            Some(rate) => {
                let elapsed = Duration::from_micros(
                    now.saturating_sub(self.backoff_at).max(0).unsigned_abs(),
                );
                let recovery = settings.recovery.as_secs_f64().max(1e-3);
                (rate + full * elapsed.as_secs_f64() / recovery).min(full)
            }
        }
    }

    /// Takes `wanted` slots, at most `block`'s worth of time (at least one), at `now`.
    pub fn reserve(
        &mut self,
        now: i64,
        block: Duration,
        wanted: u32,
        settings: &RateSettings,
    ) -> Reservation {
        let rate = self.rate(now, settings);
        let interval = 1e6 / rate;
        // Rounded, so a rate of 400/s takes at most 40 slots per 100 ms.
        let count = (block.as_secs_f64() * rate)
            .round()
            .min(f64::from(wanted))
            .clamp(1.0, 10_000.0);
        let start = self.next.max(now);
        #[expect(
            clippy::cast_possible_truncation,
            reason = "bounded by the clamps above"
        )]
        let (next, count) = (
            start.saturating_add((interval * count).ceil() as i64),
            count as u32,
        );
        self.next = next;
        Reservation {
            start,
            interval,
            count,
            rate,
        }
    }

    /// The partner refused for rate at `now`, maybe saying how long to wait.
    pub fn back_off(&mut self, now: i64, after: Option<Duration>, settings: &RateSettings) {
        let cooldown = i64::try_from(BACKOFF_COOLDOWN.as_micros()).unwrap_or(i64::MAX);
        if self.backoff_rate.is_none() || now.saturating_sub(self.backoff_at) >= cooldown {
            self.backoff_rate = Some((self.rate(now, settings) / 2.0).max(FLOOR));
            self.backoff_at = now;
        }
        if let Some(after) = after {
            let after =
                i64::try_from(after.min(settings.max_pause).as_micros()).unwrap_or(i64::MAX);
            self.next = self.next.max(now.saturating_add(after));
        }
    }
}

/// Where the state lives.
#[derive(Debug)]
enum Shared {
    /// This process only (SQLite: one replica).
    Memory(std::sync::Mutex<State>),
    /// A row of `rate_limits`, for every replica on this PostgreSQL database.
    Postgres(DatabaseConnection),
}

/// The slots this replica holds.
#[derive(Debug, Clone, Copy)]
struct Block {
    next: Instant,
    interval: Duration,
    remaining: u32,
}

/// The limit; cheap to clone (clones share it).
#[derive(Debug, Clone)]
pub struct RateLimiter {
    shared: Arc<Shared>,
    settings: RateSettings,
    block: Arc<tokio::sync::Mutex<Option<Block>>>,
    /// Requests of this replica waiting for a slot.
    waiting: Arc<std::sync::atomic::AtomicU32>,
    metrics: MemberMetrics,
}

impl RateLimiter {
    /// The limit for `db`: shared through it on PostgreSQL, in memory on SQLite.
    pub fn new(db: &DatabaseConnection, settings: RateSettings, metrics: MemberMetrics) -> Self {
        let shared = match Backend::of(db) {
            Backend::Postgres => Shared::Postgres(db.clone()),
            Backend::Sqlite => Shared::Memory(std::sync::Mutex::new(State::NEW)),
        };
        metrics.rate_in_force(settings.per_second);
        Self {
            shared: Arc::new(shared),
            settings,
            block: Arc::default(),
            waiting: Arc::default(),
            metrics,
        }
    }

    /// Waits for this request's slot. While the database cannot be reached nobody sends:
    /// the wait goes on (logged) rather than exceed the partner's limit.
    pub async fn acquire(&self) {
        let _waiting = Waiting::enter(&self.waiting);
        let mut failures = 0;
        loop {
            let mut block = self.block.lock().await;
            let now = Instant::now();
            if let Some(slots) = block.as_mut() {
                // A slot more than one interval in the past is dropped: sending it now would
                // burst above the rate.
                if slots.remaining > 0 && slots.next + slots.interval >= now {
                    let at = slots.next;
                    slots.next += slots.interval;
                    slots.remaining -= 1;
                    drop(block);
                    tokio::time::sleep_until(at).await;
                    return;
                }
            }
            let wanted = self
                .waiting
                .load(std::sync::atomic::Ordering::Relaxed)
                .max(1);
            match self.reserve(wanted).await {
                Ok(reservation) => {
                    failures = 0;
                    self.metrics.rate_in_force(reservation.rate);
                    // From when the answer came: the database's `now` was before it, so the
                    // slots start late rather than early.
                    *block = Some(Block {
                        next: Instant::now() + reservation.delay,
                        interval: Duration::from_secs_f64(reservation.interval / 1e6),
                        remaining: reservation.count,
                    });
                }
                Err(error) => {
                    drop(block);
                    failures += 1;
                    tracing::warn!(%error, "cannot take rate-limit slots; requests to the partner wait");
                    tokio::time::sleep(mall_retry::Backoff::after(
                        Duration::from_millis(50),
                        Duration::from_secs(2),
                        failures,
                    ))
                    .await;
                }
            }
        }
    }

    /// The partner refused for rate: every replica slows down (see the module docs). A
    /// database failure is logged; the retries' own backoff still applies.
    pub async fn back_off(&self, after: Option<Duration>) {
        // This replica's unused slots go too.
        *self.block.lock().await = None;
        let result = match &*self.shared {
            Shared::Memory(state) => {
                let mut state = state
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                state.back_off(now_micros(), after, &self.settings);
                Ok(())
            }
            Shared::Postgres(db) => self
                .locked(db, |state, now| state.back_off(now, after, &self.settings))
                .await
                .map(|_| ()),
        };
        if let Err(error) = result {
            tracing::warn!(%error, "cannot slow down the shared rate limit");
        }
    }

    async fn reserve(&self, wanted: u32) -> Result<Local, ServiceError> {
        let (reservation, now) = match &*self.shared {
            Shared::Memory(state) => {
                let mut state = state
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let now = now_micros();
                (state.reserve(now, BLOCK, wanted, &self.settings), now)
            }
            Shared::Postgres(db) => {
                let mut taken = None;
                let now = self
                    .locked(db, |state, now| {
                        taken = Some(state.reserve(now, BLOCK, wanted, &self.settings));
                    })
                    .await?;
                (taken.expect("locked() calls its closure"), now)
            }
        };
        Ok(Local {
            delay: Duration::from_micros(
                reservation.start.saturating_sub(now).max(0).unsigned_abs(),
            ),
            interval: reservation.interval,
            count: reservation.count,
            rate: reservation.rate,
        })
    }

    /// Runs `change` on the shared row under its lock, on the database's clock; returns
    /// that clock's `now`.
    async fn locked(
        &self,
        db: &DatabaseConnection,
        change: impl FnOnce(&mut State, i64),
    ) -> Result<i64, ServiceError> {
        let backend = Backend::Postgres;
        let txn = db.begin().await.map_err(|e| db_error(e, "begin"))?;
        let select = || {
            backend.statement(
                "SELECT next_micros, backoff_rate, backoff_micros, \
                 (extract(epoch from clock_timestamp()) * 1000000)::bigint AS now \
                 FROM rate_limits WHERE name = $1 FOR UPDATE",
                [ROW.into()],
            )
        };
        let mut row = txn
            .query_one_raw(select())
            .await
            .map_err(|e| db_error(e, "read the rate limit"))?;
        if row.is_none() {
            // The first use on this database.
            txn.execute_raw(backend.statement(
                "INSERT INTO rate_limits (name, next_micros, backoff_rate, backoff_micros) \
                 VALUES ($1, 0, NULL, 0) ON CONFLICT (name) DO NOTHING",
                [ROW.into()],
            ))
            .await
            .map_err(|e| db_error(e, "create the rate limit"))?;
            row = txn
                .query_one_raw(select())
                .await
                .map_err(|e| db_error(e, "read the rate limit"))?;
        }
        let row = row.ok_or_else(|| {
            ServiceError::Unavailable("the rate limit row is missing; retry".into())
        })?;
        let read = |e| db_error(e, "read the rate limit");
        let now: i64 = row.try_get("", "now").map_err(read)?;
        let mut state = State {
            next: row.try_get("", "next_micros").map_err(read)?,
            backoff_rate: row.try_get("", "backoff_rate").map_err(read)?,
            backoff_at: row.try_get("", "backoff_micros").map_err(read)?,
        };
        change(&mut state, now);
        txn.execute_raw(backend.statement(
            "UPDATE rate_limits SET next_micros = $2, backoff_rate = $3, backoff_micros = $4 \
             WHERE name = $1",
            [
                ROW.into(),
                state.next.into(),
                state.backoff_rate.into(),
                state.backoff_at.into(),
            ],
        ))
        .await
        .map_err(|e| db_error(e, "take rate-limit slots"))?;
        txn.commit().await.map_err(|e| db_error(e, "commit"))?;
        Ok(now)
    }
}

/// Counts a request waiting for a slot while it lives.
struct Waiting<'a>(&'a std::sync::atomic::AtomicU32);

impl<'a> Waiting<'a> {
    fn enter(count: &'a std::sync::atomic::AtomicU32) -> Self {
        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A reservation as this replica's clock sees it.
#[derive(Debug, Clone, Copy)]
struct Local {
    delay: Duration,
    interval: f64,
    count: u32,
    rate: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTINGS: RateSettings = RateSettings {
        per_second: 400.0,
        recovery: Duration::from_secs(10),
        max_pause: Duration::from_secs(10),
    };

    #[test]
    fn slots_never_overlap_and_hold_the_rate() {
        let mut state = State::NEW;
        let mut now = 1_000_000;
        let mut slots = Vec::new();
        // Two replicas asking in turns, sometimes late, sometimes early.
        for i in 0..200 {
            now += if i % 3 == 0 { 30_000 } else { 70_000 };
            let r = state.reserve(now, BLOCK, 1_000, &SETTINGS);
            assert_eq!(r.count, 40);
            assert!(r.start >= now);
            for k in 0..r.count {
                slots.push(r.start as f64 + f64::from(k) * r.interval);
            }
        }
        for pair in slots.windows(2) {
            assert!(pair[1] - pair[0] >= 2_499.0, "{pair:?}");
        }
        // However the asks fell, no second holds more than the rate.
        let first = slots[0];
        let in_first_second = slots.iter().filter(|&&s| s < first + 1e6).count();
        assert!(in_first_second <= 400, "{in_first_second}");
    }

    #[test]
    fn an_idle_limit_does_not_save_up_a_burst() {
        let mut state = State::NEW;
        state.reserve(0, BLOCK, 1_000, &SETTINGS);
        let r = state.reserve(60_000_000, BLOCK, 1_000, &SETTINGS);
        assert_eq!(r.start, 60_000_000);
        assert_eq!(state.next, 60_100_000);
    }

    #[test]
    fn backoff_halves_once_per_burst_then_recovers_linearly() {
        let mut state = State::NEW;
        state.back_off(1_000_000, None, &SETTINGS);
        // A burst of refusals within the cooldown counts once.
        state.back_off(1_100_000, None, &SETTINGS);
        state.back_off(1_900_000, None, &SETTINGS);
        assert!((state.rate(1_000_000, &SETTINGS) - 200.0).abs() < 1e-9);
        // 10 s to climb the whole 400/s: 40/s per second.
        assert!((state.rate(3_000_000, &SETTINGS) - 280.0).abs() < 1e-9);
        assert!((state.rate(60_000_000, &SETTINGS) - 400.0).abs() < 1e-9);
        // A refusal after the cooldown halves what is in force then.
        state.back_off(3_000_000, None, &SETTINGS);
        assert!((state.rate(3_000_000, &SETTINGS) - 140.0).abs() < 1e-9);
        // Never below the floor.
        for second in 4..40 {
            state.back_off(second * 1_000_000, None, &SETTINGS);
        }
        assert!(state.rate(40_000_000, &SETTINGS) >= FLOOR);
    }

    #[test]
    fn retry_after_pushes_every_slot_past_it() {
        let mut state = State::NEW;
        state.back_off(5_000_000, Some(Duration::from_secs(2)), &SETTINGS);
        let r = state.reserve(5_000_000, BLOCK, 1_000, &SETTINGS);
        assert_eq!(r.start, 7_000_000);
        // A Retry-After beyond the longest pause is capped: one answer cannot stop every
        // replica for hours (or for good).
        state.back_off(
            8_000_000,
            Some(Duration::from_secs(u64::MAX / 4)),
            &SETTINGS,
        );
        assert!(state.next <= 18_000_000, "{}", state.next);
    }

    #[test]
    fn only_the_slots_wanted_are_taken() {
        let mut state = State::NEW;
        let r = state.reserve(1_000_000, BLOCK, 3, &SETTINGS);
        assert_eq!(r.count, 3);
        // The next replica's slots start right after those three, not 100 ms later.
        assert_eq!(state.next, 1_007_500);
    }
}
