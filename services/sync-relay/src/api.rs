//! gRPC handlers of `mall.sync.v1.SyncRelayService`: check the request, call stage 1, the
//! queue, the quarantine or the Kinesis source, map errors; nothing else.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use mall_grpc::{ServiceError, Violations, error::stream_read_error};
use mall_product::{ProductTypes, limits::MAX_ITEMS_PER_REQUEST};
use mall_proto::sync::v1::{
    DeadLetter, GetRelayStatusRequest, GetRelayStatusResponse, LaneStatus, ListDeadLettersRequest,
    ListDeadLettersResponse, ListQuarantinedRequest, ListQuarantinedResponse, PauseRelayRequest,
    PauseRelayResponse, ProductChange, PublishProductChangesRequest, PublishProductChangesResponse,
    QuarantineNotice, RedriveDeadLettersRequest, RedriveDeadLettersResponse,
    RedriveQuarantinedRequest, RedriveQuarantinedResponse, RelayStatus, ReplayFromRequest,
    ReplayFromResponse, ResumeRelayRequest, ResumeRelayResponse, ShardStatus,
    sync_relay_service_server::SyncRelayService,
};
use mall_queue::{DeadLetterSelection, Queue, decode_body};
use prost::Message as _;
use tonic::{Request, Response, Status, Streaming};

use crate::{
    change::group_lane,
    control::Control,
    ingest::{Incoming, Ingest},
    quarantine, rollup,
    source::kinesis,
    store::RelayStore,
};

/// Default page size of the list calls.
const DEFAULT_PAGE_SIZE: usize = 50;
/// Largest page size of the list calls.
const MAX_PAGE_SIZE: usize = 1_000;
/// QuarantineNotices in a PublishProductChanges response, at most.
const MAX_NOTICES: usize = 100;
/// Product codes listed per dead letter, at most.
const MAX_DEAD_LETTER_CODES: usize = 100;
/// Longest pause reason.
const MAX_REASON_CHARS: usize = 1_024;
/// Longest admin `request_id`.
const MAX_REQUEST_ID_CHARS: usize = 128;

/// The service; cheap to clone.
#[derive(Debug, Clone)]
pub struct RelayApi {
    ingest: Ingest,
    queue: Queue,
    store: RelayStore,
    control: Control,
    types: Arc<ProductTypes>,
    /// The Kinesis stream, when it is the source.
    kinesis_stream: Option<String>,
    /// `relay.lanes`: every lane is listed in the status, empty ones included.
    lanes: u32,
}

impl RelayApi {
    /// Handlers over the relay's parts.
    pub fn new(
        ingest: Ingest,
        queue: Queue,
        store: RelayStore,
        control: Control,
        types: Arc<ProductTypes>,
        kinesis_stream: Option<String>,
        lanes: u32,
    ) -> Self {
        Self {
            ingest,
            queue,
            store,
            control,
            types,
            kinesis_stream,
            lanes,
        }
    }

    async fn status(&self) -> Result<RelayStatus, ServiceError> {
        let switch = self.store.pause_state().await?;
        let (paused, pause_reason) = (switch.paused, switch.pause_reason);
        let shards = match &self.kinesis_stream {
            Some(stream) => kinesis::status(self.store.connection(), stream)
                .await
                .map_err(|e| ServiceError::Internal(e.into()))?
                .into_iter()
                .map(|shard| ShardStatus {
                    shard_id: shard.shard_id,
                    checkpoint_sequence_number: shard.checkpoint.unwrap_or_default(),
                    lag_millis: shard.lag_millis,
                    lease_owner: shard.lease_owner.unwrap_or_default(),
                    lease_expire_time: shard.lease_expire_time.map(|t| prost_types::Timestamp {
                        seconds: t.timestamp(),
                        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or_default(),
                    }),
                    state: mall_proto::sync::v1::ShardState::from(shard.state) as i32,
                })
                .collect(),
            None => Vec::new(),
        };
        let counts = self.queue.counts().await.map_err(unavailable)?;
        // SQS cannot count per message group: lanes are listed only where the queue knows,
        // and then every lane, so "16 empty lanes" differs from "no information".
        let lanes = match self.queue.counts_by_group().await.map_err(unavailable)? {
            None => Vec::new(),
            Some(groups) => {
                let mut lanes: BTreeMap<u32, LaneStatus> = (0..self.lanes)
                    .map(|lane| (lane, lane_status(lane, 0, 0)))
                    .collect();
                // Groups of another lane count (before `relay.lanes` changed) are shown too.
                for (group, counts) in groups {
                    if let Some(lane) = group_lane(&group) {
                        lanes.insert(lane, lane_status(lane, counts.visible, counts.in_flight));
                    }
                }
                lanes.into_values().collect()
            }
        };
        let (last_error, last_error_time) = self
            .control
            .last_error()
            .map_or((String::new(), None), |(e, t)| (e, Some(t.into())));
        Ok(RelayStatus {
            paused,
            pause_reason,
            shards,
            lanes,
            changes_per_second: self.control.changes_per_second(),
            dead_letter_count: i64::try_from(counts.dead).unwrap_or(i64::MAX),
            quarantined_count: i64::try_from(self.store.quarantined_count().await?)
                .unwrap_or(i64::MAX),
            last_error,
            last_error_time,
        })
    }
}

