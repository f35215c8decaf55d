//! Wiring: connect dependencies, bind listeners, register services.

use std::{future::Future, net::SocketAddr, sync::Arc};

use anyhow::Context as _;
use mall_grpc::GrpcServer;
use mall_proto::member::v1::member_export_service_server::MemberExportServiceServer;
use mall_queue::Queue;

use crate::migration::Migrator;
use crate::{
    SERVICE,
    alerts::Alerts,
    api::MemberApi,
    config::Settings,
    crypto::ProfileCipher,
    deliver::Workers,
    enqueue::Enqueuer,
    jobs::{JobsApi, Runner},
    metrics::MemberMetrics,
    outbound::{self, Limits},
    partner::{AnyPartner, Partner as _},
    ratelimit::{RateLimiter, RateSettings},
    reencrypt::Reencrypt,
    stats,
    store::Store,
};

/// A built `member-export`, listeners bound, ready to run.
#[derive(Debug)]
pub struct App {
    server: GrpcServer,
}

impl App {
    /// Connects dependencies, runs migrations and binds the listeners.
    ///
    /// # Errors
    /// When a dependency is unreachable or a listener cannot be bound.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        anyhow::ensure!(
            (1..=1_000).contains(&settings.enqueue.lanes),
            "enqueue.lanes must be 1 to 1000, not {}",
            settings.enqueue.lanes
        );
        anyhow::ensure!(
            (1..=1_000).contains(&settings.jobs.page_size),
            "jobs.page_size must be 1 to 1000, not {}",
            settings.jobs.page_size
        );
        anyhow::ensure!(
            settings.jobs.lease >= std::time::Duration::from_secs(3),
            "jobs.lease must be at least 3s (it is renewed every second)"
        );
        anyhow::ensure!(
            settings.delivery.claim_timeout >= settings.partner.request_timeout * 2,
            "delivery.claim_timeout ({:?}) must be at least twice partner.request_timeout ({:?}): \
             a request is only made while its members' claims outlast it",
            settings.delivery.claim_timeout,
            settings.partner.request_timeout
        );
        let cipher = Arc::new(ProfileCipher::new(&settings.encryption)?);
        let db = mall_db::connect::<Migrator>(&settings.database).await?;
        let queue = Queue::open(&settings.queue, Some(db.clone()))
            .await
            .context("failed to open the delivery queue")?;
        let mut server = GrpcServer::bind(SERVICE, &settings.server).await?;
        let metrics = MemberMetrics::register(server.registry())?;
        let partner = AnyPartner::new(&settings.partner)?;
        let max_batch = partner.max_batch();
        let delivery = &settings.delivery;
        anyhow::ensure!(
            delivery.rate_limit_per_second >= 1,
            "delivery.rate_limit_per_second must be at least 1"
        );
        let limiter = RateLimiter::new(
            &db,
            RateSettings {
                per_second: f64::from(delivery.rate_limit_per_second),
                recovery: delivery.rate_limit_recovery,
                max_pause: delivery.retry_max,
            },
            metrics.clone(),
        );
        let outbound = outbound::outbound(
            partner,
            limiter,
            Limits {
                max_concurrency: delivery.max_concurrency,
                max_attempts: delivery.max_attempts,
                retry_initial: delivery.retry_initial,
                retry_max: delivery.retry_max,
                request_timeout: settings.partner.request_timeout,
            },
            &metrics,
        );
        let store = Store::new(db.clone());
        server.spawn(
            "re-encryption",
            Reencrypt {
                store: store.clone(),
                cipher: cipher.clone(),
                interval: settings.encryption.reencrypt_interval,
                metrics: metrics.clone(),
            }
            .run(server.shutdown_token()),
        );
        let alerts = Alerts::new(&settings.alerts, db.clone(), metrics.clone())?;
        server.spawn(
            "alert summaries",
            alerts.clone().summarize(server.shutdown_token()),
        );
        server.spawn(
            "failure-rate alerts",
            alerts
                .clone()
                .watch_failure_rate(settings.alerts.clone(), server.shutdown_token()),
        );
        let (worker_count, receive_batch) = delivery.shape(max_batch, settings.enqueue.lanes);
        tracing::info!(
            workers = worker_count,
            receive_batch,
            max_batch,
            "delivery workers"
        );
        let workers = Workers {
            store: store.clone(),
            queue: queue.clone(),
            cipher: cipher.clone(),
            outbound,
            max_batch,
            receive_batch,
            receive_wait: delivery.receive_wait,
            visibility_timeout: settings.queue.visibility_timeout,
            retry_initial: delivery.retry_initial,
            retry_max: delivery.retry_max,
            configuration_pause: delivery.configuration_pause,
            paused_until: Arc::default(),
            parallel: delivery.max_concurrency.max(1),
            claim: delivery
                .claim_timeout
                .max(std::time::Duration::from_secs(1)),
            metrics: metrics.clone(),
            alerts: alerts.clone(),
        };
        server.spawn(
            "failover jobs",
            Runner {
                store: store.clone(),
                workers: workers.clone(),
                metrics: metrics.clone(),
                owner: fastrand::i64(1..),
                poll: settings.jobs.poll_interval,
                page_size: settings.jobs.page_size,
                lease: settings.jobs.lease,
            }
            .run(server.shutdown_token()),
        );
        let shutdown = server.shutdown_token();
        server.spawn("delivery workers", async move {
            workers.run(worker_count, shutdown).await;
            Ok(())
        });
        server.spawn(
            "queue gauges",
            stats::refresh_queue_gauges(queue.clone(), metrics.clone(), server.shutdown_token()),
        );
        let api = MemberApi {
            jobs: JobsApi {
                store: store.clone(),
            },
            enqueuer: Enqueuer {
                store,
                queue: queue.clone(),
                cipher,
                lanes: settings.enqueue.lanes,
                metrics: metrics.clone(),
            },
            stats: stats::Stats {
                queue,
                metrics,
                rate_limit_per_second: f64::from(delivery.rate_limit_per_second),
                max_concurrency: i32::try_from(delivery.max_concurrency).unwrap_or(i32::MAX),
                start_time: std::time::SystemTime::now(),
                alerts,
            },
        };
        server.add_service(
            MemberExportServiceServer::new(api)
                .max_decoding_message_size(settings.server.max_message_bytes),
        );
        server.set_readiness(move || {
            let db = db.clone();
            async move { mall_db::ping(&db).await }
        });
        Ok(Self { server })
    }

    /// Where gRPC listens (the real port when configured with port 0).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.server.grpc_addr()
    }

    /// Where the admin-only methods' gRPC listener listens, when `server.admin_grpc_addr` is
    /// set.
    pub fn admin_grpc_addr(&self) -> Option<SocketAddr> {
        self.server.admin_grpc_addr()
    }

    /// Where the admin HTTP server listens.
    pub fn admin_addr(&self) -> SocketAddr {
        self.server.admin_addr()
    }

    /// Serves until `shutdown` completes, then drains.
    ///
    /// # Errors
    /// When a server fails.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        self.server.run_until(shutdown).await
    }
}
