//! Failure alerts: at most `max_per_window` per window across replicas (two `Alerts` on one
//! database stand for two replicas), the rest summed up once after the window, to the
//! simulator's Slack-compatible endpoint over HTTP.

use std::time::Duration;

use mall_test_support::{Engine, TestDatabase, wait_until};
use member_export::{
    alerts::{AlertSettings, Alerts},
    metrics::MemberMetrics,
    migration::Migrator,
    simulator::{Behaviour, Simulator},
};
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;

async fn at_most_the_cap_is_sent_across_replicas_and_the_rest_summed_up_once(engine: Engine) {
    let database = TestDatabase::new(engine).await;
    let db_settings = mall_db::DatabaseSettings {
        url: database.url().to_owned().into(),
        ..Default::default()
    };
    let receiver = Simulator::start(
        "127.0.0.1:0".parse().expect("addr"),
        "key",
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        Behaviour::default(),
    )
    .await
    .expect("a Slack-compatible receiver");
    let settings = AlertSettings {
        webhook_url: Some(SecretString::from(receiver.alerts_url())),
        max_per_window: 10,
        window: Duration::from_secs(2),
        request_timeout: Duration::from_secs(2),
        ..AlertSettings::default()
    };
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let db = mall_db::connect::<Migrator>(&db_settings)
            .await
            .expect("connects and migrates");
        replicas.push(Alerts::new(&settings, db, MemberMetrics::unregistered()).expect("alerts"));
    }
    // Start right after a window begins, so all 15 fall in one window.
    let into_window = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis()
        % 2_000;
    if into_window > 500 {
        tokio::time::sleep(Duration::from_millis(
            u64::try_from(2_050 - into_window).expect("small"),
        ))
        .await;
    }
    let raised = futures::future::join_all((0..15).map(|i| {
        let alerts = replicas[i % 2].clone();
        async move { alerts.raise(&format!("alert {i}")).await.expect("counted") }
    }))
    .await;
    assert_eq!(raised.iter().filter(|sent| **sent).count(), 10);
    let counts = replicas[0].current().await.expect("window");
    assert_eq!((counts.sent, counts.suppressed), (10, 5));
    assert_eq!(receiver.alerts().len(), 10);

    let shutdown = CancellationToken::new();
    for alerts in &replicas {
        tokio::spawn(alerts.clone().summarize(shutdown.clone()));
    }
    wait_until(
        "the window's summary arrives",
        Duration::from_secs(10),
        || async { (receiver.alerts().len() > 10).then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    shutdown.cancel();
    let texts = receiver.alerts();
    assert_eq!(texts.len(), 11, "one summary, from one replica: {texts:?}");
    assert!(
        texts[10].contains("5 more alert(s) were suppressed"),
        "{}",
        texts[10]
    );
}

#[tokio::test]
async fn sqlite_caps_alerts_across_replicas() {
    at_most_the_cap_is_sent_across_replicas_and_the_rest_summed_up_once(Engine::Sqlite).await;
}

#[tokio::test]
async fn postgres_caps_alerts_across_replicas() {
    at_most_the_cap_is_sent_across_replicas_and_the_rest_summed_up_once(Engine::Postgres).await;
}
