//! Chaos: two replicas of the real `member-export` binary on one PostgreSQL database (the
//! embedded queue in it, so they share it), the webhook dialect (it carries idempotency
//! keys), a partner that fails 10 % of requests with a 5xx, leaves 5 % unanswered and has
//! bursts of 429s, and replicas SIGKILLed three times while 100,000 changes of 20,000 members
//! are queued and delivered. A fifth of the members never consent; a tenth withdraw midway.
//!
//! Then, against a model of what was sent: every consented member's newest version was
//! delivered with exactly its consented contact data; nobody without consent was ever
//! delivered; every withdrawal of a member the partner had was delivered as an opt-out;
//! duplicate deliveries are at most 1 % and each carries the idempotency key of the first;
//! at most the alert cap was alerted; nothing was dead-lettered; and no e-mail, phone number
//! or name appears in any log line of any incarnation or in `/metrics`. (Spans are searched
//! for personal data by tests/privacy.rs, which captures them at TRACE in process; these
//! child processes export none.)

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    num::NonZeroU32,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use mall_proto::member::v1::{
    Consent, EnqueueMemberChangesRequest, GetDeliveryStatsRequest, MarketingProfile, MemberChange,
    member_export_service_client::MemberExportServiceClient,
};
use mall_test_support::{Engine, TestDatabase, probe};
use member_export::simulator::{Accepted, Behaviour, Simulator};
use tonic::transport::Channel;

const MEMBERS: usize = 20_000;
const VERSIONS: u64 = 5;
const KEY: &str = "chaos-api-key";
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const ALERT_CAP: usize = 10;
/// A bound on the whole run, so that a delivery that never comes fails the test rather than
/// hanging it; not a speed target (benches/member.rs measures speed). It took 80 s on an
/// idle 2-core Xeon and 200–240 s on a 2-core EPYC host about twice as slow at everything
/// (4 minutes was once too short there); nextest's own limit for the chaos tests
/// (.config/nextest.toml) is 10 minutes.
const CONVERGED_WITHIN: Duration = Duration::from_secs(480);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Never consents: never sent anything.
    NoConsent,
    /// Consents for versions 1–2, withdraws from version 3 on.
    Withdraws,
    /// Consents throughout (SMS consent changes from version to version).
    Consented,
}

fn kind(i: usize) -> Kind {
    if i.is_multiple_of(5) {
        Kind::NoConsent
    } else if i % 10 == 1 {
        Kind::Withdraws
    } else {
        Kind::Consented
    }
}

fn consent(i: usize, version: u64) -> (bool, bool) {
    match kind(i) {
        Kind::NoConsent => (false, false),
        Kind::Withdraws if version >= 3 => (false, false),
        Kind::Withdraws => (true, false),
        Kind::Consented => (true, (i as u64 + version).is_multiple_of(2)),
    }
}

fn change(i: usize, version: u64) -> MemberChange {
    let (email, sms) = consent(i, version);
    MemberChange {
        member_id: format!("C-{i:05}"),
        version,
        consent: Some(Consent {
            marketing_email: email,
            marketing_sms: sms,
            ..Consent::default()
        }),
        profile: Some(MarketingProfile {
            email: format!("chaos.person{i}@example.net"),
            phone: format!("+8210777{i:05}"),
            display_name: format!("Chaosname Member{i}"),
            preferred_language: "ko".into(),
            ..MarketingProfile::default()
        }),
        ..MemberChange::default()
    }
}

/// What every piece of personal data in this test contains.
const PERSONAL: [&str; 3] = ["@example.net", "+8210777", "Chaosname"];

/// One replica: the binary, its ports, its logs (every incarnation appends).
struct Replica {
    grpc: SocketAddr,
    admin: SocketAddr,
    log: PathBuf,
    env: Vec<(String, String)>,
    child: Option<tokio::process::Child>,
}

