//! EnqueueMemberChanges: record each change in the member table, queue a delivery for it,
//! answer once both are durable.
//!
//! The queue carries only what identifies the work ([`MemberDelivery`]: member id, version,
//! trace context; several per message, one FIFO group per lane of member ids): no personal
//! data, and a delivery worker reads the member's newest data and consent from the member
//! table when it sends, so a later change or a withdrawal always wins over what was queued.
//!
//! Interleavings, and why none loses a change:
//! - a crash (or a failed queue send) after the member table committed and before the queue
//!   took the deliveries: the call fails, the caller retries, and the same version is
//!   recorded and queued again (a change is not older than itself);
//! - the same request retried after it succeeded: its `request_id` answers with the first
//!   response; without one, the queue's deduplication window drops the same deliveries sent
//!   again, and a delivery sent twice anyway only sends the member's newest data twice;
//! - two requests for one member at once: on PostgreSQL the member's row is locked while a
//!   request decides, and a row is written only over an older version; deliveries may then be
//!   queued out of version order, which does not matter since each sends the newest state.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use mall_grpc::ServiceError;
use mall_proto::member::v1::{
    EnqueueMemberChangesRequest, EnqueueMemberChangesResponse, EraseMemberRequest,
    EraseMemberResponse, MemberChange, MemberDelivery, MemberDeliveryBatch,
};
use mall_queue::{OutgoingMessage, PackBudget, Queue, QueueError, encode_body, fnv64, pack_items};
use prost::Message as _;

use crate::{
    crypto::ProfileCipher,
    metrics::MemberMetrics,
    store::{Store, members, micros_of, now_micros},
    validate::{check_erasure, check_request},
};

/// Largest delivery message body (base64 text), well under the queue's 1 MiB.
const MAX_BODY_BYTES: usize = 256 * 1024;

/// What EnqueueMemberChanges needs.
#[derive(Debug, Clone)]
pub struct Enqueuer {
    /// The member table.
    pub store: Store,
    /// The delivery queue.
    pub queue: Queue,
    /// Profiles at rest.
    pub cipher: Arc<ProfileCipher>,
    /// FIFO groups of the delivery queue.
    pub lanes: u32,
    /// Counters.
    pub metrics: MemberMetrics,
}

impl Enqueuer {
    /// Validates, records and queues `request`; see the module docs.
    ///
    /// # Errors
    /// INVALID_ARGUMENT naming every bad field; UNAVAILABLE when the database or the queue is
    /// unreachable (retry: the same request records and queues the same thing again).
    pub async fn enqueue(
        &self,
        request: EnqueueMemberChangesRequest,
    ) -> Result<EnqueueMemberChangesResponse, ServiceError> {
        check_request(&request)?;
        let request_id = (!request.request_id.is_empty()).then_some(request.request_id.as_str());
        if let Some(id) = request_id
            && let Some(first) = self.store.remembered(id).await?
        {
            return EnqueueMemberChangesResponse::decode(first.as_slice())
                .map_err(|e| ServiceError::Internal(e.into()));
        }
        let now = now_micros();
        let ids: Vec<&str> = request
            .changes
            .iter()
            .map(|c| c.member_id.as_str())
            .collect();
        let (response, deliveries) = self
            .store
            .update(&ids, |stored| {
                Ok(decide(&request.changes, stored, now, &self.cipher))
            })
            .await?;
        let key = match request_id {
            Some(id) => format!("r{:016x}", fnv64(id.as_bytes())),
            None => content_key(&deliveries),
        };
        let messages = messages(deliveries, self.lanes, &key)?;
        self.queue.send(messages).await.map_err(queue_error)?;
        if let Some(id) = request_id {
            self.store
                .remember(id, response.encode_to_vec(), now)
                .await?;
        }
        let metrics = &self.metrics;
        metrics.count_enqueued("accepted", response.accepted_count);
        metrics.count_enqueued("opt_out", response.opt_out_count);
        metrics.count_enqueued(
            "skipped_without_consent",
            response.skipped_without_consent_count,
        );
        metrics.count_enqueued("stale", response.stale_count);
        Ok(response)
    }
}

