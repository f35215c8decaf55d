//! Producers: PublishProductChanges in acknowledged chunks that survive relay crashes, and
//! PutRecords to a Kinesis stream that keeps each product's records in order.

use std::{collections::HashSet, net::SocketAddr, time::Duration};

use aws_sdk_kinesis::{Client, primitives::Blob, types::PutRecordsRequestEntry};
use mall_proto::sync::v1::{ProductChange, PublishProductChangesRequest};
use prost::Message as _;
use tokio::sync::watch;

use super::workload::{Item, Payload};

/// Changes per PublishProductChanges call (the relay's limit per message).
pub const CHUNK: usize = 1_000;

/// Publishes `items` in chunks of [`CHUNK`], one call per chunk, each chunk only after the
/// previous one was acknowledged, at about `per_second` changes a second (a steady producer,
/// so the relay's crashes fall mid-run). A chunk counts as durable only when its call returned
/// OK; when the call fails (the relay was killed, or could not reach its queue) the same chunk
/// is sent again to whichever process serves at `relay` by then: duplicates are harmless.
/// `started` counts the chunks whose first call has started (every chunk before them is
/// acknowledged). Returns how many calls failed.
pub async fn publish_grpc(
    items: Vec<Item>,
    per_second: f64,
    mut relay: watch::Receiver<Option<SocketAddr>>,
    started: watch::Sender<usize>,
) -> usize {
    let start = tokio::time::Instant::now();
    let mut failures = 0;
    for (index, chunk) in items.chunks(CHUNK).enumerate() {
        let changes: Vec<ProductChange> = chunk.iter().map(Item::change).collect();
        let malformed: Vec<i64> = chunk
            .iter()
            .enumerate()
            .filter(|(_, item)| item.malformed)
            .map(|(i, _)| i64::try_from(i).expect("small"))
            .collect();
        started.send_replace(index + 1);
        loop {
            let addr = *relay
                .wait_for(Option::is_some)
                .await
                .expect("the relay's address is published while the test runs");
            let addr = addr.expect("waited for an address");
            let request = PublishProductChangesRequest {
                changes: changes.clone(),
            };
            let mut client = super::relay::client(addr);
            let call = client.publish_product_changes(tokio_stream::iter([request]));
            match tokio::time::timeout(Duration::from_secs(60), call).await {
                Ok(Ok(response)) => {
                    let response = response.into_inner();
                    let quarantined: Vec<i64> =
                        response.quarantined.iter().map(|n| n.index).collect();
                    assert_eq!(
                        (response.accepted_count, quarantined),
                        (
                            i64::try_from(chunk.len() - malformed.len()).expect("small"),
                            malformed.clone()
                        ),
                        "chunk {index}: the relay accepts the valid changes and quarantines \
                         exactly the malformed ones"
                    );
                    break;
                }
                Ok(Err(status)) if !retryable(&status) => {
                    panic!("chunk {index}: PublishProductChanges failed for good: {status}")
                }
                Ok(Err(_)) | Err(_) => {
                    failures += 1;
                    // Killed or busy: try again shortly, at the address then current.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        let sent = ((index + 1) * CHUNK).min(items.len());
        tokio::time::sleep_until(start + Duration::from_secs_f64(sent as f64 / per_second)).await;
    }
    failures
}

/// Whether a failed publish may succeed when sent again: the relay was away or could not
/// reach its queue.
fn retryable(status: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
    )
}

/// The payload bytes of `item` on Kinesis.
pub fn record_bytes(item: &Item) -> Vec<u8> {
    match &item.payload {
        Payload::Change(change) => change.encode_to_vec(),
        Payload::Bytes(bytes) => bytes.clone(),
    }
}

/// Puts `items` into `stream` with partition key = product code, at about `per_second`
/// records a second (a steady producer, so the relay's crashes fall mid-run). A call holds
/// each key at most once, so a record that failed (throttled) can be put again before any
/// later record of its key: a product's records enter the stream in the order given.
/// `put` counts the records in the stream. Returns how many records were put again.
pub async fn put_kinesis(
    client: Client,
    stream: String,
    items: Vec<Item>,
    per_second: f64,
    put: watch::Sender<usize>,
) -> usize {
    let start = tokio::time::Instant::now();
    let mut pending: std::collections::VecDeque<Item> = items.into();
    let mut done = 0usize;
    let mut retried = 0;
    while !pending.is_empty() {
        let mut batch = Vec::new();
        let mut keys = HashSet::new();
        while batch.len() < 500 {
            let Some(item) = pending.front() else { break };
            if !keys.insert(item.key.clone()) {
                break;
            }
            batch.push(pending.pop_front().expect("a front item"));
        }
        let entries = batch.iter().map(|item| {
            PutRecordsRequestEntry::builder()
                .partition_key(&item.key)
                .data(Blob::new(record_bytes(item)))
                .build()
                .expect("a complete entry")
        });
        let output = client
            .put_records()
            .stream_name(&stream)
            .set_records(Some(entries.collect()))
            .send()
            .await
            .unwrap_or_else(|error| {
                // Its outcome is unknown: a resend could put records twice, and a malformed
                // record twice would be quarantined twice. kinesalite is local: this is a
                // broken environment, not something to paper over.
                panic!(
                    "PutRecords failed: {}",
                    aws_sdk_kinesis::error::DisplayErrorContext(&error)
                )
            });
        let mut failed = Vec::new();
        for (item, result) in batch.into_iter().zip(output.records) {
            if result.error_code.is_some() {
                failed.push(item);
            } else {
                done += 1;
            }
        }
        retried += failed.len();
        // Failed records go first again; their keys have no later record in the stream yet.
        for item in failed.into_iter().rev() {
            pending.push_front(item);
        }
        put.send_replace(done);
        let due = start + Duration::from_secs_f64(done as f64 / per_second);
        tokio::time::sleep_until(due).await;
    }
    retried
}