fn unavailable(error: mall_queue::QueueError) -> ServiceError {
    tracing::warn!(error = %error, "queue call failed");
    // The queue's own message (endpoints, request ids) stays in the log: callers get a
    // message of ours.
    ServiceError::Unavailable("the queue is unavailable; retry with backoff".into())
}

fn page_size(requested: i32, violations: &mut Violations) -> usize {
    match requested {
        n if n < 0 => {
            violations.add("page_size", "must not be negative");
            0
        }
        0 => DEFAULT_PAGE_SIZE,
        n => usize::try_from(n)
            .unwrap_or(MAX_PAGE_SIZE)
            .min(MAX_PAGE_SIZE),
    }
}

fn check_selection(request_id: &str, ids: &[String], all: bool, violations: &mut Violations) {
    if request_id.chars().count() > MAX_REQUEST_ID_CHARS {
        violations.add(
            "request_id",
            format!("must be at most {MAX_REQUEST_ID_CHARS} characters"),
        );
    }
    match (ids.is_empty(), all) {
        (true, false) => violations.add("ids", "give ids, or set all"),
        (false, true) => violations.add("all", "must be false when ids are given"),
        _ => {}
    }
    if ids.len() > MAX_ITEMS_PER_REQUEST {
        violations.add(
            "ids",
            format!("holds {} ids; at most {MAX_ITEMS_PER_REQUEST}", ids.len()),
        );
    }
}

#[tonic::async_trait]
impl SyncRelayService for RelayApi {
    #[tracing::instrument(skip_all)]
    async fn publish_product_changes(
        &self,
        request: Request<Streaming<PublishProductChangesRequest>>,
    ) -> Result<Response<PublishProductChangesResponse>, Status> {
        let mut stream = request.into_inner();
        // One id per call: its messages' deduplication ids are unique to it.
        let call = rollup::dedup_key(
            'g',
            &[
                &format!("{:?}", std::time::SystemTime::now()),
                &fastrand::u64(..).to_string(),
            ],
        );
        let mut response = PublishProductChangesResponse::default();
        let mut index = 0usize;
        let mut message = 0usize;
        while let Some(request) = stream.message().await.map_err(stream_read_error)? {
            let count = request.changes.len();
            if count > MAX_ITEMS_PER_REQUEST {
                return Err(ServiceError::invalid(
                    "changes",
                    format!(
                        "message {message} holds {count} changes; at most \
                         {MAX_ITEMS_PER_REQUEST} per message (the {index} changes before it \
                         were accepted)"
                    ),
                )
                .into());
            }
            let records = request
                .changes
                .into_iter()
                .enumerate()
                .map(|(i, change)| Incoming {
                    quarantine_key: format!("grpc:{:016x}", rollup::fnv64(&change.encode_to_vec())),
                    change: Ok(change),
                    raw: None,
                    position: (index + i).to_string(),
                })
                .collect();
            let report = self
                .ingest
                .ingest("grpc", &format!("{call}-m{message}"), records)
                .await
                .map_err(|error| {
                    tracing::warn!(error = %error, "failed to enqueue published changes");
                    ServiceError::Unavailable(
                        "the queue did not accept the changes; resend them (duplicates are \
                         harmless)"
                            .into(),
                    )
                })?;
            response.accepted_count += i64::try_from(report.accepted).unwrap_or_default();
            response.quarantined_count +=
                i64::try_from(report.quarantined.len()).unwrap_or_default();
            for (i, code, reason, id) in report.quarantined {
                if response.quarantined.len() < MAX_NOTICES {
                    response.quarantined.push(QuarantineNotice {
                        index: i64::try_from(index + i).unwrap_or_default(),
                        product_code: code,
                        reason,
                        quarantine_id: id.to_string(),
                    });
                }
            }
            self.ingest.count_received("grpc", count);
            index += count;
            message += 1;
        }
        Ok(Response::new(response))
    }

