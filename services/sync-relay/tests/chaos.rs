//! Chaos tests of issue 5: the relay as a real process, killed with SIGKILL again and again
//! while tens of thousands of shuffled changes and a few hundred malformed records flow
//! through it, with the catalog away for a while, answering INTERNAL for a while, refusing
//! every other item for a second (those changes are quarantined and redriven mid-run, so they
//! apply late, behind newer ones), and, on PostgreSQL, every catalog database connection
//! terminated three times; then every field of every product must equal its
//! changes applied in version order, the catalog's change stream must never have shown a
//! product going back, and the quarantine must hold exactly the malformed records. And two replicas on one Kinesis stream
//! splitting its shards and taking over from each other.
//!
//! The relay runs from its binary with `SYNC_RELAY__*` settings and JSON logs; the catalog runs
//! in this process, so it can be stopped and started again on the same address. Kill points
//! are chosen by the producer's progress plus a random delay. Set `CHAOS_SEED` to replay a
//! run's workload and kill points (each run prints its seed); `TEST_LOG=1` shows the relay's
//! logs.
//!
//! Needs PostgreSQL, LocalStack (SQS) and kinesalite for the second and third tests:
//! `scripts/test.sh` starts them.

#[path = "chaos/front.rs"]
mod front;
#[path = "support/kinesalite.rs"]
mod kinesalite;
#[allow(dead_code)]
#[path = "pipeline/helpers.rs"]
mod pipeline_helpers;
#[path = "chaos/publish.rs"]
mod publish;
#[path = "chaos/relay.rs"]
mod relay;
#[path = "chaos/stream.rs"]
mod stream;
#[path = "chaos/watch.rs"]
mod watch;
#[path = "chaos/workload.rs"]
mod workload;

use std::{collections::BTreeSet, time::Duration};

use mall_proto::catalog::v1::Product;
use mall_test_support::{Engine, TestDatabase, wait_until};
use tokio::sync::watch as channel;

use front::{Fault, Front};
use pipeline_helpers::Catalog;
use relay::RelayProcess;
use stream::Stream;
use watch::Watch;
use workload::{CHAOS, Size, Style, Workload};

/// How long the relay may take to drain after the chaos, at most.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(150);

/// The catalog's settings for these tests: an outage starts within seconds of asking.
fn quick_drain(settings: &mut product_catalog::Settings) {
    settings.server.drain_timeout = Duration::from_secs(5);
}

/// The seed of this run: `CHAOS_SEED`, or a fresh one, printed so a failure can be replayed.
fn seed() -> u64 {
    let seed = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    println!("CHAOS_SEED={seed}");
    seed
}

/// Settings every relay of these tests shares: short waits and timeouts, so crashes and
/// outages are recovered from in seconds.
fn base_settings(database: &TestDatabase, front: &Front) -> Vec<(&'static str, String)> {
    vec![
        ("database.url", database.url().to_owned()),
        ("apply.catalog_url", format!("http://{}", front.addr)),
        ("apply.receive_wait", "200ms".into()),
        ("apply.retry_backoff_max", "500ms".into()),
        // A killed relay's messages come back 3s later.
        ("queue.visibility_timeout", "3s".into()),
        ("queue.embedded.poll_interval", "20ms".into()),
        ("relay.control_poll_interval", "200ms".into()),
        ("server.drain_timeout", "5s".into()),
    ]
}

/// The SQS settings of a fresh FIFO queue on LocalStack.
fn sqs_settings(endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("queue.backend", "sqs".into()),
        ("queue.name", format!("chaos-{:016x}", fastrand::u64(..))),
        ("queue.sqs.endpoint_url", endpoint.to_owned()),
        ("queue.sqs.region", "us-east-1".into()),
        ("queue.sqs.access_key_id", "test".into()),
        ("queue.sqs.secret_access_key", "test".into()),
        ("queue.sqs.create_queues", "true".into()),
    ]
}

