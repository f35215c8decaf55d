//! Failover jobs end to end over gRPC, against the partner simulator: a time range resent
//! with the consent of now, the failed deliveries resent, one job at a time, cancellation,
//! WatchJob to the end, bad input, and a job whose replica dies midway resumed by another
//! from its checkpoint.

mod common;

use std::{collections::BTreeSet, time::Duration};

use common::{Dialect, Running, change, delivered_at, drained, enqueue, start, start_on};
use mall_proto::member::v1::{
    CancelJobRequest, FailedDeliveriesScope, GetJobRequest, Job, JobKind, JobState,
    ListFailedDeliveriesRequest, MemberChange, StartFailoverJobRequest, TimeRangeScope,
    WatchJobRequest, member_export_service_client::MemberExportServiceClient,
    start_failover_job_request::Scope,
};
use mall_test_support::{Engine, TestDatabase, probe, wait_until};
use member_export::{
    App, Settings,
    partner::PartnerSettings,
    simulator::{Behaviour, Simulator},
};
use secrecy::SecretString;
use tokio_stream::StreamExt as _;
use tonic::Code;

const HOUR: i64 = 3_600;

fn now_seconds() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs(),
    )
    .expect("fits")
}

fn at(seconds: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds, nanos: 0 }
}

fn changed_at(mut change: MemberChange, seconds: i64) -> MemberChange {
    change.change_time = Some(at(seconds));
    change
}

fn time_range(start: i64, end: Option<i64>) -> Option<Scope> {
    Some(Scope::TimeRange(TimeRangeScope {
        start_time: Some(at(start)),
        end_time: end.map(at),
    }))
}

async fn start_job(running: &mut Running, request_id: &str, scope: Option<Scope>) -> Job {
    running
        .client
        .start_failover_job(StartFailoverJobRequest {
            request_id: request_id.into(),
            scope,
        })
        .await
        .expect("started")
        .into_inner()
        .job
        .expect("set")
}

async fn get_job(
    client: &mut MemberExportServiceClient<tonic::transport::Channel>,
    id: &str,
) -> Job {
    client
        .get_job(GetJobRequest { job_id: id.into() })
        .await
        .expect("job")
        .into_inner()
        .job
        .expect("set")
}

/// Follows WatchJob to its end; every message it sent.
async fn watch(running: &mut Running, id: &str) -> Vec<Job> {
    let mut stream = running
        .client
        .watch_job(WatchJobRequest { job_id: id.into() })
        .await
        .expect("watch")
        .into_inner();
    let mut seen = Vec::new();
    let followed = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(message) = stream.next().await {
            seen.push(message.expect("a message").job.expect("set"));
        }
    })
    .await;
    assert!(followed.is_ok(), "WatchJob did not end: {seen:?}");
    seen
}