    #[tracing::instrument(skip_all)]
    async fn get_relay_status(
        &self,
        _request: Request<GetRelayStatusRequest>,
    ) -> Result<Response<GetRelayStatusResponse>, Status> {
        Ok(Response::new(GetRelayStatusResponse {
            status: Some(self.status().await?),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_dead_letters(
        &self,
        request: Request<ListDeadLettersRequest>,
    ) -> Result<Response<ListDeadLettersResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::default();
        let page_size = page_size(request.page_size, &mut violations);
        violations.into_result()?;
        let token = (!request.page_token.is_empty()).then_some(request.page_token.as_str());
        let (letters, next) = self
            .queue
            .list_dead_letters(page_size, token)
            .await
            .map_err(|error| match error {
                mall_queue::QueueError::InvalidArgument { .. } => ServiceError::invalid(
                    "page_token",
                    "is not a token returned by ListDeadLetters",
                ),
                other => unavailable(other),
            })?;
        let ids: Vec<String> = letters.iter().map(|l| l.id.clone()).collect();
        let failures = self
            .store
            .apply_failures(&ids)
            .await
            .map_err(ServiceError::from)?;
        let dead_letters = letters
            .into_iter()
            .map(|letter| {
                let changes: Vec<ProductChange> = decode_body(&letter.body)
                    .ok()
                    .and_then(|b| {
                        mall_proto::sync::v1::ProductChangeBatch::decode(b.as_slice()).ok()
                    })
                    .map(|b| b.changes)
                    .unwrap_or_default();
                let codes: BTreeSet<String> =
                    changes.iter().map(|c| c.product_code.clone()).collect();
                let (last_error, time) = failures
                    .get(&letter.id)
                    .cloned()
                    .map_or((String::new(), None), |(e, t)| (e, Some(t)));
                DeadLetter {
                    lane: letter
                        .group_id
                        .as_deref()
                        .and_then(group_lane)
                        .and_then(|l| i32::try_from(l).ok())
                        .unwrap_or(-1),
                    receive_count: i32::try_from(letter.receive_count).unwrap_or(i32::MAX),
                    change_count: i32::try_from(changes.len()).unwrap_or(i32::MAX),
                    product_codes: codes.into_iter().take(MAX_DEAD_LETTER_CODES).collect(),
                    last_error,
                    dead_letter_time: time.map(crate::store::timestamp_of),
                    id: letter.id,
                }
            })
            .collect();
        Ok(Response::new(ListDeadLettersResponse {
            dead_letters,
            next_page_token: next.unwrap_or_default(),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn redrive_dead_letters(
        &self,
        request: Request<RedriveDeadLettersRequest>,
    ) -> Result<Response<RedriveDeadLettersResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::default();
        check_selection(
            &request.request_id,
            &request.ids,
            request.all,
            &mut violations,
        );
        violations.into_result()?;
        let selection = if request.all {
            DeadLetterSelection::All
        } else {
            DeadLetterSelection::Ids(request.ids)
        };
        let response = self
            .once(&request.request_id, async {
                let redriven = self
                    .queue
                    .redrive_dead_letters(selection)
                    .await
                    .map_err(unavailable)?;
                tracing::info!(redriven, "dead letters redriven");
                Ok(RedriveDeadLettersResponse {
                    redriven_count: i64::try_from(redriven).unwrap_or(i64::MAX),
                })
            })
            .await?;
        Ok(Response::new(response))
    }

    #[tracing::instrument(skip_all)]
    async fn list_quarantined(
        &self,
        request: Request<ListQuarantinedRequest>,
    ) -> Result<Response<ListQuarantinedResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::default();
        let page_size = page_size(request.page_size, &mut violations);
        let after = if request.page_token.is_empty() {
            0
        } else {
            match quarantine::parse_page_token(&request.page_token) {
                Some(seq) => seq,
                None => {
                    violations.add("page_token", "is not a token returned by ListQuarantined");
                    0
                }
            }
        };
        violations.into_result()?;
        let page = quarantine::page(&self.store, after, page_size).await?;
        Ok(Response::new(ListQuarantinedResponse {
            quarantined_records: page.records,
            next_page_token: page.next_page_token,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn redrive_quarantined(
        &self,
        request: Request<RedriveQuarantinedRequest>,
    ) -> Result<Response<RedriveQuarantinedResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::default();
        check_selection(
            &request.request_id,
            &request.ids,
            request.all,
            &mut violations,
        );
        let mut ids = Vec::with_capacity(request.ids.len());
        for (i, id) in request.ids.iter().enumerate() {
            match id.parse::<i64>() {
                Ok(id) => ids.push(id),
                Err(_) => violations.add(format!("ids[{i}]"), "is not a quarantine id"),
            }
        }
        violations.into_result()?;
        let selection = if request.all {
            quarantine::Selection::All
        } else {
            quarantine::Selection::Ids(ids)
        };
        let response = self
            .once(
                &request.request_id,
                quarantine::redrive(&self.store, &self.ingest, &self.types, selection),
            )
            .await?;
        Ok(Response::new(response))
    }

    #[tracing::instrument(skip_all)]
    async fn replay_from(
        &self,
        request: Request<ReplayFromRequest>,
    ) -> Result<Response<ReplayFromResponse>, Status> {
        let request = request.into_inner();
        let Some(stream) = &self.kinesis_stream else {
            return Err(ServiceError::FailedPrecondition {
                reason: "SOURCE_NOT_KINESIS",
                message: "the relay's source is not Kinesis; there is nothing to replay \
                          (source.kind = \"kinesis\")"
                    .into(),
            }
            .into());
        };
        let Some(start) = request.start_time else {
            return Err(ServiceError::invalid("start_time", "must be set").into());
        };
        let start = chrono::DateTime::from_timestamp(
            start.seconds,
            u32::try_from(start.nanos).unwrap_or_default(),
        )
        .ok_or_else(|| ServiceError::invalid("start_time", "is not a valid time"))?;
        let shard_ids =
            kinesis::replay_from(self.store.connection(), stream, start, &request.shard_ids)
                .await
                .map_err(|error| match error {
                    kinesis::ReplayError::StartInFuture { .. } => {
                        ServiceError::invalid("start_time", "must not be in the future")
                    }
                    kinesis::ReplayError::UnknownShards { ref shard_ids, .. } => {
                        ServiceError::NotFound {
                            resource: "shard",
                            name: shard_ids.join(", "),
                        }
                    }
                    // Still conflicting after retries, or the database away: try again later.
                    kinesis::ReplayError::Database(error)
                        if mall_db::is_retryable(&error) || mall_db::is_unavailable(&error) =>
                    {
                        ServiceError::Unavailable("the relay's database is busy; retry".into())
                    }
                    kinesis::ReplayError::Database(error) => ServiceError::Internal(error.into()),
                })?;
        tracing::info!(shards = shard_ids.len(), "replay requested");
        Ok(Response::new(ReplayFromResponse { shard_ids }))
    }

    #[tracing::instrument(skip_all)]
    async fn pause_relay(
        &self,
        request: Request<PauseRelayRequest>,
    ) -> Result<Response<PauseRelayResponse>, Status> {
        let reason = request.into_inner().reason;
        if reason.chars().count() > MAX_REASON_CHARS {
            return Err(ServiceError::invalid(
                "reason",
                format!("must be at most {MAX_REASON_CHARS} characters"),
            )
            .into());
        }
        self.control
            .set_paused(true, &reason)
            .await
            .map_err(ServiceError::from)?;
        tracing::info!("relay paused");
        Ok(Response::new(PauseRelayResponse {
            status: Some(self.status().await?),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn resume_relay(
        &self,
        _request: Request<ResumeRelayRequest>,
    ) -> Result<Response<ResumeRelayResponse>, Status> {
        self.control
            .set_paused(false, "")
            .await
            .map_err(ServiceError::from)?;
        tracing::info!("relay resumed");
        Ok(Response::new(ResumeRelayResponse {
            status: Some(self.status().await?),
        }))
    }
}

impl RelayApi {
    /// Runs `work` once per `request_id` (when given): a repeated id gets the first call's
    /// response without running `work` again. Two calls racing with one id may both run;
    /// redrives tolerate that (what is no longer dead or quarantined is skipped).
    async fn once<T, F>(&self, request_id: &str, work: F) -> Result<T, ServiceError>
    where
        T: prost::Message + Default,
        F: std::future::Future<Output = Result<T, ServiceError>>,
    {
        if request_id.is_empty() {
            return work.await;
        }
        if let Some(first) = self.store.claim_request(request_id).await? {
            return T::decode(first.as_slice()).map_err(|e| ServiceError::Internal(e.into()));
        }
        let response = work.await?;
        self.store
            .finish_request(request_id, response.encode_to_vec())
            .await?;
        Ok(response)
    }
}

/// A lane's status from its message counts.
fn lane_status(lane: u32, visible: u64, in_flight: u64) -> LaneStatus {
    LaneStatus {
        lane: i32::try_from(lane).unwrap_or(i32::MAX),
        visible_messages: i64::try_from(visible).unwrap_or(i64::MAX),
        in_flight_messages: i64::try_from(in_flight).unwrap_or(i64::MAX),
    }
}
