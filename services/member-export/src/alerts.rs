//! Failure alerts to a Slack-compatible incoming webhook, capped across every replica.
//!
//! At most `alerts.max_per_window` alerts go out per window (`alerts.window`, aligned to the
//! epoch), however many replicas raise them: each alert first takes a slot in the window's
//! row of `alert_windows` with one conditional update (`sent < max`), which the database
//! serializes, so two replicas can never both take the last slot. An alert without a slot is
//! counted as suppressed. After a window ends, one replica claims its row (`summarized`, set
//! by one conditional update) and sends a single message summing up what was suppressed.
//!
//! A slot is taken before the message is sent, so a failed send still counts: "at most" holds
//! even when the webhook fails (the failure is logged at WARN). Alerts carry member ids,
//! counts and reason codes, never personal data.

use std::time::Duration;

use mall_db::Backend;
use mall_grpc::ServiceError;
use sea_orm::{ConnectionTrait as _, DatabaseConnection, Statement, Value};
use secrecy::{ExposeSecret as _, SecretString};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::{
    metrics::MemberMetrics,
    store::{db_error, now_millis},
};

/// Where alerts go and how many.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AlertSettings {
    /// The incoming webhook (Slack or compatible: a POST of `{"text": ...}`); a secret, never
    /// printed. Unset: alerts are only logged (and still counted against the cap).
    #[serde(serialize_with = "mall_config::serialize_optional_secret")]
    pub webhook_url: Option<SecretString>,
    /// Most alerts per window across all replicas.
    pub max_per_window: u32,
    /// The window.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// How long one webhook call may take.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Share of failed partner requests (5xx, timeouts, rate limits) over one
    /// `failure_rate_period` that raises an alert (at most once per `window` per replica).
    pub failure_rate_threshold: f64,
    /// The period the failure rate is measured over.
    #[serde(with = "humantime_serde")]
    pub failure_rate_period: Duration,
    /// Fewest requests in a period for its rate to count.
    pub failure_rate_min_requests: u64,
}

impl Default for AlertSettings {
    fn default() -> Self {
        Self {
            webhook_url: None,
            max_per_window: 10,
            window: Duration::from_secs(3600),
            request_timeout: Duration::from_secs(5),
            failure_rate_threshold: 0.5,
            failure_rate_period: Duration::from_secs(60),
            failure_rate_min_requests: 20,
        }
    }
}

/// Raises capped alerts; cheap to clone.
#[derive(Debug, Clone)]
pub struct Alerts {
    db: DatabaseConnection,
    backend: Backend,
    client: reqwest::Client,
    webhook: Option<SecretString>,
    max: i64,
    window_ms: i64,
    metrics: MemberMetrics,
}

/// The counts of the window in force, shared by every replica.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WindowCounts {
    /// Alerts sent in it.
    pub sent: i64,
    /// Alerts suppressed in it.
    pub suppressed: i64,
}