async fn a_time_range_job_resends_what_is_in_range_as_it_is_now(engine: Engine) {
    let mut running = start(engine, Dialect::Groobee, Behaviour::default()).await;
    let now = now_seconds();
    enqueue(
        &mut running,
        vec![
            changed_at(change("M-OLD", 1, true, false), now - 3 * HOUR),
            changed_at(change("M-IN-1", 1, true, false), now - 2 * HOUR),
            changed_at(change("M-IN-2", 1, true, true), now - HOUR),
            // Never delivered and without consent: nothing to send.
            changed_at(change("M-NONE", 1, false, false), now - HOUR),
            changed_at(change("M-WITHDRAWN", 1, true, false), now - HOUR),
        ],
    )
    .await;
    delivered_at(&running, "M-WITHDRAWN", 1).await;
    enqueue(
        &mut running,
        vec![changed_at(
            change("M-WITHDRAWN", 2, false, false),
            now - HOUR + 1,
        )],
    )
    .await;
    for (member, version) in [
        ("M-OLD", 1),
        ("M-IN-1", 1),
        ("M-IN-2", 1),
        ("M-WITHDRAWN", 2),
    ] {
        delivered_at(&running, member, version).await;
    }
    drained(&running).await;
    let before = running.simulator.members();

    let job = start_job(&mut running, "job-1", time_range(now - 5 * HOUR / 2, None)).await;
    assert_eq!(job.kind, JobKind::TimeRange as i32);
    assert!(!job.job_id.is_empty());
    let seen = watch(&mut running, &job.job_id).await;
    let last = seen.last().expect("at least the current state");
    assert_eq!(last.state, JobState::Succeeded as i32, "{seen:?}");
    assert_eq!(
        (last.total_count, last.processed_count, last.failed_count),
        (4, 4, 0)
    );
    // The open end was fixed when the job started.
    let Some(mall_proto::member::v1::job::Scope::TimeRange(scope)) = &last.scope else {
        panic!("a time range: {last:?}");
    };
    assert!(scope.end_time.is_some_and(|end| end.seconds >= now));

    let after = running.simulator.members();
    let sent_again = |member: &str| after[member].deliveries - before[member].deliveries;
    assert_eq!(sent_again("M-OLD"), 0, "out of range");
    assert_eq!(sent_again("M-IN-1"), 1);
    assert_eq!(sent_again("M-IN-2"), 1);
    assert!(after["M-IN-2"].has_email && after["M-IN-2"].has_phone);
    assert_eq!(
        sent_again("M-WITHDRAWN"),
        1,
        "resent as what it is now: an opt-out"
    );
    assert!(after["M-WITHDRAWN"].opt_out && !after["M-WITHDRAWN"].has_email);
    assert!(!after.contains_key("M-NONE"), "never sent without consent");

    // The same request id is the same job; GetJob agrees; a finished job cannot be cancelled.
    let again = start_job(&mut running, "job-1", time_range(now - HOUR, None)).await;
    assert_eq!(again.job_id, job.job_id);
    let got = get_job(&mut running.client, &job.job_id).await;
    assert_eq!(got.state, JobState::Succeeded as i32);
    let refused = running
        .client
        .cancel_job(CancelJobRequest {
            job_id: job.job_id.clone(),
        })
        .await
        .expect_err("finished");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    let (_, metrics) = probe::http_get(running.admin, "/metrics").await;
    assert!(
        metrics.contains("mall_member_export_failover_jobs_total{state=\"succeeded\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("mall_member_export_failover_job_members_total{outcome=\"delivered\"} 3"),
        "{metrics}"
    );
}

async fn a_failed_deliveries_job_resends_the_refused_members(engine: Engine) {
    let behaviour = Behaviour {
        refused_members: BTreeSet::from(["M-BAD".to_owned()]),
        ..Behaviour::default()
    };
    let mut running = start(engine, Dialect::Groobee, behaviour).await;
    enqueue(
        &mut running,
        vec![
            change("M-BAD", 4, true, false),
            change("M-OK", 1, true, false),
        ],
    )
    .await;
    delivered_at(&running, "M-OK", 1).await;
    drained(&running).await;
    let failed = running
        .client
        .list_failed_deliveries(ListFailedDeliveriesRequest::default())
        .await
        .expect("listed")
        .into_inner();
    assert_eq!(failed.failed_deliveries.len(), 1);
    // The member's data was fixed on the platform's side; the job resends it.
    running.simulator.set_behaviour(Behaviour::default());
    let job = start_job(
        &mut running,
        "",
        Some(Scope::FailedDeliveries(FailedDeliveriesScope {
            since: None,
        })),
    )
    .await;
    assert_eq!(job.kind, JobKind::FailedDeliveries as i32);
    let seen = watch(&mut running, &job.job_id).await;
    let last = seen.last().expect("a state");
    assert_eq!(last.state, JobState::Succeeded as i32, "{seen:?}");
    assert_eq!(
        (last.total_count, last.processed_count, last.failed_count),
        (1, 1, 0)
    );
    delivered_at(&running, "M-BAD", 4).await;
    assert_eq!(
        running.simulator.members()["M-OK"].deliveries,
        1,
        "not in scope"
    );
}

#[tokio::test]
async fn sqlite_time_range_job() {
    a_time_range_job_resends_what_is_in_range_as_it_is_now(Engine::Sqlite).await;
}

#[tokio::test]
async fn postgres_time_range_job() {
    a_time_range_job_resends_what_is_in_range_as_it_is_now(Engine::Postgres).await;
}

#[tokio::test]
async fn sqlite_failed_deliveries_job() {
    a_failed_deliveries_job_resends_the_refused_members(Engine::Sqlite).await;
}

#[tokio::test]
async fn postgres_failed_deliveries_job() {
    a_failed_deliveries_job_resends_the_refused_members(Engine::Postgres).await;
}

#[tokio::test]
async fn jobs_run_one_at_a_time_and_cancel() {
    let database = TestDatabase::new(Engine::Sqlite).await;
    let mut running = start_on(
        database.url(),
        Dialect::Groobee,
        Behaviour::default(),
        |settings| {
            settings.delivery.rate_limit_per_second = 10;
            settings.jobs.page_size = 10;
            settings.jobs.poll_interval = Duration::from_millis(100);
        },
    )
    .await;
    let now = now_seconds();
    let changes: Vec<MemberChange> = (0..300)
        .map(|i| changed_at(change(&format!("M-{i:03}"), 1, true, false), now - HOUR))
        .collect();
    enqueue(&mut running, changes).await;
    drained(&running).await;
    // 30 pages at 10 requests/s: the first job runs for seconds.
    let first = start_job(&mut running, "", time_range(now - 2 * HOUR, None)).await;
    let second = start_job(&mut running, "", time_range(now - 2 * HOUR, None)).await;
    assert_eq!(first.state, JobState::Pending as i32);
    let mut client = running.client.clone();
    wait_until("the first job runs", Duration::from_secs(10), || {
        let mut client = client.clone();
        let id = first.job_id.clone();
        async move {
            let job = get_job(&mut client, &id).await;
            (job.state == JobState::Running as i32 && job.processed_count > 0).then_some(())
        }
    })
    .await;
    assert_eq!(
        get_job(&mut client, &second.job_id).await.state,
        JobState::Pending as i32,
        "one job at a time"
    );
    // A pending job cancelled never runs.
    let cancelled = running
        .client
        .cancel_job(CancelJobRequest {
            job_id: second.job_id.clone(),
        })
        .await
        .expect("cancelled")
        .into_inner()
        .job
        .expect("set");
    assert_eq!(cancelled.state, JobState::Cancelled as i32);
    // A running job cancelled stops after the requests in flight: nothing is sent after.
    let stopped = running
        .client
        .cancel_job(CancelJobRequest {
            job_id: first.job_id.clone(),
        })
        .await
        .expect("cancelled")
        .into_inner()
        .job
        .expect("set");
    assert_eq!(stopped.state, JobState::Cancelled as i32);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let settled = running.simulator.counts().requests;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        running.simulator.counts().requests,
        settled,
        "a cancelled job kept sending"
    );
    assert!(
        settled < 30,
        "{settled} requests: the job was not stopped midway"
    );
    let third = start_job(&mut running, "", time_range(now - 2 * HOUR, None)).await;
    let seen = watch(&mut running, &third.job_id).await;
    assert_eq!(
        seen.last().expect("a state").state,
        JobState::Succeeded as i32
    );
    // Between the first message and the last, only real changes (no lease renewals).
    for pair in seen.windows(2) {
        assert_ne!(pair[0], pair[1], "a message that changed nothing");
    }
    let first = get_job(&mut client, &first.job_id).await;
    assert_eq!(first.state, JobState::Cancelled as i32);
    assert!(first.processed_count < 300, "{first:?}");
    let second = get_job(&mut client, &second.job_id).await;
    assert_eq!(
        (second.state, second.processed_count),
        (JobState::Cancelled as i32, 0)
    );
    // The watch of a finished job ends after one message.
    let seen = watch(&mut running, &second.job_id).await;
    assert_eq!(seen.len(), 1);
}