impl Enqueuer {
    /// Erases a member; see `EraseMember` in the contract.
    ///
    /// # Errors
    /// INVALID_ARGUMENT naming the bad field; UNAVAILABLE when the database or the queue is
    /// unreachable (retry: the same erasure does the same again).
    pub async fn erase(
        &self,
        request: EraseMemberRequest,
    ) -> Result<EraseMemberResponse, ServiceError> {
        check_erasure(&request)?;
        // Request ids of erasures live beside those of enqueues, in their own namespace.
        let request_id =
            (!request.request_id.is_empty()).then(|| format!("erase:{}", request.request_id));
        if let Some(id) = &request_id
            && let Some(first) = self.store.remembered(id).await?
        {
            return EraseMemberResponse::decode(first.as_slice())
                .map_err(|e| ServiceError::Internal(e.into()));
        }
        let now = now_micros();
        let version = i64::try_from(request.version).unwrap_or(i64::MAX);
        let member = request.member_id.as_str();
        let response = self
            .store
            .update(&[member], |stored| {
                Ok(erase(stored.get(member), member, version, now))
            })
            .await?;
        if response.partner_erasure_queued {
            let delivery = MemberDelivery {
                member_id: request.member_id.clone(),
                version: request.version,
                trace_context: None,
            };
            let key = format!("e{:016x}", fnv64(format!("{member}:{version}").as_bytes()));
            self.queue
                .send(messages(vec![delivery], self.lanes, &key)?)
                .await
                .map_err(queue_error)?;
        }
        if let Some(id) = &request_id {
            self.store
                .remember(id, response.encode_to_vec(), now)
                .await?;
        }
        tracing::info!(member = %member, erased = response.erased, "member erasure");
        Ok(response)
    }
}

/// The tombstone that erases `member` at `version`, unless a newer change is recorded.
fn erase(
    stored: Option<&members::Model>,
    member: &str,
    version: i64,
    now: i64,
) -> (Vec<members::Model>, EraseMemberResponse) {
    if stored.is_some_and(|row| row.version > version) {
        return (Vec::new(), EraseMemberResponse::default());
    }
    let (queued, delivered) = stored.map_or((0, 0), |r| (r.queued_version, r.delivered_version));
    let attempted = stored.map_or(0, |r| r.attempted_version);
    // The partner has (or may have, or is about to have) the member: it must be told.
    let tell = delivered > 0 || attempted > 0 || queued > delivered;
    let tombstone = members::Model {
        member_id: member.to_owned(),
        version,
        consent_email: false,
        consent_sms: false,
        consent_push: false,
        consent_time: 0,
        change_time: 0,
        profile: None,
        key_id: None,
        queued_version: if tell { queued.max(version) } else { queued },
        delivered_version: delivered,
        update_time: now,
        erased: true,
        attempted_version: stored.map_or(0, |r| r.attempted_version),
        erase_delivered: false,
        // Not written by the upsert: a claim in force stays.
        send_owner: 0,
        send_until: 0,
    };
    (
        vec![tombstone],
        EraseMemberResponse {
            erased: true,
            partner_erasure_queued: tell,
        },
    )
}

