//! Failover jobs: resend a time range of members, or the members with failed deliveries,
//! through the delivery path (consent at send time, claims, the shared rate limit, retries).
//!
//! A job is a row of `failover_jobs`. Every replica runs a [`Runner`]; the first unfinished
//! job in creation order is the only one that may run, and the replica holding its lease
//! (`lease_owner`, `lease_until`, renewed every second while it runs) runs it, so jobs run
//! one at a time across replicas. The job reads its scope in keyset pages of `page_size`
//! members (`(change_time, member_id)` for a time range, `member_id` for failed deliveries),
//! sends up to [`PAGES_IN_FLIGHT`] pages at once, and checkpoints the cursor and its counts
//! after each page, in page order, with one conditional update: a job cancelled (its state
//! no longer RUNNING) or taken over (its lease no longer ours) stops there. After a crash
//! the lease expires (`jobs.lease`) and any replica resumes from the checkpoint; a page sent but
//! not checkpointed is sent again (same members, same versions, same idempotency keys).
//! Memory stays bounded by the pages in flight, whatever the scope's size.

use std::{pin::Pin, time::Duration};

use futures::{Stream, StreamExt as _, stream::FuturesOrdered};
use mall_db::Backend;
use mall_grpc::{ServiceError, Violations};
use mall_proto::member::v1::{
    FailedDeliveriesScope, Job, JobKind, JobState, StartFailoverJobRequest, TimeRangeScope,
    WatchJobResponse, job, start_failover_job_request::Scope,
};
use sea_orm::{
    ColumnTrait as _, Condition, ConnectionTrait as _, EntityTrait as _, QueryFilter as _,
    QueryOrder as _, QuerySelect as _,
    sea_query::{Expr, ExprTrait as _},
};
use tokio_util::sync::CancellationToken;

use crate::{
    deliver::{AbortOnDrop, Mode, Round, Workers},
    metrics::MemberMetrics,
    store::{Store, db_error, members, micros_of, now_micros, timestamp},
    validate::MAX_REQUEST_ID_CHARS,
};

/// Pages sent at once by a running job (reading the next while these are sent).
pub const PAGES_IN_FLIGHT: usize = 4;
/// Finished jobs are deleted this long after they finished.
pub const RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);
/// How often a running job renews its lease and looks for a cancellation, and how often
/// WatchJob looks for changes.
const TICK: Duration = Duration::from_secs(1);

/// `failover_jobs`: see the module docs. Times in microseconds since the epoch.
pub mod failover_jobs {
    use sea_orm::entity::prelude::*;