// ---------------------------------------------------------------------------------------------
// Chaos

/// Something done to the system mid-run.
#[derive(Debug, Clone, Copy)]
enum Event {
    /// SIGKILL the relay and start it again.
    Kill,
    /// Stop the catalog for a few seconds, killing the relay once meanwhile.
    Outage,
    /// Terminate every PostgreSQL connection of the catalog's database
    /// (`pg_terminate_backend`), as a failover or a network cut would: in-flight statements
    /// fail, the pool reconnects, and callers must see UNAVAILABLE, never INTERNAL.
    CutDatabase,
    /// The catalog answers INTERNAL to every call for a few seconds: the relay keeps its
    /// messages and retries; nothing is dead-lettered or quarantined.
    Internal,
    /// The catalog refuses every other item for a second (as a catalog deployed with a
    /// wrong rule would): the relay quarantines those changes. A second after the catalog
    /// is fixed, an operator redrives the whole quarantine: the refused changes apply late,
    /// behind newer ones, and the malformed records stay.
    RefuseThenRedrive,
}

/// When each event happens: once the producer's progress reaches a threshold (chunks sent or
/// records put, out of `total`), then after a random delay. Five kills spread over the run,
/// and the outage in the middle (with a sixth kill in it); INTERNAL answers at a third, and a
/// refusal window with its redrive at three fifths.
fn schedule(total: usize, rng: &mut fastrand::Rng) -> Vec<(usize, Event)> {
    let at = |share: f64, rng: &mut fastrand::Rng| {
        let jitter = rng.f64() * 0.06 - 0.03;
        ((share + jitter) * total as f64) as usize
    };
    let mut events = vec![
        (at(0.10, rng), Event::Kill),
        (at(0.24, rng), Event::Kill),
        (at(0.38, rng), Event::Kill),
        (at(0.52, rng), Event::Outage),
        (at(0.68, rng), Event::Kill),
        (at(0.82, rng), Event::Kill),
        (at(0.31, rng), Event::Internal),
        (at(0.60, rng), Event::RefuseThenRedrive),
    ];
    events.sort_by_key(|(at, _)| *at);
    events
}

/// [`schedule`] plus three cuts of the catalog's database connections (PostgreSQL only).
fn schedule_with_database_cuts(total: usize, rng: &mut fastrand::Rng) -> Vec<(usize, Event)> {
    let mut events = schedule(total, rng);
    for share in [0.17, 0.45, 0.75] {
        events.push(((share * total as f64) as usize, Event::CutDatabase));
    }
    events.sort_by_key(|(at, _)| *at);
    events
}

/// Terminates every other connection to the database at `url`; returns how many.
async fn terminate_connections(url: &str) -> u64 {
    use sea_orm::ConnectionTrait as _;
    let db = sea_orm::Database::connect(url)
        .await
        .expect("the test PostgreSQL answers");
    let rows = db
        .query_all_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        ))
        .await
        .expect("pg_terminate_backend runs");
    rows.len() as u64
}

/// The catalog the chaos stops and starts, and the front it makes fail.
struct CatalogSide<'a> {
    catalog: &'a mut Option<Catalog>,
    front: &'a Front,
}