/// Decides each change in request order against the stored rows: the rows to write, the
/// response, and the deliveries to queue. A change older than the member's newest recorded
/// version is stale; any other is recorded, and queued when its consent grants a channel, or
/// as an opt-out when the member was delivered or has a delivery queued; otherwise skipped.
pub fn decide(
    changes: &[MemberChange],
    mut stored: BTreeMap<String, members::Model>,
    now: i64,
    cipher: &ProfileCipher,
) -> (
    Vec<members::Model>,
    (EnqueueMemberChangesResponse, Vec<MemberDelivery>),
) {
    let mut response = EnqueueMemberChangesResponse::default();
    let mut deliveries = Vec::new();
    let mut touched = BTreeSet::new();
    for change in changes {
        // Validated: 1 to i64::MAX.
        let version = i64::try_from(change.version).unwrap_or(i64::MAX);
        let row = stored.get(&change.member_id);
        // After an erasure, a change of the erasure's own version is stale too: it must not
        // bring the data back.
        if row.is_some_and(|r| r.version > version || (r.erased && r.version >= version)) {
            response.stale_count += 1;
            continue;
        }
        let consent = change.consent.unwrap_or_default();
        let (queued, delivered) = row.map_or((0, 0), |r| (r.queued_version, r.delivered_version));
        let attempted = row.map_or(0, |r| r.attempted_version);
        let any = consent.marketing_email || consent.marketing_sms || consent.marketing_push;
        let queue = if any {
            response.accepted_count += 1;
            true
        } else if delivered > 0 || attempted > 0 || queued > delivered {
            response.opt_out_count += 1;
            true
        } else {
            response.skipped_without_consent_count += 1;
            false
        };
        let (key_id, profile) = match &change.profile {
            Some(profile) => {
                let (key_id, sealed) = cipher.encrypt(&change.member_id, &profile.encode_to_vec());
                (Some(key_id), Some(sealed))
            }
            None => (None, None),
        };
        stored.insert(
            change.member_id.clone(),
            members::Model {
                member_id: change.member_id.clone(),
                version,
                consent_email: consent.marketing_email,
                consent_sms: consent.marketing_sms,
                consent_push: consent.marketing_push,
                consent_time: consent.consent_time.map_or(0, micros_of),
                change_time: change.change_time.map_or(0, micros_of),
                profile,
                key_id,
                queued_version: if queue { queued.max(version) } else { queued },
                delivered_version: delivered,
                update_time: now,
                // A change newer than an erasure records the member again.
                erased: false,
                attempted_version: row.map_or(0, |r| r.attempted_version),
                erase_delivered: false,
                // Not written by the upsert: a claim in force stays.
                send_owner: 0,
                send_until: 0,
            },
        );
        touched.insert(change.member_id.clone());
        if queue {
            deliveries.push(MemberDelivery {
                member_id: change.member_id.clone(),
                version: change.version,
                trace_context: change.trace_context.clone(),
            });
        }
    }
    let rows = touched
        .into_iter()
        .filter_map(|id| stored.remove(&id))
        .collect();
    (rows, (response, deliveries))
}

/// The FIFO group of `member_id`'s deliveries.
pub fn lane_of(member_id: &str, lanes: u32) -> u32 {
    // The modulus keeps it below `lanes`, a u32.
    u32::try_from(fnv64(member_id.as_bytes()) % u64::from(lanes.max(1))).unwrap_or(0)
}

/// The queue messages of `deliveries`: by lane, in order, packed up to [`MAX_BODY_BYTES`];
/// deduplication ids `<key>-l<lane>-p<part>`, the same when the same request is sent again.
fn messages(
    deliveries: Vec<MemberDelivery>,
    lanes: u32,
    key: &str,
) -> Result<Vec<OutgoingMessage>, ServiceError> {
    let mut by_lane: BTreeMap<u32, Vec<MemberDelivery>> = BTreeMap::new();
    for delivery in deliveries {
        by_lane
            .entry(lane_of(&delivery.member_id, lanes))
            .or_default()
            .push(delivery);
    }
    let budget = PackBudget::base64(MAX_BODY_BYTES).with_overheads(6, 0);
    let mut messages = Vec::new();
    for (lane, deliveries) in by_lane {
        let parts = pack_items(deliveries, prost::Message::encoded_len, budget)
            .map_err(|e| ServiceError::Internal(e.into()))?;
        for (part, deliveries) in parts.into_iter().enumerate() {
            let traceparent = deliveries
                .iter()
                .filter_map(|d| d.trace_context.as_ref())
                .map(|t| t.traceparent.clone())
                .find(|t| !t.is_empty())
                // Else the trace of the call that enqueued them (its server span).
                .or_else(|| {
                    mall_telemetry::propagation::current_trace_headers(&tracing::Span::current()).0
                });
            let mut message = OutgoingMessage::new(encode_body(
                &MemberDeliveryBatch { deliveries }.encode_to_vec(),
            ));
            message.group_id = Some(format!("m{lane:04}"));
            message.dedup_id = Some(format!("{key}-l{lane}-p{part}"));
            if let Some(traceparent) = traceparent {
                message.attributes.insert("traceparent".into(), traceparent);
            }
            messages.push(message);
        }
    }
    Ok(messages)
}

/// A deduplication key from what is queued, for requests without a `request_id`.
fn content_key(deliveries: &[MemberDelivery]) -> String {
    let text: Vec<String> = deliveries
        .iter()
        .map(|d| format!("{}:{}", d.member_id, d.version))
        .collect();
    format!("c{:016x}", fnv64(text.join("|").as_bytes()))
}

