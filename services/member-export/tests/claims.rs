//! One member is never in two requests at once: a sender claims members before sending
//! (recording the version it sends) and other senders' claims leave them out until released
//! or expired. On SQLite and PostgreSQL.

use std::time::Duration;

use mall_test_support::{Engine, TestDatabase};
use member_export::{
    migration::Migrator,
    store::{Store, now_micros},
};
use sea_orm::{ConnectionTrait as _, Statement};

async fn claims_are_exclusive_until_released_or_expired(engine: Engine) {
    let database = TestDatabase::new(engine).await;
    let db = mall_db::connect::<Migrator>(&mall_db::DatabaseSettings {
        url: database.url().to_owned().into(),
        ..Default::default()
    })
    .await
    .expect("connects and migrates");
    for id in ["m-1", "m-2", "m-3", "m-4", "m-5"] {
        db.execute_raw(Statement::from_string(
            db.get_database_backend(),
            format!(
                "INSERT INTO members (member_id, version, consent_email, consent_sms, \
                 consent_push, consent_time, change_time, queued_version, delivered_version, \
                 update_time) VALUES ('{id}', 3, true, false, false, 0, 0, 3, 0, 0)"
            ),
        ))
        .await
        .expect("a member");
    }
    let store = Store::new(db);
    let lease = Duration::from_secs(30);
    let first = store
        .claim(1, &[("m-1", 3, false), ("m-2", 3, false)], lease)
        .await
        .expect("claims");
    assert_eq!(first.len(), 2);
    // Another sender gets only what nobody holds; the holder may claim again (a retry).
    let second = store
        .claim(
            2,
            &[("m-1", 3, false), ("m-2", 3, false), ("m-3", 3, false)],
            lease,
        )
        .await
        .expect("claims");
    assert_eq!(second, ["m-3".to_owned()].into());
    let again = store
        .claim(1, &[("m-1", 3, false)], lease)
        .await
        .expect("claims");
    assert_eq!(again.len(), 1);
    // A renewal says how many it still held.
    assert_eq!(
        store
            .renew(1, &["m-1", "m-2"], lease)
            .await
            .expect("renews"),
        2
    );
    assert_eq!(
        store
            .renew(2, &["m-1", "m-2"], lease)
            .await
            .expect("renews"),
        0
    );
    // Released by the partner's answer, recorded.
    store
        .delivered(1, &[("m-1", 3, false)], &[], now_micros())
        .await
        .expect("records");
    let after_delivery = store
        .claim(2, &[("m-1", 3, false), ("m-2", 3, false)], lease)
        .await
        .expect("claims");
    assert_eq!(after_delivery, ["m-1".to_owned()].into());
    // An expired claim (its holder crashed) is taken over.
    store
        .claim(5, &[("m-4", 3, false)], Duration::from_millis(200))
        .await
        .expect("claims");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let taken_over = store
        .claim(6, &[("m-4", 3, false)], lease)
        .await
        .expect("claims");
    assert_eq!(taken_over, ["m-4".to_owned()].into());
    // A version the row has moved past is not claimed: the sender must read it again.
    let moved_on = store
        .claim(7, &[("m-5", 2, false)], lease)
        .await
        .expect("claims");
    assert!(moved_on.is_empty(), "{moved_on:?}");
    // The version being sent is recorded as attempted.
    let rows = store
        .members(&["m-1", "m-2", "m-3", "m-4"])
        .await
        .expect("reads");
    for row in rows {
        assert_eq!(row.attempted_version, 3, "{row:?}");
    }
}

#[tokio::test]
async fn sqlite_claims_are_exclusive() {
    claims_are_exclusive_until_released_or_expired(Engine::Sqlite).await;
}

#[tokio::test]
async fn postgres_claims_are_exclusive() {
    claims_are_exclusive_until_released_or_expired(Engine::Postgres).await;
}