#[tokio::test]
async fn bad_job_requests_name_the_field() {
    let mut running = start(Engine::Sqlite, Dialect::Groobee, Behaviour::default()).await;
    let now = now_seconds();
    let cases: Vec<(StartFailoverJobRequest, &str)> = vec![
        (StartFailoverJobRequest::default(), "scope"),
        (
            StartFailoverJobRequest {
                scope: Some(Scope::TimeRange(TimeRangeScope::default())),
                ..Default::default()
            },
            "time_range.start_time",
        ),
        (
            StartFailoverJobRequest {
                scope: time_range(now + HOUR, None),
                ..Default::default()
            },
            "time_range.start_time",
        ),
        (
            StartFailoverJobRequest {
                scope: time_range(now - HOUR, Some(now - 2 * HOUR)),
                ..Default::default()
            },
            "time_range.end_time",
        ),
        (
            StartFailoverJobRequest {
                request_id: "r".repeat(129),
                scope: time_range(now - HOUR, None),
            },
            "request_id",
        ),
    ];
    for (request, field) in cases {
        let status = running
            .client
            .start_failover_job(request)
            .await
            .expect_err("invalid");
        assert_eq!(status.code(), Code::InvalidArgument);
        let details = tonic_types::StatusExt::get_error_details(&status);
        let violations = details
            .bad_request()
            .expect("field violations")
            .field_violations
            .clone();
        assert!(
            violations.iter().any(|v| v.field == field),
            "{field}: {violations:?}"
        );
    }
    let status = running
        .client
        .get_job(GetJobRequest::default())
        .await
        .expect_err("invalid");
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = running
        .client
        .get_job(GetJobRequest {
            job_id: "no-such-job".into(),
        })
        .await
        .expect_err("absent");
    assert_eq!(status.code(), Code::NotFound);
    let status = running
        .client
        .watch_job(WatchJobRequest {
            job_id: "no-such-job".into(),
        })
        .await
        .expect_err("absent");
    assert_eq!(status.code(), Code::NotFound);
    let status = running
        .client
        .cancel_job(CancelJobRequest::default())
        .await
        .expect_err("invalid");
    assert_eq!(status.code(), Code::InvalidArgument);
}