fn queue_error(error: QueueError) -> ServiceError {
    // Nothing is answered as done: the caller retries, and the member table already holds the
    // same versions, so the retry queues them again.
    tracing::warn!(%error, "cannot queue member deliveries");
    ServiceError::Unavailable("the delivery queue is unavailable; retry with backoff".into())
}

#[cfg(test)]
mod tests {
    use mall_proto::member::v1::{Consent, MarketingProfile};

    use super::*;
    use crate::config::EncryptionSettings;

    fn change(id: &str, version: u64, consented: bool) -> MemberChange {
        MemberChange {
            member_id: id.into(),
            version,
            consent: Some(Consent {
                marketing_email: consented,
                ..Consent::default()
            }),
            profile: Some(MarketingProfile {
                email: format!("{id}@example.com"),
                ..MarketingProfile::default()
            }),
            ..MemberChange::default()
        }
    }

    fn run(
        changes: &[MemberChange],
        stored: &mut BTreeMap<String, members::Model>,
    ) -> (EnqueueMemberChangesResponse, Vec<(String, u64)>) {
        let cipher = ProfileCipher::new(&EncryptionSettings::default()).expect("valid");
        let (rows, (response, deliveries)) = decide(changes, stored.clone(), 1, &cipher);
        for row in rows {
            stored.insert(row.member_id.clone(), row);
        }
        let queued = deliveries
            .into_iter()
            .map(|d| (d.member_id, d.version))
            .collect();
        (response, queued)
    }

    #[test]
    fn consented_changes_are_queued_stale_ones_dropped_and_withdrawals_become_opt_outs() {
        let mut stored = BTreeMap::new();
        let (response, queued) = run(
            &[
                change("A", 2, true),
                change("A", 1, true),
                change("B", 1, false),
            ],
            &mut stored,
        );
        assert_eq!(
            (
                response.accepted_count,
                response.stale_count,
                response.skipped_without_consent_count
            ),
            (1, 1, 1)
        );
        assert_eq!(queued, [("A".to_owned(), 2)]);
        assert_eq!(
            stored["B"].version, 1,
            "a skipped change's version is recorded"
        );
        assert_eq!(stored["A"].queued_version, 2);

        // A withdraws while its delivery is still queued: the partner must hear of it.
        let (response, queued) = run(&[change("A", 3, false)], &mut stored);
        assert_eq!(response.opt_out_count, 1);
        assert_eq!(queued, [("A".to_owned(), 3)]);

        // B was never delivered nor queued: nothing to tell the partner.
        let (response, queued) = run(&[change("B", 2, false)], &mut stored);
        assert_eq!(response.skipped_without_consent_count, 1);
        assert!(queued.is_empty());

        // Delivered once, then withdrawn: an opt-out.
        stored.get_mut("B").expect("stored").delivered_version = 2;
        let (response, _) = run(&[change("B", 3, false)], &mut stored);
        assert_eq!(response.opt_out_count, 1);
    }

    #[test]
    fn the_same_version_again_is_recorded_and_queued_again() {
        let mut stored = BTreeMap::new();
        run(&[change("A", 5, true)], &mut stored);
        let (response, queued) = run(&[change("A", 5, true)], &mut stored);
        assert_eq!(
            response.accepted_count, 1,
            "a retry after a failed queue send"
        );
        assert_eq!(queued, [("A".to_owned(), 5)]);
    }

    #[test]
    fn a_lane_keeps_a_member_and_messages_carry_no_personal_data() {
        let deliveries: Vec<MemberDelivery> = (0..300)
            .map(|i| MemberDelivery {
                member_id: format!("M-{i}"),
                version: 1,
                trace_context: None,
            })
            .collect();
        let messages = messages(deliveries, 4, "k").expect("packs");
        assert!(messages.len() <= 4);
        for message in &messages {
            let body = mall_queue::decode_body(&message.body).expect("base64");
            let batch = MemberDeliveryBatch::decode(body.as_slice()).expect("decodes");
            let lanes: BTreeSet<u32> = batch
                .deliveries
                .iter()
                .map(|d| lane_of(&d.member_id, 4))
                .collect();
            assert_eq!(lanes.len(), 1, "one lane per message");
            assert!(!message.body.contains('@'));
        }
    }
}