    /// A job: scope, state, counts, checkpoint (`cursor_*`), lease.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "failover_jobs")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub job_id: String,
        pub request_id: Option<String>,
        pub kind: i32,
        pub state: i32,
        pub scope_start: i64,
        pub scope_end: i64,
        pub total_count: i64,
        pub processed_count: i64,
        pub failed_count: i64,
        pub create_time: i64,
        pub update_time: i64,
        pub error: String,
        pub cursor_time: i64,
        pub cursor_member: String,
        pub lease_owner: i64,
        pub lease_until: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

use failover_jobs::{Column as J, Entity as Jobs, Model as JobRow};

const PENDING: i32 = JobState::Pending as i32;
const RUNNING: i32 = JobState::Running as i32;
const SUCCEEDED: i32 = JobState::Succeeded as i32;
const FAILED: i32 = JobState::Failed as i32;
const CANCELLED: i32 = JobState::Cancelled as i32;
const TIME_RANGE: i32 = JobKind::TimeRange as i32;
const FAILED_DELIVERIES: i32 = JobKind::FailedDeliveries as i32;

/// The jobs' RPCs: start, get, watch, cancel.
#[derive(Debug, Clone)]
pub struct JobsApi {
    /// The database.
    pub store: Store,
}

/// A WatchJob stream.
pub type JobStream = Pin<Box<dyn Stream<Item = Result<WatchJobResponse, tonic::Status>> + Send>>;

impl JobsApi {
    /// StartFailoverJob: validates and records a PENDING job (or returns the job of a
    /// `request_id` seen before).
    ///
    /// # Errors
    /// INVALID_ARGUMENT with field violations; UNAVAILABLE or INTERNAL from the database.
    pub async fn start(&self, request: StartFailoverJobRequest) -> Result<Job, ServiceError> {
        let now = now_micros();
        let (kind, start, end) = check_start(&request, now)?;
        let request_id = (!request.request_id.is_empty()).then_some(request.request_id);
        if let Some(id) = &request_id
            && let Some(job) = self.by_request(id).await?
        {
            return Ok(to_proto(&job));
        }
        let row = JobRow {
            job_id: uuid::Uuid::new_v4().simple().to_string(),
            request_id: request_id.clone(),
            kind,
            state: PENDING,
            scope_start: start,
            scope_end: end,
            total_count: 0,
            processed_count: 0,
            failed_count: 0,
            create_time: now,
            update_time: now,
            error: String::new(),
            cursor_time: start,
            cursor_member: String::new(),
            lease_owner: 0,
            lease_until: 0,
        };
        let turn = self.store.turn().await;
        let insert = Jobs::insert(failover_jobs::ActiveModel::from(row.clone()))
            .on_conflict(
                sea_orm::sea_query::OnConflict::column(J::RequestId)
                    .do_nothing()
                    .to_owned(),
            )
            .exec_without_returning(self.store.db())
            .await
            .map_err(|e| db_error(e, "record a job"))?;
        drop(turn);
        if insert == 0 {
            // The same request id, recorded concurrently: its job is the answer.
            if let Some(id) = &request_id
                && let Some(job) = self.by_request(id).await?
            {
                return Ok(to_proto(&job));
            }
        }
        tracing::info!(job = %row.job_id, kind, "failover job created");
        Ok(to_proto(&row))
    }

    /// GetJob.
    ///
    /// # Errors
    /// INVALID_ARGUMENT for an empty id; NOT_FOUND; UNAVAILABLE or INTERNAL.
    pub async fn get(&self, job_id: &str) -> Result<Job, ServiceError> {
        Ok(to_proto(&self.row(job_id).await?))
    }

    /// CancelJob.
    ///
    /// # Errors
    /// INVALID_ARGUMENT for an empty id; NOT_FOUND; FAILED_PRECONDITION for a finished job.
    pub async fn cancel(&self, job_id: &str) -> Result<Job, ServiceError> {
        let row = self.row(job_id).await?;
        let now = now_micros();
        let turn = self.store.turn().await;
        let changed = Jobs::update_many()
            .col_expr(J::State, Expr::value(CANCELLED))
            .col_expr(J::UpdateTime, Expr::value(now))
            .filter(J::JobId.eq(job_id))
            .filter(J::State.is_in([PENDING, RUNNING]))
            .exec(self.store.db())
            .await
            .map_err(|e| db_error(e, "cancel a job"))?
            .rows_affected;
        drop(turn);
        if changed == 0 {
            let row = self.row(job_id).await?;
            return Err(ServiceError::FailedPrecondition {
                reason: "JOB_FINISHED",
                message: format!("job {job_id} already finished ({})", state_name(row.state)),
            });
        }
        tracing::info!(job = %job_id, "failover job cancelled");
        Ok(to_proto(&JobRow {
            state: CANCELLED,
            update_time: now,
            ..row
        }))
    }

    /// WatchJob: the job now, then each change (looked for every second), ending after a
    /// terminal state.
    ///
    /// # Errors
    /// As [`Self::get`], before the stream starts.
    pub async fn watch(&self, job_id: &str) -> Result<JobStream, ServiceError> {
        let first = self.row(job_id).await?;
        let this = self.clone();
        let job_id = job_id.to_owned();
        let stream = futures::stream::unfold(
            (Some(first), None::<JobRow>, false),
            move |(first, mut last, done)| {
                let this = this.clone();
                let job_id = job_id.clone();
                async move {
                    if done {
                        return None;
                    }
                    let mut next = first;
                    let mut failures = 0;
                    while next.is_none() {
                        tokio::time::sleep(TICK).await;
                        match this.row(&job_id).await {
                            // What a caller sees changed (not the lease's renewals).
                            Ok(row)
                                if last.as_ref().is_none_or(|l| to_proto(l) != to_proto(&row)) =>
                            {
                                next = Some(row);
                            }
                            Ok(_) => failures = 0,
                            // The database is away for a moment: the job goes on, and so
                            // does the watch (for a while).
                            Err(ServiceError::Unavailable(_)) if failures < 30 => failures += 1,
                            Err(error) => {
                                return Some((Err(tonic::Status::from(error)), (None, last, true)));
                            }
                        }
                    }
                    let row = next.expect("set above");
                    let finished = is_finished(row.state);
                    let message = WatchJobResponse {
                        job: Some(to_proto(&row)),
                    };
                    last = Some(row);
                    Some((Ok(message), (None, last, finished)))
                }
            },
        );
        Ok(Box::pin(stream))
    }