/// Runs `events` as the producer's `progress` reaches each one, each after a random delay
/// below `jitter`.
async fn run_chaos(
    events: Vec<(usize, Event)>,
    jitter: Duration,
    mut progress: channel::Receiver<usize>,
    relay: &mut RelayProcess,
    CatalogSide { catalog, front }: CatalogSide<'_>,
    watch: &Watch,
    rng: &mut fastrand::Rng,
) {
    let start = std::time::Instant::now();
    for (threshold, event) in events {
        if progress.wait_for(|p| *p >= threshold).await.is_err() {
            // The producer ended early: it failed, and joining it tells why.
            return;
        }
        tokio::time::sleep(jitter.mul_f64(rng.f64())).await;
        relay.check_alive();
        println!(
            "{:>6.1}s {event:?} at producer progress {} (threshold {threshold}); the catalog \
             has {} of the version sum",
            start.elapsed().as_secs_f64(),
            *progress.borrow(),
            watch.version_sum()
        );
        match event {
            Event::Kill => {
                relay.kill().await;
                relay.restart().await;
            }
            Event::CutDatabase => {
                let url = catalog.as_ref().expect("the catalog runs").database.url();
                let cut = terminate_connections(url).await;
                println!("        terminated {cut} catalog database connections");
            }
            Event::Internal => {
                front.set(Fault::Internal);
                tokio::time::sleep(Duration::from_millis(rng.u64(2_000..4_000))).await;
                front.set(Fault::None);
            }
            Event::RefuseThenRedrive => {
                // A window of refusals that refuses at least one call: right after an
                // outage or a kill, every lane may still be held by the killed replica's
                // receive until its visibility runs out, and no call comes for a while.
                let before = front.refused_calls();
                front.set(Fault::RefuseItems);
                tokio::time::sleep(Duration::from_millis(rng.u64(700..1_300))).await;
                let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
                while front.refused_calls() == before {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "the relay made no catalog call in 20 s of refusals"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                front.set(Fault::None);
                // The refused changes reach the quarantine once the relay's database took
                // them; then an operator redrives them, behind newer ones.
                let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
                loop {
                    let redriven = redrive_all(relay).await;
                    if redriven.redriven_count > 0 {
                        println!(
                            "        redrove {} refused changes ({} malformed records stay)",
                            redriven.redriven_count, redriven.still_invalid_count
                        );
                        break;
                    }
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "the refusals quarantined changes: {redriven:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            Event::Outage => {
                let (database, addr) = catalog.take().expect("the catalog runs").stop().await;
                tokio::time::sleep(Duration::from_millis(rng.u64(500..1_500))).await;
                relay.kill().await;
                relay.restart().await;
                tokio::time::sleep(Duration::from_millis(rng.u64(1_500..2_500))).await;
                *catalog = Some(Catalog::start(database, Some(addr), quick_drain).await);
            }
        }
    }
}

/// Checks the end state: the change stream showed every product's versions strictly
/// increasing with nothing missing, up to its highest; every product is stored at its highest
/// version, with that version's price; the quarantine holds exactly the malformed records;
/// there are no dead letters.
async fn verify(
    workload: &Workload,
    catalog: &Catalog,
    relay: &RelayProcess,
    watch: &Watch,
    source_prefix: &str,
) {
    let (last, problems) = watch.result();
    assert!(
        problems.is_empty(),
        "the change stream shows products going back or skipping: {problems:#?}"
    );
    for (code, max) in &workload.max_versions {
        assert_eq!(
            last.get(code).map(|p| p.version),
            Some(*max),
            "the change stream's last {code}"
        );
    }

    // Every field of every product is what applying its changes in version order gives,
    // and the change stream's last record of each product is the stored product.
    let codes: Vec<String> = workload.expected.keys().cloned().collect();
    let stored = catalog
        .stored(&codes)
        .await
        .expect("BatchGetProducts answers");
    let wrong: Vec<String> = workload
        .expected
        .iter()
        .filter_map(|(code, expected)| {
            let product = stored.get(code);
            let values = product.map(|p| Product {
                create_time: None,
                update_time: None,
                ..p.clone()
            });
            if values.as_ref() != Some(expected) {
                return Some(format!("{code}: stored {values:?}, want {expected:?}"));
            }
            (last.get(code) != product)
                .then(|| format!("{code}: the change stream last showed {:?}", last.get(code)))
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "{} products differ from their changes applied in version order, e.g. {:#?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );

    let expected = workload.malformed.len();
    wait_until(
        "every malformed record is quarantined",
        Duration::from_secs(30),
        || async {
            (relay.status().await.quarantined_count >= i64::try_from(expected).expect("small"))
                .then_some(())
        },
    )
    .await;
    let quarantined = relay.quarantined().await;
    let raw: BTreeSet<Vec<u8>> = quarantined.iter().map(|r| r.raw_payload.clone()).collect();
    assert_eq!(
        quarantined.len(),
        expected,
        "the quarantine holds one record per malformed record"
    );
    assert!(
        raw == workload.malformed,
        "the quarantine holds exactly the malformed records: {} of them are not malformed, {} \
         malformed ones are missing",
        raw.difference(&workload.malformed).count(),
        workload.malformed.difference(&raw).count()
    );
    for record in &quarantined {
        assert!(
            record.source.starts_with(source_prefix) && !record.reason.is_empty(),
            "quarantined from the source, with a reason: {record:?}"
        );
    }

    let status = relay.status().await;
    assert_eq!(status.dead_letter_count, 0, "no dead letters: {status:?}");
    assert_eq!(relay.dead_letters().await, 0, "ListDeadLetters is empty");
}

/// RedriveQuarantined of everything, as an operator fixing the catalog would.
async fn redrive_all(relay: &RelayProcess) -> mall_proto::sync::v1::RedriveQuarantinedResponse {
    relay
        .client()
        .redrive_quarantined(mall_proto::sync::v1::RedriveQuarantinedRequest {
            all: true,
            ..Default::default()
        })
        .await
        .expect("RedriveQuarantined answers")
        .into_inner()
}

/// The end of a chaos run: the relay was killed often enough; once the catalog caught up,
/// [`verify`] holds and SIGTERM still stops the relay cleanly. Returns the kills and the
/// change records and streams the watcher saw.
async fn drain_and_verify(
    workload: &Workload,
    catalog: Option<Catalog>,
    mut relay: RelayProcess,
    watch: &Watch,
    source_prefix: &str,
) -> (usize, u64, u64) {
    assert!(
        relay.kills >= 5,
        "the relay was killed {} times",
        relay.kills
    );
    let catalog = catalog.expect("the catalog runs again");
    // As an operator would after fixing the catalog: changes a refusal window quarantined
    // after the mid-run redrive (a consumer records its refusals once its call returns, which
    // may be after that redrive ran) go back too; malformed records stay.
    let redriven = redrive_all(&relay).await;
    println!(
        "        after the chaos, redrove {} refused changes quarantined late",
        redriven.redriven_count
    );
    let drain = std::time::Instant::now();
    watch.wait_for(&workload.expected, DRAIN_TIMEOUT).await;
    println!(
        "drained in {:.1}s after the chaos",
        drain.elapsed().as_secs_f64()
    );
    verify(workload, &catalog, &relay, watch, source_prefix).await;
    let (records, streams) = watch.counts();
    let kills = relay.kills;
    let status = relay.terminate().await;
    assert!(
        status.success(),
        "after the chaos, SIGTERM still stops the relay cleanly: {status}"
    );
    (kills, records, streams)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_on_embedded_queue_and_sqlite() {
    mall_test_support::init_logging();
    let seed = seed();
    let mut rng = fastrand::Rng::with_seed(seed);
    let workload = Workload::generate(seed, Style::Grpc, CHAOS);
    assert!(workload.valid_count() >= 50_000);

    let mut catalog = Some(Catalog::start(TestDatabase::sqlite(), None, quick_drain).await);
    let catalog_ref = catalog.as_ref().expect("started");
    let relay_database = TestDatabase::sqlite();
    let front = Front::start(catalog_ref.addr).await;
    let mut relay =
        RelayProcess::start("relay", relay::env(&base_settings(&relay_database, &front))).await;
    let watch = Watch::start(catalog_ref.addr).await;

    let chunks = workload.items.len().div_ceil(publish::CHUNK);
    let (started, progress) = channel::channel(0);
    let publisher = tokio::spawn(publish::publish_grpc(
        workload.items.clone(),
        1_500.0,
        relay.addresses(),
        started,
    ));
    // Kills soon after a chunk's call started mostly land while the relay handles it: the
    // publisher must send that chunk again.
    run_chaos(
        schedule(chunks, &mut rng),
        Duration::from_millis(100),
        progress,
        &mut relay,
        CatalogSide {
            catalog: &mut catalog,
            front: &front,
        },
        &watch,
        &mut rng,
    )
    .await;
    let failed_calls = publisher.await.expect("the publisher completes");
    let (kills, records, streams) =
        drain_and_verify(&workload, catalog, relay, &watch, "grpc").await;
    println!(
        "{kills} kills, {failed_calls} publish calls resent, {records} changes watched over \
         {streams} streams"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_on_sqs_kinesis_and_postgres() {
    mall_test_support::init_logging();
    let seed = seed();
    let mut rng = fastrand::Rng::with_seed(seed);
    let workload = Workload::generate(seed, Style::Kinesis, CHAOS);
    assert!(workload.valid_count() >= 50_000 && workload.json_changes > 0);
    let sqs = mall_test_support::sqs_endpoint().await;
    let stream = Stream::create(4).await;

    let mut catalog =
        Some(Catalog::start(TestDatabase::new(Engine::Postgres).await, None, quick_drain).await);
    let catalog_ref = catalog.as_ref().expect("started");
    let relay_database = TestDatabase::new(Engine::Postgres).await;
    let front = Front::start(catalog_ref.addr).await;
    let mut settings = base_settings(&relay_database, &front);
    settings.extend(sqs_settings(&sqs));
    // One name across restarts, as a restarted container keeps its pod's name: the new process
    // picks up its own leases at once.
    settings.extend(stream.relay_settings("chaos-relay"));
    let mut relay = RelayProcess::start("relay", relay::env(&settings)).await;
    let watch = Watch::start(catalog_ref.addr).await;

    let records = workload.items.len();
    let (put, progress) = channel::channel(0);
    let producer = tokio::spawn(publish::put_kinesis(
        stream.client.clone(),
        stream.name.clone(),
        workload.items.clone(),
        2_000.0,
        put,
    ));
    run_chaos(
        schedule_with_database_cuts(records, &mut rng),
        Duration::from_millis(400),
        progress,
        &mut relay,
        CatalogSide {
            catalog: &mut catalog,
            front: &front,
        },
        &watch,
        &mut rng,
    )
    .await;
    let put_again = producer.await.expect("the producer completes");
    let (kills, changes, streams) =
        drain_and_verify(&workload, catalog, relay, &watch, "kinesis:").await;
    println!(
        "{kills} kills, {put_again} records put again, {} valid JSON records, {changes} changes \
         watched over {streams} streams",
        workload.json_changes
    );
}

// ---------------------------------------------------------------------------------------------
// Two replicas

/// Shards owned by each replica, per GetRelayStatus.
async fn owners(relay: &RelayProcess) -> Vec<(String, String)> {
    relay
        .status()
        .await
        .shards
        .into_iter()
        .map(|s| (s.shard_id, s.lease_owner))
        .collect()
}

/// Waits until GetRelayStatus (asked of `relay`) shows `want(a's shards, b's shards)`.
async fn wait_for_split(
    what: &str,
    relay: &RelayProcess,
    want: impl Fn(usize, usize) -> bool,
) -> Vec<(String, String)> {
    wait_until(what, Duration::from_secs(30), || async {
        let owners = owners(relay).await;
        let held = |who: &str| owners.iter().filter(|(_, o)| o == who).count();
        want(held("relay-a"), held("relay-b")).then_some(owners)
    })
    .await
}

/// Puts the next `1/waves` of `items` into `stream` at once, in the background.
fn put_wave(
    stream: &Stream,
    items: &mut std::vec::IntoIter<workload::Item>,
    size: usize,
) -> tokio::task::JoinHandle<usize> {
    let wave: Vec<_> = items.take(size).collect();
    tokio::spawn(publish::put_kinesis(
        stream.client.clone(),
        stream.name.clone(),
        wave,
        f64::INFINITY,
        channel::channel(0).0,
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_split_the_shards_and_one_takes_over_when_the_other_stops() {
    // Queue: the embedded queue in the replicas' shared PostgreSQL database, which consumers
    // of several processes use at once.
    mall_test_support::init_logging();
    let seed = seed();
    let workload = Workload::generate(
        seed,
        Style::Kinesis,
        Size {
            products: 2_000,
            malformed: 0,
        },
    );
    let stream = Stream::create(4).await;
    let catalog =
        Catalog::start(TestDatabase::new(Engine::Postgres).await, None, quick_drain).await;
    let relay_database = TestDatabase::new(Engine::Postgres).await;
    let front = Front::start(catalog.addr).await;
    let settings = |replica: &str| {
        let mut settings = base_settings(&relay_database, &front);
        settings.extend(stream.relay_settings(replica));
        relay::env(&settings)
    };
    let start = std::time::Instant::now();
    let elapsed = || format!("{:>6.1}s", start.elapsed().as_secs_f64());
    let watch = Watch::start(catalog.addr).await;
    // Records go in five waves, one in each arrangement of leases, each put while the
    // relays are still busy with the one before.
    let wave = workload.items.len().div_ceil(5);
    let mut items = workload.items.clone().into_iter();
    let mut waves = Vec::new();

    let mut a = RelayProcess::start("relay-a", settings("relay-a")).await;
    waves.push(put_wave(&stream, &mut items, wave));
    wait_for_split("relay-a holds every shard", &a, |a, _| a == 4).await;

    let mut b = RelayProcess::start("relay-b", settings("relay-b")).await;
    let split = wait_for_split("the replicas hold two shards each", &b, |a, b| {
        a == 2 && b == 2
    })
    .await;
    println!("{} split: {split:?}", elapsed());
    waves.push(put_wave(&stream, &mut items, wave));

    // A clean stop: relay-a releases its leases and relay-b takes them at once.
    let status = a.terminate().await;
    assert!(
        status.success(),
        "relay-a stops cleanly on SIGTERM: {status}"
    );
    let taken = wait_for_split("relay-b holds every shard", &b, |a, b| a == 0 && b == 4).await;
    println!("{} after SIGTERM of relay-a: {taken:?}", elapsed());
    waves.push(put_wave(&stream, &mut items, wave));

    a.restart().await;
    let split = wait_for_split("the replicas split the shards again", &a, |a, b| {
        a == 2 && b == 2
    })
    .await;
    println!("{} split again: {split:?}", elapsed());
    waves.push(put_wave(&stream, &mut items, wave));

    // A crash: relay-b's leases stay until they expire (3s), then relay-a takes them; what
    // relay-b had in flight comes back from the queue when its visibility runs out.
    let held_by_b: BTreeSet<String> = split
        .iter()
        .filter(|(_, owner)| owner == "relay-b")
        .map(|(shard, _)| shard.clone())
        .collect();
    b.kill().await;
    waves.push(put_wave(&stream, &mut items, wave));
    let taken = wait_for_split("relay-a holds every shard", &a, |a, b| a == 4 && b == 0).await;
    assert!(
        held_by_b
            .iter()
            .all(|shard| taken.iter().any(|(s, o)| s == shard && o == "relay-a")),
        "relay-b's shards {held_by_b:?} moved to relay-a: {taken:?}"
    );
    println!("{} after SIGKILL of relay-b: {taken:?}", elapsed());

    for wave in waves {
        wave.await.expect("a wave is put");
    }
    assert!(items.next().is_none(), "every record was put");
    watch.wait_for(&workload.expected, DRAIN_TIMEOUT).await;
    println!("{} drained", elapsed());
    verify(&workload, &catalog, &a, &watch, "kinesis:").await;
    let status = a.terminate().await;
    assert!(status.success(), "relay-a stops cleanly: {status}");
}