impl Replica {
    fn new(name: &str, dir: &Path, env: &[(String, String)]) -> Self {
        let port = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
        };
        Self {
            grpc: port(),
            admin: port(),
            log: dir.join(format!("{name}.log")),
            env: env.to_vec(),
            child: None,
        }
    }

    async fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("a log file");
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_member-export"))
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("MEMBER_EXPORT__SERVER__LISTEN_ADDR", self.grpc.to_string())
            .env("MEMBER_EXPORT__SERVER__ADMIN_ADDR", self.admin.to_string())
            .stdout(log.try_clone().expect("a log file"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("member-export starts");
        self.child = Some(child);
        let started = Instant::now();
        while tokio::net::TcpStream::connect(self.grpc).await.is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "replica did not listen"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL: no shutdown, no drain, whatever was in flight stays where it was.
    async fn kill(&mut self, metrics: &mut String) {
        metrics.push_str(&probe::http_get(self.admin, "/metrics").await.1);
        let mut child = self.child.take().expect("running");
        child.kill().await.expect("killed");
    }

    fn client(&self) -> MemberExportServiceClient<Channel> {
        MemberExportServiceClient::new(probe::channel(self.grpc))
    }
}

/// Enqueues `changes` through whichever replica answers, retrying with the same request id
/// (a replica may be dead, or die mid-call).
async fn enqueue(
    clients: &[MemberExportServiceClient<Channel>],
    request_id: String,
    changes: Vec<MemberChange>,
) {
    let started = Instant::now();
    for attempt in 0.. {
        let mut client = clients[attempt % clients.len()].clone();
        let request = EnqueueMemberChangesRequest {
            request_id: request_id.clone(),
            changes: changes.clone(),
        };
        match tokio::time::timeout(
            Duration::from_secs(10),
            client.enqueue_member_changes(request),
        )
        .await
        {
            Ok(Ok(_)) => return,
            _ => {
                assert!(
                    started.elapsed() < Duration::from_secs(180),
                    "EnqueueMemberChanges kept failing for 3 minutes"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

async fn enqueue_versions(clients: Vec<MemberExportServiceClient<Channel>>, versions: Vec<u64>) {
    for version in versions {
        let mut calls = tokio::task::JoinSet::new();
        for chunk in 0..MEMBERS / 1_000 {
            let clients = clients.clone();
            calls.spawn(async move {
                let changes = (chunk * 1_000..(chunk + 1) * 1_000)
                    .map(|i| change(i, version))
                    .collect();
                enqueue(&clients, format!("chaos-{version}-{chunk}"), changes).await;
            });
            // Two calls in flight: the replicas keep delivering meanwhile.
            if calls.len() >= 2 {
                calls.join_next().await;
            }
        }
        while calls.join_next().await.is_some() {}
    }
}

/// Whether the partner's state is the model's final state (see the module docs).
fn converged(members: &BTreeMap<String, Accepted>) -> bool {
    (0..MEMBERS).all(|i| {
        let got = members.get(&format!("C-{i:05}"));
        match kind(i) {
            Kind::NoConsent => got.is_none(),
            Kind::Consented => got.is_some_and(|m| m.version == VERSIONS),
            Kind::Withdraws => got.is_none_or(|m| m.version == VERSIONS),
        }
    })
}

fn faulty(rate_limit: Option<u32>) -> Behaviour {
    Behaviour {
        error_rate: 0.10,
        hang_rate: 0.05,
        latency: (Duration::ZERO, Duration::from_millis(5)),
        rate_limit: rate_limit.and_then(NonZeroU32::new),
        ..Behaviour::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_killed_three_times_under_partner_faults_lose_nothing_and_leak_nothing() {
    mall_test_support::init_logging();
    let database = TestDatabase::new(Engine::Postgres).await;
    let simulator = Simulator::start(
        "127.0.0.1:0".parse().expect("addr"),
        KEY,
        SECRET,
        faulty(None),
    )
    .await
    .expect("simulator");
    let dir = tempfile::tempdir().expect("a directory");
    let env: Vec<(String, String)> = [
        ("DATABASE__URL", database.url().to_owned()),
        ("PARTNER__KIND", "webhook".into()),
        ("PARTNER__URL", simulator.webhook_url().to_string()),
        ("PARTNER__SECRET", SECRET.into()),
        ("PARTNER__REQUEST_TIMEOUT", "300ms".into()),
        ("DELIVERY__WORKERS", "2".into()),
        ("DELIVERY__MAX_CONCURRENCY", "32".into()),
        ("DELIVERY__RATE_LIMIT_PER_SECOND", "2000".into()),
        ("DELIVERY__RATE_LIMIT_RECOVERY", "3s".into()),
        ("DELIVERY__RETRY_INITIAL", "50ms".into()),
        ("DELIVERY__RETRY_MAX", "1s".into()),
        ("DELIVERY__RECEIVE_WAIT", "100ms".into()),
        ("DELIVERY__CLAIM_TIMEOUT", "3s".into()),
        ("QUEUE__VISIBILITY_TIMEOUT", "5s".into()),
        ("ALERTS__WEBHOOK_URL", simulator.alerts_url()),
        ("ALERTS__MAX_PER_WINDOW", ALERT_CAP.to_string()),
        ("TELEMETRY__LOG_FORMAT", "json".into()),
        ("TELEMETRY__LOG_FILTER", "info,member_export=debug".into()),
    ]
    .into_iter()
    .map(|(k, v)| (format!("MEMBER_EXPORT__{k}"), v))
    .collect();
    let mut replicas = [
        Replica::new("first", dir.path(), &env),
        Replica::new("second", dir.path(), &env),
    ];
    for replica in &mut replicas {
        replica.start().await;
    }
    let clients: Vec<_> = replicas.iter().map(Replica::client).collect();
    let mut metrics = String::new();
    let started = Instant::now();

    // 429 bursts: one second in five the partner takes only 50 requests/s.
    let bursts = {
        let simulator = simulator.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(4)).await;
                simulator.set_behaviour(faulty(Some(50)));
                tokio::time::sleep(Duration::from_secs(1)).await;
                simulator.set_behaviour(faulty(None));
            }
        })
    };

    // Versions 1–2 of everyone, a kill while they are delivered, then let most arrive (so
    // the withdrawals that follow are of members the partner has).
    enqueue_versions(clients.clone(), vec![1, 2]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    replicas[0].kill(&mut metrics).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    replicas[0].start().await;
    let consented_at_2 = |members: &BTreeMap<String, Accepted>| {
        (0..MEMBERS)
            .filter(|&i| kind(i) != Kind::NoConsent)
            .filter(|&i| {
                members
                    .get(&format!("C-{i:05}"))
                    .is_some_and(|m| m.version >= 2)
            })
            .count()
    };
    let wanted = (0..MEMBERS).filter(|&i| kind(i) != Kind::NoConsent).count() * 9 / 10;
    while consented_at_2(&simulator.members()) < wanted {
        assert!(
            started.elapsed() < CONVERGED_WITHIN / 2,
            "phase 1 not delivered after {:?}",
            CONVERGED_WITHIN / 2
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Versions 3–5 (the withdrawals among them), with two more kills while they flow.
    let phase_two = tokio::spawn(enqueue_versions(clients.clone(), vec![3, 4, 5]));
    tokio::time::sleep(Duration::from_secs(2)).await;
    replicas[1].kill(&mut metrics).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    replicas[1].start().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    replicas[0].kill(&mut metrics).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    replicas[0].start().await;
    phase_two.await.expect("every change enqueued");

    while !converged(&simulator.members()) {
        assert!(
            started.elapsed() < CONVERGED_WITHIN,
            "not converged after {CONVERGED_WITHIN:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    bursts.abort();
    // Whatever is still in flight lands (a late duplicate counts too).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let members = simulator.members();
    eprintln!(
        "converged after {:?}; partner counts {:?}",
        started.elapsed(),
        simulator.counts()
    );

    // The model: every member's final state.
    let mut withdrawn_delivered = 0;
    for i in 0..MEMBERS {
        let id = format!("C-{i:05}");
        let got = members.get(&id);
        match kind(i) {
            Kind::NoConsent => assert!(got.is_none(), "{id} was sent without consent"),
            Kind::Consented => {
                let m = got.expect("delivered");
                let (email, sms) = consent(i, VERSIONS);
                assert_eq!(m.version, VERSIONS, "{id}");
                assert!(!m.opt_out && !m.erased, "{id}");
                assert_eq!((m.consent.email, m.consent.sms), (email, sms), "{id}");
                assert_eq!((m.has_email, m.has_phone), (email, sms), "{id}");
            }
            Kind::Withdraws => {
                if let Some(m) = got {
                    withdrawn_delivered += 1;
                    assert_eq!(m.version, VERSIONS, "{id}");
                    assert!(m.opt_out && !m.consent.any(), "{id}: not an opt-out");
                    assert!(
                        !m.has_email && !m.has_phone,
                        "{id}: contact data in an opt-out"
                    );
                }
            }
        }
    }
    let withdrawing = (0..MEMBERS).filter(|&i| kind(i) == Kind::Withdraws).count();
    assert!(
        withdrawn_delivered * 10 >= withdrawing * 9,
        "only {withdrawn_delivered} of {withdrawing} withdrawals reached a partner that had them"
    );

    // Duplicates: a version delivered again, with the key of its first delivery.
    let (mut deliveries, mut duplicates) = (0, 0);
    for (id, m) in &members {
        deliveries += m.versions.len();
        let mut first_key: BTreeMap<u64, &str> = BTreeMap::new();
        for (version, key) in m.versions.iter().zip(&m.idempotency_keys) {
            match first_key.get(version) {
                Some(first) => {
                    duplicates += 1;
                    assert_eq!(first, key, "{id}: a duplicate with another idempotency key");
                }
                None => {
                    first_key.insert(*version, key);
                }
            }
        }
    }
    assert!(
        duplicates * 100 <= deliveries,
        "{duplicates} duplicates in {deliveries} deliveries"
    );
    let alerts = simulator.alerts();
    assert!(
        alerts.len() <= ALERT_CAP,
        "{} alerts: {alerts:?}",
        alerts.len()
    );
    for replica in &replicas {
        let stats = replica
            .client()
            .get_delivery_stats(GetDeliveryStatsRequest {})
            .await
            .expect("stats")
            .into_inner()
            .stats
            .expect("set");
        assert_eq!(stats.dead_letter_count, 0, "healthy work was dead-lettered");
        metrics.push_str(&probe::http_get(replica.admin, "/metrics").await.1);
    }

    // No personal data in any log line of any incarnation, nor in the metrics.
    let mut logs = String::new();
    for replica in &replicas {
        logs.push_str(&std::fs::read_to_string(&replica.log).expect("a log"));
    }
    assert!(logs.contains("member-export"), "the logs were captured");
    let words: BTreeSet<&str> = PERSONAL.into_iter().collect();
    for word in words {
        assert!(
            !logs.contains(word),
            "a log line holds personal data ({word})"
        );
        assert!(
            !metrics.contains(word),
            "/metrics holds personal data ({word})"
        );
    }
    eprintln!(
        "{deliveries} deliveries, {duplicates} duplicates, {} alerts, {} bytes of logs",
        alerts.len(),
        logs.len()
    );
}
