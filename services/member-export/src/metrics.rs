//! member-export's metrics (`mall_member_export_` prefix from the registry). Label values
//! come from small fixed sets, every one registered at start so a series exists before its
//! first event; no member id or other personal data is ever a label.

use mall_telemetry::metrics::{
    Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

/// The service's counters and gauges; cheap to clone.
#[derive(Debug, Clone)]
pub struct MemberMetrics {
    /// `changes_enqueued_total{outcome}`: EnqueueMemberChanges items by `accepted`, `opt_out`,
    /// `skipped_without_consent` and `stale`.
    pub enqueued: IntCounterVec,
    /// `deliveries_total{outcome}`: members `delivered` (the partner accepted), `refused` (its
    /// refusal recorded in failed_deliveries) or `skipped` (already delivered at its newest
    /// version, or an opt-out of a member the partner never had).
    pub deliveries: IntCounterVec,
    /// `partner_requests_total{outcome}`: requests to the partner, every attempt, by
    /// `accepted`, `split`, `retry`, `rate_limited` or `configuration`.
    pub requests: IntCounterVec,
    /// `partner_requests_in_flight`: requests to the partner now.
    pub in_flight: IntGauge,
    /// `rate_limit_wait_seconds`: how long each attempt waited for a rate-limit token.
    pub rate_limit_wait: Histogram,
    /// `rate_limit_per_second`: the partner's rate in force, shared by every replica (the
    /// configured one, or less after the partner refused for rate).
    pub rate_limit: Gauge,
    /// `batches_retrying`: batches now waiting to be sent again after the partner failed.
    pub retrying: IntGauge,
    /// `configuration_paused`: 1 while deliveries stop after a configuration error.
    pub configuration_paused: IntGauge,
    /// `queue_messages{state}`: delivery queue messages `visible`, `in_flight` and `dead`
    /// (refreshed every few seconds; approximate on SQS).
    pub queue: IntGaugeVec,
    /// `alerts_total{outcome}`: alerts this replica `sent` or `suppressed` (the cap is shared
    /// by every replica).
    pub alerts: IntCounterVec,
    /// `profiles_reencrypted_total`: profiles moved to the current key after a rotation.
    pub reencrypted: IntCounter,
    /// `failover_jobs_total{state}`: failover jobs this replica finished, by `succeeded` or
    /// `failed` (cancellations are counted by nobody: they happen in the API).
    pub failover_jobs: IntCounterVec,
    /// `failover_job_members_total{outcome}`: members failover jobs handled on this replica,
    /// by `delivered`, `refused` or `skipped`.
    pub failover_job_members: IntCounterVec,
    /// `delivery_freshness_seconds`: from recording a member's version (EnqueueMemberChanges
    /// answered) to the partner accepting it, for queued deliveries; the delivery SLO's input.
    pub freshness: Histogram,
}

const ENQUEUED: [&str; 4] = ["accepted", "opt_out", "skipped_without_consent", "stale"];
const DELIVERIES: [&str; 3] = ["delivered", "refused", "skipped"];
const REQUESTS: [&str; 5] = [
    "accepted",
    "split",
    "retry",
    "rate_limited",
    "configuration",
];
const QUEUE: [&str; 3] = ["visible", "in_flight", "dead"];

impl MemberMetrics {
    /// Registers the metrics in `registry`.
    ///
    /// # Errors
    /// When they are already registered there.
    pub fn register(registry: &Registry) -> mall_telemetry::metrics::Result<Self> {
        let metrics = Self {
            enqueued: IntCounterVec::new(
                Opts::new(
                    "changes_enqueued_total",
                    "EnqueueMemberChanges items by outcome",
                ),
                &["outcome"],
            )?,
            deliveries: IntCounterVec::new(
                Opts::new(
                    "deliveries_total",
                    "Members handled by the delivery workers, by outcome",
                ),
                &["outcome"],
            )?,
            requests: IntCounterVec::new(
                Opts::new(
                    "partner_requests_total",
                    "Requests to the partner (every attempt), by outcome",
                ),
                &["outcome"],
            )?,
            in_flight: IntGauge::new("partner_requests_in_flight", "Requests to the partner now")?,
            rate_limit_wait: Histogram::with_opts(
                HistogramOpts::new(
                    "rate_limit_wait_seconds",
                    "How long each attempt waited for a rate-limit token",
                )
                .buckets(vec![0.0, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]),
            )?,
            freshness: Histogram::with_opts(
                HistogramOpts::new(
                    "delivery_freshness_seconds",
                    "From recording a member change to the partner accepting it (queued deliveries)",
                )
                .buckets(vec![
                    0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
                ]),
            )?,
            rate_limit: Gauge::new(
                "rate_limit_per_second",
                "Requests per second to the partner in force, shared by every replica",
            )?,
            retrying: IntGauge::new(
                "batches_retrying",
                "Batches waiting to be sent again after the partner failed",
            )?,
            configuration_paused: IntGauge::new(
                "configuration_paused",
                "1 while deliveries stop after the partner refused our configuration",
            )?,
            queue: IntGaugeVec::new(
                Opts::new("queue_messages", "Delivery queue messages by state"),
                &["state"],
            )?,
            alerts: IntCounterVec::new(
                Opts::new(
                    "alerts_total",
                    "Alerts this replica sent or suppressed (capped)",
                ),
                &["outcome"],
            )?,
            reencrypted: IntCounter::new(
                "profiles_reencrypted_total",
                "Profiles moved to the current encryption key after a rotation",
            )?,
            failover_jobs: IntCounterVec::new(
                Opts::new(
                    "failover_jobs_total",
                    "Failover jobs finished on this replica, by state",
                ),
                &["state"],
            )?,
            failover_job_members: IntCounterVec::new(
                Opts::new(
                    "failover_job_members_total",
                    "Members handled by failover jobs on this replica, by outcome",
                ),
                &["outcome"],
            )?,
        };
        registry.register(Box::new(metrics.enqueued.clone()))?;
        registry.register(Box::new(metrics.deliveries.clone()))?;
        registry.register(Box::new(metrics.requests.clone()))?;
        registry.register(Box::new(metrics.in_flight.clone()))?;
        registry.register(Box::new(metrics.rate_limit_wait.clone()))?;
        registry.register(Box::new(metrics.rate_limit.clone()))?;
        registry.register(Box::new(metrics.retrying.clone()))?;
        registry.register(Box::new(metrics.configuration_paused.clone()))?;
        registry.register(Box::new(metrics.queue.clone()))?;
        registry.register(Box::new(metrics.alerts.clone()))?;
        registry.register(Box::new(metrics.reencrypted.clone()))?;
        registry.register(Box::new(metrics.failover_jobs.clone()))?;
        registry.register(Box::new(metrics.failover_job_members.clone()))?;
        registry.register(Box::new(metrics.freshness.clone()))?;
        for state in ["succeeded", "failed"] {
            metrics.failover_jobs.with_label_values(&[state]);
        }
        for outcome in ENQUEUED {
            metrics.enqueued.with_label_values(&[outcome]);
        }
        for outcome in DELIVERIES {
            metrics.deliveries.with_label_values(&[outcome]);
            metrics.failover_job_members.with_label_values(&[outcome]);
        }
        for outcome in REQUESTS {
            metrics.requests.with_label_values(&[outcome]);
        }
        for state in QUEUE {
            metrics.queue.with_label_values(&[state]);
        }
        for outcome in ["sent", "suppressed"] {
            metrics.alerts.with_label_values(&[outcome]);
        }
        Ok(metrics)
    }

    /// Metrics in a registry of their own, for code run outside a server (tests, tools).
    pub fn unregistered() -> Self {
        Self::register(&Registry::new()).expect("a fresh registry takes every metric")
    }

    /// Counts one EnqueueMemberChanges item.
    pub fn count_enqueued(&self, outcome: &str, count: i64) {
        self.enqueued
            .with_label_values(&[outcome])
            .inc_by(count.unsigned_abs());
    }

    /// The counter value of an `outcome` of `vec`.
    pub fn get(vec: &IntCounterVec, outcome: &str) -> i64 {
        i64::try_from(vec.with_label_values(&[outcome]).get()).unwrap_or(i64::MAX)
    }

    /// The partner's rate in force, requests per second.
    pub fn rate_in_force(&self, rate: f64) {
        self.rate_limit.set(rate);
    }

    /// Counts a request to the partner that ended with `outcome`.
    pub fn count_request(&self, outcome: &crate::partner::Outcome) {
        use crate::partner::Outcome;
        let label = match outcome {
            Outcome::Accepted { .. } => "accepted",
            Outcome::Split { .. } => "split",
            Outcome::Retry { .. } => "retry",
            Outcome::RateLimited { .. } => "rate_limited",
            Outcome::Configuration { .. } => "configuration",
        };
        self.requests.with_label_values(&[label]).inc();
    }
}
