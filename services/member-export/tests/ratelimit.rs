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
                per_second: RATE,
                recovery: Duration::from_secs(60),
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
    // Every one-second window holds at most the rate, plus one slot for the window's edges
    // and a little for timer jitter: slots are one interval apart across both replicas.
    let most = RATE as usize + 2;
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
    let most = RATE as usize + 2;
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
    assert!(taken.len() > 10, "{} slots in 2 s", taken.len());
}