impl Alerts {
    /// Alerts as `settings` say, counted in `db`.
    ///
    /// # Errors
    /// When the window or the cap is zero, or the HTTP client cannot be built.
    pub fn new(
        settings: &AlertSettings,
        db: DatabaseConnection,
        metrics: MemberMetrics,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            settings.window >= Duration::from_secs(1),
            "alerts.window must be at least 1s"
        );
        let client = reqwest::Client::builder()
            .timeout(settings.request_timeout)
            .build()?;
        Ok(Self {
            backend: Backend::of(&db),
            db,
            client,
            webhook: settings.webhook_url.clone(),
            max: i64::from(settings.max_per_window),
            window_ms: i64::try_from(settings.window.as_millis()).unwrap_or(i64::MAX),
            metrics,
        })
    }

    /// Raises an alert with `text` (never personal data): sent if the window has a slot left,
    /// counted as suppressed otherwise. Whether it was sent.
    ///
    /// # Errors
    /// UNAVAILABLE or INTERNAL when the database fails (nothing was sent).
    pub async fn raise(&self, text: &str) -> Result<bool, ServiceError> {
        let window = self.window_start(now_millis());
        self.exec(
            "INSERT INTO alert_windows (window_start, sent, suppressed, summarized) \
             VALUES ($1, 0, 0, false) ON CONFLICT (window_start) DO NOTHING",
            vec![window.into()],
        )
        .await?;
        let took = self
            .exec(
                "UPDATE alert_windows SET sent = sent + 1 WHERE window_start = $1 AND sent < $2",
                vec![window.into(), self.max.into()],
            )
            .await?;
        if took == 0 {
            self.exec(
                "UPDATE alert_windows SET suppressed = suppressed + 1 WHERE window_start = $1",
                vec![window.into()],
            )
            .await?;
            self.metrics.alerts.with_label_values(&["suppressed"]).inc();
            tracing::info!("alert suppressed: the window's cap is reached");
            return Ok(false);
        }
        self.metrics.alerts.with_label_values(&["sent"]).inc();
        self.send(text).await;
        Ok(true)
    }

    /// The counts of the window in force.
    ///
    /// # Errors
    /// UNAVAILABLE or INTERNAL when the database fails.
    pub async fn current(&self) -> Result<WindowCounts, ServiceError> {
        let row = self
            .db
            .query_one_raw(self.statement(
                "SELECT sent, suppressed FROM alert_windows WHERE window_start = $1",
                vec![self.window_start(now_millis()).into()],
            ))
            .await
            .map_err(|e| db_error(e, "read the alert window"))?;
        let Some(row) = row else {
            return Ok(WindowCounts::default());
        };
        let get = |column| -> Result<i64, ServiceError> {
            row.try_get::<i32>("", column)
                .map(i64::from)
                .map_err(|e| db_error(e, "read the alert window"))
        };
        Ok(WindowCounts {
            sent: get("sent")?,
            suppressed: get("suppressed")?,
        })
    }

    /// Sums up every ended window with suppressed alerts, once across replicas, until
    /// `shutdown`; looks every quarter window.
    ///
    /// # Errors
    /// Never; failures are logged and tried again.
    pub async fn summarize(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let every = Duration::from_millis(u64::try_from(self.window_ms / 4).unwrap_or(1).max(50));
        loop {
            if let Err(error) = self.summarize_ended().await {
                tracing::warn!(%error, "cannot sum up suppressed alerts; trying again");
            }
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(every) => {}
            }
        }
    }

    async fn summarize_ended(&self) -> Result<(), ServiceError> {
        let current = self.window_start(now_millis());
        let ended = self
            .db
            .query_all_raw(self.statement(
                "SELECT window_start, suppressed FROM alert_windows \
                 WHERE window_start < $1 AND suppressed > 0 AND summarized = false",
                vec![current.into()],
            ))
            .await
            .map_err(|e| db_error(e, "read ended alert windows"))?;
        for row in ended {
            let start: i64 = row
                .try_get("", "window_start")
                .map_err(|e| db_error(e, "read an alert window"))?;
            let suppressed: i32 = row
                .try_get("", "suppressed")
                .map_err(|e| db_error(e, "read an alert window"))?;
            // Whoever flips the flag sends the summary; the other replicas' updates match no
            // row.
            let claimed = self
                .exec(
                    "UPDATE alert_windows SET summarized = true \
                     WHERE window_start = $1 AND summarized = false",
                    vec![start.into()],
                )
                .await?;
            if claimed == 1 {
                self.send(&format!(
                    "member-export: {suppressed} more alert(s) were suppressed in the window \
                     starting at {} (at most {} per window); see the service's logs and \
                     ListFailedDeliveries",
                    chrono::DateTime::from_timestamp_millis(start)
                        .map(|t| t.to_rfc3339())
                        .unwrap_or_default(),
                    self.max
                ))
                .await;
            }
        }
        Ok(())
    }

    async fn send(&self, text: &str) {
        let Some(webhook) = &self.webhook else {
            tracing::warn!(alert = %text, "alert (no alerts.webhook_url configured)");
            return;
        };
        let sent = self
            .client
            .post(webhook.expose_secret())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(serde_json::json!({ "text": text }).to_string())
            .send()
            .await
            .and_then(reqwest::Response::error_for_status);
        match sent {
            Ok(_) => tracing::info!(alert = %text, "alert sent"),
            // The error names the URL, which holds the webhook's secret: keep its kind only.
            Err(error) => tracing::warn!(
                alert = %text,
                status = ?error.status(),
                timeout = error.is_timeout(),
                "the alert webhook failed; the alert still counts against the cap"
            ),
        }
    }

    /// Watches this replica's partner requests until `shutdown`: when failures reach
    /// `failure_rate_threshold` of at least `failure_rate_min_requests` in one period, an
    /// alert is raised, at most once per alert window.
    ///
    /// # Errors
    /// Never.
    pub async fn watch_failure_rate(
        self,
        settings: AlertSettings,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let counts = |metrics: &MemberMetrics| {
            let get = |outcome| MemberMetrics::get(&metrics.requests, outcome).unsigned_abs();
            (get("accepted"), get("retry") + get("rate_limited"))
        };
        let (mut ok_before, mut failed_before) = counts(&self.metrics);
        let mut last_alert: Option<tokio::time::Instant> = None;
        let quiet = Duration::from_millis(u64::try_from(self.window_ms).unwrap_or(u64::MAX));
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(settings.failure_rate_period) => {}
            }
            let (ok, failed) = counts(&self.metrics);
            let (ok_now, failed_now) = (ok - ok_before, failed - failed_before);
            (ok_before, failed_before) = (ok, failed);
            let total = ok_now + failed_now;
            #[allow(clippy::cast_precision_loss)] // counts of one period
            let rate = failed_now as f64 / total.max(1) as f64;
            let due = last_alert.is_none_or(|at| at.elapsed() >= quiet);
            if total >= settings.failure_rate_min_requests
                && rate >= settings.failure_rate_threshold
                && due
            {
                last_alert = Some(tokio::time::Instant::now());
                let text = format!(
                    "member-export: {failed_now} of {total} requests to the partner failed in \
                     the last {:?} ({:.0} %); deliveries are retried and wait",
                    settings.failure_rate_period,
                    rate * 100.0
                );
                if let Err(error) = self.raise(&text).await {
                    tracing::warn!(%error, "cannot count an alert; not sent");
                }
            }
        }
    }

    fn window_start(&self, now: i64) -> i64 {
        now - now.rem_euclid(self.window_ms)
    }

    fn statement(&self, sql: &str, values: Vec<Value>) -> Statement {
        self.backend.statement(sql, values)
    }

    async fn exec(&self, sql: &str, values: Vec<Value>) -> Result<u64, ServiceError> {
        self.db
            .execute_raw(self.statement(sql, values))
            .await
            .map(|result| result.rows_affected())
            .map_err(|e| db_error(e, "count an alert"))
    }
}