    async fn row(&self, job_id: &str) -> Result<JobRow, ServiceError> {
        if job_id.is_empty() {
            return Err(ServiceError::invalid("job_id", "must be set"));
        }
        Jobs::find_by_id(job_id.to_owned())
            .one(self.store.db())
            .await
            .map_err(|e| db_error(e, "read a job"))?
            .ok_or_else(|| ServiceError::NotFound {
                resource: "job",
                name: job_id.to_owned(),
            })
    }

    async fn by_request(&self, request_id: &str) -> Result<Option<JobRow>, ServiceError> {
        Jobs::find()
            .filter(J::RequestId.eq(request_id))
            .one(self.store.db())
            .await
            .map_err(|e| db_error(e, "read a job"))
    }
}

/// Checks a StartFailoverJob request; its kind and scope (µs; end 0: when it starts).
fn check_start(
    request: &StartFailoverJobRequest,
    now: i64,
) -> Result<(i32, i64, i64), ServiceError> {
    let mut violations = Violations::default();
    if request.request_id.chars().count() > MAX_REQUEST_ID_CHARS {
        violations.add(
            "request_id",
            format!("must be at most {MAX_REQUEST_ID_CHARS} characters"),
        );
    }
    let scope = match &request.scope {
        None => {
            violations.add("scope", "set time_range or failed_deliveries");
            (0, 0, 0)
        }
        Some(Scope::TimeRange(range)) => {
            let start = range.start_time.map(micros_of);
            let end = range.end_time.map(micros_of);
            match start {
                None => violations.add("time_range.start_time", "must be set"),
                Some(start) if start > now => {
                    violations.add("time_range.start_time", "must not be in the future");
                }
                _ => {}
            }
            if let (Some(start), Some(end)) = (start, end)
                && end <= start
            {
                violations.add("time_range.end_time", "must be after start_time");
            }
            (TIME_RANGE, start.unwrap_or(0), end.unwrap_or(0))
        }
        Some(Scope::FailedDeliveries(scope)) => {
            (FAILED_DELIVERIES, scope.since.map_or(0, micros_of), 0)
        }
    };
    violations.into_result().map(|()| scope)
}

fn is_finished(state: i32) -> bool {
    matches!(state, SUCCEEDED | FAILED | CANCELLED)
}

/// A job state's name in messages, logs and metric labels.
pub fn state_name(state: i32) -> &'static str {
    JobState::try_from(state).map_or("unknown", |s| match s {
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
        JobState::Running => "running",
        JobState::Pending => "pending",
        JobState::Unspecified => "unspecified",
    })
}

fn to_proto(row: &JobRow) -> Job {
    let scope = match row.kind {
        TIME_RANGE => Some(job::Scope::TimeRange(TimeRangeScope {
            start_time: Some(timestamp(row.scope_start)),
            end_time: (row.scope_end > 0).then(|| timestamp(row.scope_end)),
        })),
        _ => Some(job::Scope::FailedDeliveries(FailedDeliveriesScope {
            since: (row.scope_start > 0).then(|| timestamp(row.scope_start)),
        })),
    };
    Job {
        job_id: row.job_id.clone(),
        kind: row.kind,
        state: row.state,
        total_count: row.total_count,
        processed_count: row.processed_count,
        failed_count: row.failed_count,
        create_time: Some(timestamp(row.create_time)),
        update_time: Some(timestamp(row.update_time)),
        error: row.error.clone(),
        scope,
    }
}

