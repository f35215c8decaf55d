//! The partner's rate limit holds for the whole Deployment: two `RateLimiter`s on one
//! PostgreSQL database stand for two replicas. No window of time ever holds more requests
//! than the rate allows (the limit's own contract, checked on the slots' real times), both
//! replicas get slots, and a rate refusal seen by one slows the other down.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use mall_test_support::{Engine, TestDatabase};
use member_export::{
    metrics::MemberMetrics,
    migration::Migrator,
    ratelimit::{RateLimiter, RateSettings},
};
use tokio::time::Instant;

const RATE: f64 = 50.0;

async fn replicas(
    engine: Engine,
    count: usize,
) -> (TestDatabase, Vec<(RateLimiter, MemberMetrics)>) {
    replicas_at(engine, count, RATE).await
}

async fn replicas_at(
    engine: Engine,
    count: usize,
    rate: f64,
) -> (TestDatabase, Vec<(RateLimiter, MemberMetrics)>) {
    let database = TestDatabase::new(engine).await;
    let settings = mall_db::DatabaseSettings {
        url: database.url().to_owned().into(),
        ..Default::default()
    };
    let mut replicas = Vec::new();
    for _ in 0..count {
        let db = mall_db::connect::<Migrator>(&settings)
            .await
            .expect("connects and migrates");
        let metrics = MemberMetrics::unregistered();
        let limiter = RateLimiter::new(
            &db,
            RateSettings {
                per_second: rate,
                recovery: Duration::from_secs(60),
                max_pause: Duration::from_secs(10),
            },
            metrics.clone(),
        );
        replicas.push((limiter, metrics));
    }
    (database, replicas)
}

/// Slots taken by 8 tasks per replica for `run`, as (replica, when).
async fn take_slots(
    replicas: &[(RateLimiter, MemberMetrics)],
    run: Duration,
) -> Vec<(usize, Instant)> {
    let taken = Arc::new(Mutex::new(Vec::new()));
    let until = Instant::now() + run;
    let mut tasks = tokio::task::JoinSet::new();
    for (replica, (limiter, _)) in replicas.iter().enumerate() {
        for _ in 0..8 {
            let limiter = limiter.clone();
            let taken = taken.clone();
            tasks.spawn(async move {
                while Instant::now() < until {
                    limiter.acquire().await;
                    taken.lock().expect("lock").push((replica, Instant::now()));
                }
            });
        }
    }
    while tasks.join_next().await.is_some() {}
    let mut taken = Arc::try_unwrap(taken)
        .expect("tasks ended")
        .into_inner()
        .expect("lock");
    taken.sort_by_key(|(_, at)| *at);
    taken
}

#[tokio::test]
async fn postgres_replicas_share_one_rate() {
    let (_database, replicas) = replicas(Engine::Postgres, 2).await;
    let taken = take_slots(&replicas, Duration::from_secs(3)).await;
    for replica in 0..2 {
        assert!(
            taken.iter().any(|(r, _)| *r == replica),
            "replica {replica} never got a slot"
        );
    }
    // Slots are one interval apart across both replicas on the database's clock; each
    // replica places them on its own clock from when the database answered, so two
    // replicas' slots can drift closer by the difference of their round trips, and timers
    // add their jitter. Every window of one second holds at most the rate and 10 %, and
    // the whole run at most its span's worth and one.
    assert_rate(&taken, 1.10);
    let span = taken[taken.len() - 1].1 - taken[0].1;
    assert!(
        taken.len() as f64 <= RATE * span.as_secs_f64() * 1.02 + 1.0,
        "{} slots in {span:?} at {RATE}/s",
        taken.len()
    );
}

/// No one-second window of `taken` holds more than `RATE` × `slack`, plus one for its edges.
fn assert_rate(taken: &[(usize, Instant)], slack: f64) {
    let most = (RATE * slack) as usize + 1;
    for (i, (_, start)) in taken.iter().enumerate() {
        let within = taken[i..]
            .iter()
            .take_while(|(_, at)| *at < *start + Duration::from_secs(1))
            .count();
        assert!(
            within <= most,
            "{within} requests within a second; the limit is {RATE}/s"
        );
    }
}

#[tokio::test]
async fn a_rate_refusal_on_one_replica_slows_every_replica() {
    let (_database, replicas) = replicas(Engine::Postgres, 2).await;
    let (first, _) = &replicas[0];
    let (second, second_metrics) = &replicas[1];
    second.acquire().await;
    assert!((second_metrics.rate_limit.get() - RATE).abs() < 1e-9);
    first.back_off(Some(Duration::from_millis(300))).await;
    // The second replica's next block is taken at the halved rate, after the Retry-After.
    let asked = Instant::now();
    for _ in 0..20 {
        second.acquire().await;
    }
    let rate = second_metrics.rate_limit.get();
    assert!(
        (RATE * 0.5..RATE * 0.6).contains(&rate),
        "rate in force {rate}"
    );
    assert!(
        asked.elapsed() >= Duration::from_millis(250),
        "{:?}",
        asked.elapsed()
    );
}

#[tokio::test]
async fn sqlite_keeps_the_rate_in_memory() {
    let (_database, replicas) = replicas(Engine::Sqlite, 1).await;
    let taken = take_slots(&replicas, Duration::from_secs(2)).await;
    // One replica, one clock: only timer jitter.
    assert_rate(&taken, 1.02);
    assert!(taken.len() > 10, "{} slots in 2 s", taken.len());
}

/// Slots taken by `callers` tasks per replica, each busy `work` after its slot, for `run`.
async fn take_slots_working(
    replicas: &[(RateLimiter, MemberMetrics)],
    callers: usize,
    work: Duration,
    run: Duration,
) -> usize {
    let until = Instant::now() + run;
    let mut tasks = tokio::task::JoinSet::new();
    for (limiter, _) in replicas {
        for _ in 0..callers {
            let limiter = limiter.clone();
            tasks.spawn(async move {
                let mut taken = 0;
                while Instant::now() < until {
                    limiter.acquire().await;
                    taken += 1;
                    tokio::time::sleep(work).await;
                }
                taken
            });
        }
    }
    let mut total = 0;
    while let Some(taken) = tasks.join_next().await {
        total += taken.expect("a task");
    }
    total
}

#[tokio::test]
async fn replicas_with_little_demand_take_only_the_slots_they_use() {
    // Two replicas, three requests each, 20 ms per request: together they want about
    // 300 requests/s, below the 400/s limit. Slots reserved and left unused would be
    // counted against both (a replica reserving 100 ms of slots while using a third of
    // them leaves the pair far below what they want).
    let (_database, replicas) = replicas_at(Engine::Postgres, 2, 400.0).await;
    let run = Duration::from_secs(3);
    let taken = take_slots_working(&replicas, 3, Duration::from_millis(20), run).await;
    let per_second = taken as f64 / run.as_secs_f64();
    assert!(
        per_second >= 300.0 * 0.6,
        "{per_second:.0} requests/s for a demand of about 300/s under a 400/s limit"
    );
}
