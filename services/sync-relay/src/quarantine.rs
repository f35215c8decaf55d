//! The quarantine as the admin API uses it: pages of records within a size limit, and
//! redrives that validate records again and enqueue those that pass. The handlers in
//! [`crate::api`] only check requests and map errors; this is the orchestration.

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use mall_grpc::ServiceError;
use mall_product::{ProductTypes, limits::MAX_ITEMS_PER_REQUEST};
use mall_proto::sync::v1::{ChangeOrigin, QuarantinedRecord, RedriveQuarantinedResponse};

use crate::{change, entity::quarantined_records, ingest::Ingest, rollup, store::RelayStore};

/// Most raw payload bytes in one ListQuarantined page (records are up to 1 MiB each); a page
/// stops early rather than exceed it.
pub const MAX_PAGE_BYTES: usize = 4 * 1024 * 1024;

/// One page of the quarantine.
#[derive(Debug, Default)]
pub struct Page {
    /// Oldest first.
    pub records: Vec<QuarantinedRecord>,
    /// Token of the next page; empty on the last.
    pub next_page_token: String,
}

/// Which quarantined records a redrive takes.
#[derive(Debug, Clone)]
pub enum Selection {
    /// Every record present when the redrive starts.
    All,
    /// These ids.
    Ids(Vec<i64>),
}

/// The position a ListQuarantined page token continues after; `None` when it is not one.
pub fn parse_page_token(token: &str) -> Option<i64> {
    let text = String::from_utf8(URL_SAFE_NO_PAD.decode(token).ok()?).ok()?;
    text.strip_prefix("q1|")?.parse().ok()
}

fn page_token(seq: i64) -> String {
    URL_SAFE_NO_PAD.encode(format!("q1|{seq}"))
}

/// Up to `page_size` records after `after`, fewer when their payloads would pass
/// [`MAX_PAGE_BYTES`].
///
/// # Errors
/// When the relay's database fails.
pub async fn page(store: &RelayStore, after: i64, page_size: usize) -> Result<Page, ServiceError> {
    let rows = store
        .list_quarantined(after, page_size as u64 + 1)
        .await
        .map_err(ServiceError::from)?;
    let more = rows.len() > page_size;
    let mut page = Page::default();
    let mut bytes = 0;
    let mut last = after;
    for row in rows.into_iter().take(page_size) {
        bytes += row.raw_payload.len();
        if !page.records.is_empty() && bytes > MAX_PAGE_BYTES {
            break;
        }
        last = row.seq;
        page.records.push(QuarantinedRecord {
            id: row.seq.to_string(),
            source: row.source,
            position: row.position,
            reason: row.reason,
            raw_payload: row.raw_payload,
            quarantine_time: Some(crate::store::timestamp_of(row.quarantine_time)),
        });
    }
    let cut_short = page.records.len() < page_size && more;
    if more || cut_short {
        page.next_page_token = page_token(last);
    }
    Ok(page)
}

/// Redrives the quarantine: what `selection` names, every record validated again, those that
/// pass enqueued in order and released, the others kept with their new reason.
///
/// # Errors
/// UNAVAILABLE when the queue does not accept the records (nothing of that page is
/// released; a retry is deduplicated); the database's errors.
pub async fn redrive(
    store: &RelayStore,
    ingest: &Ingest,
    types: &ProductTypes,
    selection: Selection,
) -> Result<RedriveQuarantinedResponse, ServiceError> {
    let mut response = RedriveQuarantinedResponse::default();
    match selection {
        Selection::All => {
            // Every record present now, oldest first, a page at a time.
            let through = store.last_quarantined().await?;
            let mut after = 0;
            loop {
                let page = store
                    .list_quarantined(after, MAX_ITEMS_PER_REQUEST as u64)
                    .await?;
                let page: Vec<_> = page.into_iter().filter(|r| r.seq <= through).collect();
                let Some(last) = page.last().map(|r| r.seq) else {
                    break;
                };
                redrive_records(store, ingest, types, page, &mut response).await?;
                after = last;
            }
        }
        Selection::Ids(ids) => {
            let records = store.quarantined_by_ids(&ids).await?;
            redrive_records(store, ingest, types, records, &mut response).await?;
        }
    }
    tracing::info!(
        redriven = response.redriven_count,
        still_invalid = response.still_invalid_count,
        "quarantined records redriven"
    );
    Ok(response)
}

/// Validates `records` again; enqueues those that pass, in order, and releases them from the
/// quarantine; records the new reason of the others.
async fn redrive_records(
    store: &RelayStore,
    ingest: &Ingest,
    types: &ProductTypes,
    records: Vec<quarantined_records::Model>,
    response: &mut RedriveQuarantinedResponse,
) -> Result<(), ServiceError> {
    let mut valid = Vec::new();
    let mut released = Vec::new();
    for record in records {
        let checked = change::decode(&record.raw_payload)
            .and_then(|mut change| change::validate(&mut change, types).map(|()| change));
        match checked {
            Ok(change) => {
                // The producer's coordinates stay the record's own.
                let origin = ChangeOrigin {
                    source: record.source,
                    position: record.position,
                };
                valid.push((change, origin));
                released.push(record.seq);
            }
            Err(reason) => {
                store.requarantine(record.seq, &reason).await?;
                response.still_invalid_count += 1;
            }
        }
    }
    if released.is_empty() {
        return Ok(());
    }
    // From exactly what is sent: a later redrive of the same range that sends more (a record
    // became valid meanwhile) is new to the queue's deduplication; a retry of this one (the
    // enqueue failed) is not.
    let seqs: Vec<String> = released.iter().map(i64::to_string).collect();
    let key = rollup::dedup_key('q', &seqs.iter().map(String::as_str).collect::<Vec<_>>());
    ingest.enqueue(valid, &key).await.map_err(|error| {
        tracing::warn!(error = %error, "failed to enqueue redriven records");
        ServiceError::Unavailable("the queue did not accept the redriven records; retry".into())
    })?;
    store.release_quarantined(&released).await?;
    response.redriven_count += i64::try_from(released.len()).unwrap_or_default();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_garbage_is_refused() {
        assert_eq!(parse_page_token(&page_token(42)), Some(42));
        assert_eq!(parse_page_token("garbage!"), None);
        assert_eq!(parse_page_token(&URL_SAFE_NO_PAD.encode("c1|3")), None);
    }
}
