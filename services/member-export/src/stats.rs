//! GetDeliveryStats: this replica's counters (from its metrics, since it started), and the
//! queue's sizes and the alert window's counts, which every replica shares.

use std::time::{Duration, SystemTime};

use mall_grpc::ServiceError;
use mall_proto::member::v1::DeliveryStats;
use mall_queue::Queue;
use tokio_util::sync::CancellationToken;

use crate::{alerts::Alerts, metrics::MemberMetrics};

/// How often the queue-size gauges are refreshed.
const QUEUE_GAUGE_INTERVAL: Duration = Duration::from_secs(10);

/// What GetDeliveryStats reads.
#[derive(Debug, Clone)]
pub struct Stats {
    /// The delivery queue.
    pub queue: Queue,
    /// This replica's counters.
    pub metrics: MemberMetrics,
    /// The configured rate limit.
    pub rate_limit_per_second: f64,
    /// The configured concurrency limit.
    pub max_concurrency: i32,
    /// When this replica started.
    pub start_time: SystemTime,
    /// The alert window shared by every replica.
    pub alerts: Alerts,
}

impl Stats {
    /// The statistics now.
    ///
    /// # Errors
    /// UNAVAILABLE when the queue cannot be read.
    pub async fn current(&self) -> Result<DeliveryStats, ServiceError> {
        let counts = self.queue.counts().await.map_err(|error| {
            // The queue's own message stays in the log: callers get a message of ours.
            tracing::warn!(%error, "cannot read the queue's counts");
            ServiceError::Unavailable("cannot read the delivery queue; retry with backoff".into())
        })?;
        set_queue_gauges(&self.metrics, counts);
        let window = self.alerts.current().await?;
        let m = &self.metrics;
        let requests = |outcome| MemberMetrics::get(&m.requests, outcome);
        let to_i64 = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        Ok(DeliveryStats {
            delivered_count: MemberMetrics::get(&m.deliveries, "delivered"),
            failed_count: ["split", "retry", "rate_limited", "configuration"]
                .into_iter()
                .map(requests)
                .sum(),
            retrying_count: m.retrying.get(),
            dead_letter_count: to_i64(counts.dead),
            skipped_without_consent_count: MemberMetrics::get(
                &m.enqueued,
                "skipped_without_consent",
            ),
            alerts_sent_count: window.sent,
            alerts_suppressed_count: window.suppressed,
            in_flight: m.in_flight.get(),
            rate_limit_per_second: self.rate_limit_per_second,
            max_concurrency: self.max_concurrency,
            queued_count: to_i64(counts.visible.saturating_add(counts.in_flight)),
            stale_count: MemberMetrics::get(&m.enqueued, "stale"),
            stats_start_time: Some(prost_types::Timestamp::from(self.start_time)),
        })
    }
}

fn set_queue_gauges(metrics: &MemberMetrics, counts: mall_queue::QueueCounts) {
    let set = |state: &str, n: u64| {
        metrics
            .queue
            .with_label_values(&[state])
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    };
    set("visible", counts.visible);
    set("in_flight", counts.in_flight);
    set("dead", counts.dead);
}

/// Keeps the `queue_messages` gauges current until `shutdown`.
///
/// # Errors
/// Never; a failed read is logged and tried again.
pub async fn refresh_queue_gauges(
    queue: Queue,
    metrics: MemberMetrics,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    mall_queue::watch_counts(
        queue,
        QUEUE_GAUGE_INTERVAL,
        shutdown.cancelled_owned(),
        |counts| set_queue_gauges(&metrics, counts),
    )
    .await;
    Ok(())
}