/// Runs the jobs on one replica; see the module docs.
#[derive(Debug, Clone)]
pub struct Runner {
    /// The database.
    pub store: Store,
    /// The delivery path jobs send through.
    pub workers: Workers,
    /// Counters.
    pub metrics: MemberMetrics,
    /// This replica's lease owner id (random per process).
    pub owner: i64,
    /// How often an idle runner looks for a job.
    pub poll: Duration,
    /// Members per page (1–1000).
    pub page_size: u64,
    /// How long this replica holds a job without renewing it.
    pub lease: Duration,
}

/// Where a job's pages stand.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Cursor {
    time: i64,
    member: String,
}

/// A page sent: where it ends, how many members, how it went.
struct Sent {
    cursor: Cursor,
    members: i64,
    round: Round,
    finished: bool,
}

impl Runner {
    /// Looks for a job to run, runs it, until `shutdown`.
    ///
    /// # Errors
    /// Never; failures are logged and tried again.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut failures = 0;
        loop {
            let polled = async {
                self.expire().await?;
                match self.take().await? {
                    Some(job) => self.execute(job, &shutdown).await,
                    None => Ok(()),
                }
            };
            let wait = match polled.await {
                Ok(()) => {
                    failures = 0;
                    self.poll
                }
                Err(error) => {
                    failures += 1;
                    // A database call failed, or (at shutdown) a page task was cancelled.
                    tracing::warn!(%error, "failover jobs: a call failed; trying again");
                    mall_retry::Backoff::after(self.poll, Duration::from_secs(30), failures)
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Takes the first unfinished job if nobody else holds it.
    async fn take(&self) -> Result<Option<JobRow>, ServiceError> {
        let first = Jobs::find()
            .filter(J::State.is_in([PENDING, RUNNING]))
            .order_by_asc(J::CreateTime)
            .order_by_asc(J::JobId)
            .one(self.store.db())
            .await
            .map_err(|e| db_error(e, "find a job"))?;
        let Some(job) = first else {
            return Ok(None);
        };
        let now = now_micros();
        let end = if job.kind == TIME_RANGE && job.scope_end == 0 {
            // An open range ends when the job starts running.
            now
        } else {
            job.scope_end
        };
        // Whether the lease expired is decided on the database's clock, in the update.
        let _turn = self.store.turn().await;
        let taken = Jobs::update_many()
            .col_expr(J::State, Expr::value(RUNNING))
            .col_expr(J::LeaseOwner, Expr::value(self.owner))
            .col_expr(J::LeaseUntil, self.store.later(self.lease))
            .col_expr(J::ScopeEnd, Expr::value(end))
            .col_expr(J::UpdateTime, Expr::value(now))
            .filter(J::JobId.eq(&job.job_id))
            .filter(J::State.is_in([PENDING, RUNNING]))
            .filter(
                Condition::any()
                    .add(Expr::col(J::LeaseUntil).lte(self.store.later(Duration::ZERO)))
                    .add(J::LeaseOwner.eq(self.owner)),
            )
            .exec(self.store.db())
            .await
            .map_err(|e| db_error(e, "take a job"))?
            .rows_affected;
        if taken == 0 {
            return Ok(None);
        }
        if job.state == RUNNING {
            tracing::info!(job = %job.job_id, processed = job.processed_count, "failover job resumed from its checkpoint");
        } else {
            tracing::info!(job = %job.job_id, "failover job started");
        }
        Ok(Some(JobRow {
            state: RUNNING,
            lease_owner: self.owner,
            scope_end: end,
            ..job
        }))
    }

    /// Runs `job` to its end, or until it is cancelled, taken over or `shutdown`.
    async fn execute(
        &self,
        mut job: JobRow,
        shutdown: &CancellationToken,
    ) -> Result<(), ServiceError> {
        let stop = shutdown.child_token();
        let _keeper = self.keep_lease(job.job_id.clone(), stop.clone());
        let _stop_on_exit = stop.clone().drop_guard();
        if job.total_count == 0 {
            job.total_count = self.count(&job).await?;
            let counted = self
                .update(&job.job_id, true, |update| {
                    update
                        .col_expr(J::TotalCount, Expr::value(job.total_count))
                        .col_expr(J::UpdateTime, Expr::value(now_micros()))
                })
                .await?;
            if !counted {
                tracing::info!(job = %job.job_id, "failover job stopped before it began: cancelled or taken over");
                return Ok(());
            }
        }
        match self.pages(&job, &stop).await {
            Ok(true) => self.finish(&job, SUCCEEDED, "").await,
            Ok(false) if shutdown.is_cancelled() => {
                // Handed over at once: the next replica to look resumes it.
                self.update(&job.job_id, false, |update| update)
                    .await
                    .map(|_| ())
            }
            Ok(false) => {
                tracing::info!(job = %job.job_id, "failover job stopped: cancelled or taken over");
                Ok(())
            }
            Err(error @ ServiceError::Unavailable(_)) => Err(error),
            Err(error) => {
                tracing::error!(job = %job.job_id, %error, "failover job failed");
                let message = match &error {
                    ServiceError::Internal(_) => {
                        "an internal error; see the service's logs".to_owned()
                    }
                    other => other.to_string(),
                };
                self.finish(&job, FAILED, &message).await
            }
        }
    }

    /// Sends the job's pages from its checkpoint; `true` when every page was sent.
    async fn pages(&self, job: &JobRow, stop: &CancellationToken) -> Result<bool, ServiceError> {
        let mut in_flight = FuturesOrdered::new();
        let result = self.send_pages(job, stop, &mut in_flight).await;
        if !in_flight.is_empty() {
            // The job stops (cancelled, taken over, shutdown, an error): pages still being
            // sent end their request and release their members' claims, rather than be
            // aborted and leave those members claimed until the claims expire. Being drained,
            // never dropped while awaited, a page task is cancelled only by the runtime
            // shutting down (see `page_task_failed`).
            stop.cancel();
            while in_flight.next().await.is_some() {}
        }
        result
    }

    async fn send_pages(
        &self,
        job: &JobRow,
        stop: &CancellationToken,
        in_flight: &mut FuturesOrdered<AbortOnDrop<Result<Sent, ServiceError>>>,
    ) -> Result<bool, ServiceError> {
        let mut cursor = Cursor {
            time: job.cursor_time,
            member: job.cursor_member.clone(),
        };
        let mut exhausted = false;
        loop {
            while !exhausted && in_flight.len() < PAGES_IN_FLIGHT {
                if stop.is_cancelled() {
                    return Ok(false);
                }
                let Some((rows, end)) = self.page(job, &cursor).await? else {
                    exhausted = true;
                    break;
                };
                let members = i64::try_from(rows.len()).unwrap_or(i64::MAX);
                cursor = end.clone();
                let (workers, stop) = (self.workers.clone(), stop.clone());
                // Spawned, so pages are sent while the next one is read.
                in_flight.push_back(AbortOnDrop(tokio::spawn(async move {
                    let mut round = Round::default();
                    let deliveries = workers
                        .prepare_rows(&rows, Mode::Resend, &mut round)
                        .await?;
                    let finished = workers
                        .send_all(deliveries, Mode::Resend, &mut round, &stop)
                        .await?;
                    Ok::<_, ServiceError>(Sent {
                        cursor: end,
                        members,
                        round,
                        finished,
                    })
                })));
            }
            let Some(sent) = in_flight.next().await else {
                return Ok(true);
            };
            let sent = sent.map_err(page_task_failed)??;
            if !sent.finished {
                return Ok(false);
            }
            self.count_members(&sent.round);
            let saved = self
                .update(&job.job_id, true, |update| {
                    update
                        .col_expr(J::UpdateTime, Expr::value(now_micros()))
                        .col_expr(J::CursorTime, Expr::value(sent.cursor.time))
                        .col_expr(J::CursorMember, Expr::value(sent.cursor.member.clone()))
                        .col_expr(
                            J::ProcessedCount,
                            Expr::col(J::ProcessedCount).add(sent.members),
                        )
                        .col_expr(
                            J::FailedCount,
                            Expr::col(J::FailedCount)
                                .add(i64::try_from(sent.round.refused).unwrap_or(i64::MAX)),
                        )
                })
                .await?;
            if !saved {
                return Ok(false);
            }
        }
    }

    /// The members of the page after `cursor`, and where the page ends; `None` past the
    /// scope's end.
    async fn page(
        &self,
        job: &JobRow,
        cursor: &Cursor,
    ) -> Result<Option<(Vec<members::Model>, Cursor)>, ServiceError> {
        use members::Column as M;
        let db = self.store.db();
        if job.kind == TIME_RANGE {
            // One lower bound on change_time, the later of the scope's start and the
            // cursor's: given the scope's start beside the cursor's OR (values SQLite cannot
            // compare when planning), SQLite started the index range at the scope's start and
            // walked every page already sent, so a failover over 1M members ran at 0.75 of
            // the allowed rate.
            let rows = members::Entity::find()
                .filter(M::ChangeTime.gte(std::cmp::max(job.scope_start, cursor.time)))
                .filter(M::ChangeTime.lt(job.scope_end))
                .filter(
                    Condition::any().add(M::ChangeTime.gt(cursor.time)).add(
                        Condition::all()
                            .add(M::ChangeTime.eq(cursor.time))
                            .add(M::MemberId.gt(cursor.member.as_str())),
                    ),
                )
                .order_by_asc(M::ChangeTime)
                .order_by_asc(M::MemberId)
                .limit(self.page_size)
                .all(db)
                .await
                .map_err(|e| db_error(e, "read a page of members"))?;
            let end = rows.last().map(|last| Cursor {
                time: last.change_time,
                member: last.member_id.clone(),
            });
            return Ok(end.map(|end| (rows, end)));
        }
        let found = db
            .query_all_raw(self.backend().statement(
                "SELECT DISTINCT member_id FROM failed_deliveries \
                 WHERE fail_time >= $1 AND member_id > $2 ORDER BY member_id LIMIT $3",
                [
                    job.scope_start.into(),
                    cursor.member.clone().into(),
                    i64::try_from(self.page_size).unwrap_or(1_000).into(),
                ],
            ))
            .await
            .map_err(|e| db_error(e, "read a page of failed deliveries"))?;
        let ids: Vec<String> = found
            .iter()
            .map(|row| row.try_get::<String>("", "member_id"))
            .collect::<Result<_, _>>()
            .map_err(|e| db_error(e, "read a page of failed deliveries"))?;
        let Some(last) = ids.last() else {
            return Ok(None);
        };
        let end = Cursor {
            time: 0,
            member: last.clone(),
        };
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        Ok(Some((self.store.members(&ids).await?, end)))
    }

    /// Members in the job's scope.
    async fn count(&self, job: &JobRow) -> Result<i64, ServiceError> {
        let (sql, values): (&str, Vec<sea_orm::Value>) = if job.kind == TIME_RANGE {
            (
                "SELECT COUNT(*) AS n FROM members WHERE change_time >= $1 AND change_time < $2",
                vec![job.scope_start.into(), job.scope_end.into()],
            )
        } else {
            (
                "SELECT COUNT(DISTINCT member_id) AS n FROM failed_deliveries WHERE fail_time >= $1",
                vec![job.scope_start.into()],
            )
        };
        let row = self
            .store
            .db()
            .query_one_raw(self.backend().statement(sql, values))
            .await
            .map_err(|e| db_error(e, "count a job's members"))?;
        row.map_or(Ok(0), |row| row.try_get::<i64>("", "n"))
            .map_err(|e| db_error(e, "count a job's members"))
    }

    /// Updates our running job, renewing the lease (or handing it over: `keep` false);
    /// `false` when it is no longer ours and running. `set` adds what changes (and
    /// `update_time` when the state or the counts change).
    async fn update(
        &self,
        job_id: &str,
        keep: bool,
        set: impl FnOnce(sea_orm::UpdateMany<Jobs>) -> sea_orm::UpdateMany<Jobs>,
    ) -> Result<bool, ServiceError> {
        let until = if keep {
            self.store.later(self.lease)
        } else {
            Expr::value(0_i64)
        };
        let update = Jobs::update_many().col_expr(J::LeaseUntil, until);
        let _turn = self.store.turn().await;
        let changed = set(update)
            .filter(J::JobId.eq(job_id))
            .filter(J::LeaseOwner.eq(self.owner))
            .filter(J::State.eq(RUNNING))
            .exec(self.store.db())
            .await
            .map_err(|e| db_error(e, "update a job"))?
            .rows_affected;
        Ok(changed > 0)
    }

    async fn finish(&self, job: &JobRow, state: i32, error: &str) -> Result<(), ServiceError> {
        let finished = self
            .update(&job.job_id, false, |update| {
                update
                    .col_expr(J::State, Expr::value(state))
                    .col_expr(J::Error, Expr::value(error.to_owned()))
                    .col_expr(J::UpdateTime, Expr::value(now_micros()))
            })
            .await?;
        if finished {
            self.metrics
                .failover_jobs
                .with_label_values(&[state_name(state)])
                .inc();
            tracing::info!(job = %job.job_id, state = state_name(state), "failover job finished");
        }
        Ok(())
    }

    /// Renews the lease every second while the job runs; cancels `stop` when the job is no
    /// longer ours and running (cancelled, or taken over after we lost the lease).
    fn keep_lease(&self, job_id: String, stop: CancellationToken) -> AbortOnDrop<()> {
        let this = self.clone();
        AbortOnDrop(tokio::spawn(async move {
            loop {
                tokio::time::sleep(TICK).await;
                match this.update(&job_id, true, |update| update).await {
                    Ok(true) => {}
                    Ok(false) => {
                        stop.cancel();
                        return;
                    }
                    Err(error) => tracing::warn!(%error, "cannot renew a failover job's lease"),
                }
            }
        }))
    }

    /// Deletes jobs that finished more than [`RETENTION`] ago.
    async fn expire(&self) -> Result<(), ServiceError> {
        let _turn = self.store.turn().await;
        Jobs::delete_many()
            .filter(J::State.is_in([SUCCEEDED, FAILED, CANCELLED]))
            .filter(J::UpdateTime.lt(now_micros() - micros(RETENTION)))
            .exec(self.store.db())
            .await
            .map(|_| ())
            .map_err(|e| db_error(e, "delete expired jobs"))
    }

    fn count_members(&self, round: &Round) {
        for (outcome, n) in [
            ("delivered", round.delivered),
            ("refused", round.refused),
            ("skipped", round.skipped),
        ] {
            self.metrics
                .failover_job_members
                .with_label_values(&[outcome])
                .inc_by(n as u64);
        }
    }

    fn backend(&self) -> Backend {
        Backend::of(self.store.db())
    }
}

fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

/// What a page task that did not return means for its job. A panic is a bug: the job
/// fails. A cancellation is the runtime shutting down (nothing here aborts a page task it
/// still awaits), so the process is going away: the job is left running, for a replica to
/// resume from its checkpoint, not failed.
fn page_task_failed(error: tokio::task::JoinError) -> ServiceError {
    if error.is_cancelled() {
        ServiceError::Unavailable("a page task was cancelled: shutting down".into())
    } else {
        // Not the error itself: tokio's says what the panic said, which may quote a member's
        // data (the panic hook logged where it happened).
        ServiceError::Internal(anyhow::anyhow!("a page task panicked"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A page task cancelled (by its runtime shutting down) is the environment's,
    /// `Unavailable`, which `execute` does not finish the job on; a panic in one is a bug,
    /// `Internal`, which fails the job. (The panic's message in the output is this test's.)
    #[tokio::test]
    async fn a_cancelled_page_task_leaves_the_job_to_resume_and_a_panic_fails_it() {
        let pending = tokio::spawn(std::future::pending::<()>());
        pending.abort();
        let cancelled = pending.await.expect_err("aborted");
        assert!(matches!(
            page_task_failed(cancelled),
            ServiceError::Unavailable(_)
        ));
        let panicked = tokio::spawn(async { panic!("a bug near kim@example.com") })
            .await
            .expect_err("panicked");
        let ServiceError::Internal(error) = page_task_failed(panicked) else {
            panic!("a panic is Internal");
        };
        assert_eq!(
            error.to_string(),
            "a page task panicked",
            "nothing it quoted"
        );
    }
}