/// A replica in a runtime of its own, so it can die at once: dropping the runtime stops
/// every task where it stands, with no graceful shutdown (no lease handed over, claims
/// left in place), as a SIGKILL would.
struct Replica {
    grpc: std::net::SocketAddr,
    kill: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Replica {
    fn start(settings: Settings) -> Self {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (kill, killed) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async move {
                let app = App::build(settings).await.expect("app builds");
                addr_tx.send(app.grpc_addr()).expect("test waits");
                tokio::spawn(app.run_until(std::future::pending()));
                let _ = killed.await;
            });
            runtime.shutdown_background();
        });
        let grpc = addr_rx.recv().expect("the replica started");
        Self {
            grpc,
            kill: Some(kill),
            thread: Some(thread),
        }
    }

    fn kill(mut self) {
        let _ = self.kill.take().expect("alive").send(());
        self.thread
            .take()
            .expect("alive")
            .join()
            .expect("thread ends");
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(());
        }
    }
}

#[tokio::test]
async fn a_job_whose_replica_dies_resumes_from_its_checkpoint_on_another() {
    mall_test_support::init_logging();
    let database = TestDatabase::new(Engine::Postgres).await;
    let simulator = Simulator::start(
        "127.0.0.1:0".parse().expect("addr"),
        common::KEY,
        common::SECRET,
        Behaviour::default(),
    )
    .await
    .expect("simulator");
    let settings = {
        let mut settings = Settings::default();
        settings.server.listen_addr = "127.0.0.1:0".parse().expect("addr");
        settings.server.admin_addr = "127.0.0.1:0".parse().expect("addr");
        settings.database.url = database.url().to_owned().into();
        // Only the job sends: what the partner saw is the job's doing.
        settings.delivery.workers = Some(0);
        settings.delivery.rate_limit_per_second = 20;
        settings.delivery.claim_timeout = Duration::from_secs(2);
        settings.jobs.page_size = 50;
        settings.jobs.lease = Duration::from_secs(3);
        settings.jobs.poll_interval = Duration::from_millis(200);
        settings.partner = PartnerSettings {
            request_timeout: Duration::from_millis(500),
            ..PartnerSettings::groobee(simulator.groobee_url(), SecretString::from(common::KEY))
        };
        settings
    };
    let first = Replica::start(settings.clone());
    let mut client = MemberExportServiceClient::new(probe::channel(first.grpc));
    let now = now_seconds();
    for chunk in 0..3 {
        let changes: Vec<MemberChange> = (0..1_000)
            .map(|i| {
                let id = format!("M-{:04}", chunk * 1_000 + i);
                changed_at(change(&id, 2, true, false), now - HOUR)
            })
            .collect();
        client
            .enqueue_member_changes(mall_proto::member::v1::EnqueueMemberChangesRequest {
                request_id: String::new(),
                changes,
            })
            .await
            .expect("enqueued");
    }
    let job = client
        .start_failover_job(StartFailoverJobRequest {
            request_id: String::new(),
            scope: time_range(now - 2 * HOUR, None),
        })
        .await
        .expect("started")
        .into_inner()
        .job
        .expect("set");
    // 60 pages of 50 at 20 requests/s: killed about a third of the way.
    wait_until(
        "a third of the job is done",
        Duration::from_secs(30),
        || {
            let mut client = client.clone();
            let id = job.job_id.clone();
            async move { (get_job(&mut client, &id).await.processed_count >= 1_000).then_some(()) }
        },
    )
    .await;
    first.kill();
    let checkpoint = simulator.counts().accepted;

    let second = Replica::start(settings);
    let mut client = MemberExportServiceClient::new(probe::channel(second.grpc));
    let done = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let job = get_job(&mut client, &job.job_id).await;
            if job.state != JobState::Running as i32 {
                return job;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("the job finishes on the second replica");
    assert_eq!(done.state, JobState::Succeeded as i32, "{done:?}");
    assert_eq!((done.total_count, done.processed_count), (3_000, 3_000));
    let members = simulator.members();
    assert_eq!(members.len(), 3_000, "every member in range was sent");
    assert!(
        members
            .values()
            .all(|m| m.version == 2 && m.deliveries >= 1)
    );
    // Resumed from the checkpoint, not from the start: only the pages in flight when the
    // first replica died were sent twice.
    let twice: u32 = members.values().map(|m| m.deliveries - 1).sum();
    assert!(
        twice <= 50 * 5,
        "{twice} members sent twice (the first replica had {checkpoint} requests accepted)"
    );
}

#[tokio::test]
async fn memberctl_starts_follows_cancels_and_shows_stats() {
    use member_export::cli::{Command, Invocation, JobScope, run};
    let mut running = start(Engine::Sqlite, Dialect::Groobee, Behaviour::default()).await;
    let now = now_seconds();
    enqueue(
        &mut running,
        vec![changed_at(change("M-CLI", 1, true, false), now - HOUR)],
    )
    .await;
    delivered_at(&running, "M-CLI", 1).await;
    let addr = format!("http://{}", running.grpc);
    let mut out = Vec::new();
    let from = chrono::DateTime::from_timestamp(now - 2 * HOUR, 0)
        .expect("a time")
        .to_rfc3339();
    run(
        Invocation {
            addr: addr.clone(),
            tls: Default::default(),
            command: Command::Start {
                scope: JobScope::TimeRange { from, to: None },
                request_id: "cli-1".into(),
                wait: true,
            },
        },
        &mut out,
    )
    .await
    .expect("the job succeeds");
    let text = String::from_utf8(out).expect("text");
    assert!(
        text.lines()
            .last()
            .is_some_and(|l| l.contains("succeeded, 1 of 1 members processed, 0 failed")),
        "{text}"
    );
    assert_eq!(running.simulator.members()["M-CLI"].deliveries, 2);
    let id = text
        .split_whitespace()
        .nth(1)
        .expect("job <id> ...")
        .to_owned();
    // A finished job cannot be cancelled: the service's refusal is the command's error.
    let error = run(
        Invocation {
            addr: addr.clone(),
            tls: Default::default(),
            command: Command::Cancel(id),
        },
        &mut Vec::new(),
    )
    .await
    .expect_err("finished");
    assert!(
        format!("{error:#}").contains("already finished"),
        "{error:#}"
    );
    let mut out = Vec::new();
    run(
        Invocation {
            addr,
            tls: Default::default(),
            command: Command::Stats,
        },
        &mut out,
    )
    .await
    .expect("stats");
    let text = String::from_utf8(out).expect("text");
    assert!(text.contains("rate limit 400.0/s"), "{text}");
}
