//! Wiring: connect dependencies, bind listeners, start the stages, register services.

use std::{future::Future, net::SocketAddr, sync::Arc};

use anyhow::Context as _;
use mall_grpc::GrpcServer;
use mall_proto::sync::v1::sync_relay_service_server::SyncRelayServiceServer;
use mall_queue::Queue;

/// How often the lane queue's size gauges are refreshed.
const QUEUE_GAUGE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

use crate::{
    SERVICE,
    api::RelayApi,
    apply::{Applier, connect_catalog},
    config::{Settings, SourceKind},
    control::Control,
    ingest::{Ingest, KinesisSink},
    metrics::RelayMetrics,
    migration::Migrator,
    source::kinesis::KinesisSource,
    store::RelayStore,
};

/// A built `sync-relay`, listeners bound, stages ready to start with [`App::run_until`].
#[derive(Debug)]
pub struct App {
    server: GrpcServer,
}

impl App {
    /// Checks the settings, connects the database and the queue, binds the listeners and
    /// starts stage 1 (the Kinesis source, if configured) and stage 2 (the consumers).
    ///
    /// # Errors
    /// When a setting is invalid, a dependency is unreachable or a listener cannot be bound.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let relay = &settings.relay;
        relay
            .product_types
            .check()
            .map_err(|problem| anyhow::anyhow!("invalid relay.product_types: {problem}"))?;
        anyhow::ensure!(
            (1..=1024).contains(&relay.lanes),
            "relay.lanes must be 1 to 1024, not {}",
            relay.lanes
        );
        anyhow::ensure!(
            (4 * 1024..=mall_queue::limits::MAX_MESSAGE_BYTES - 1024)
                .contains(&relay.max_message_bytes),
            "relay.max_message_bytes must be 4 KiB to 1 MiB minus 1 KiB (room for attributes), not {}",
            relay.max_message_bytes
        );
        anyhow::ensure!(
            settings.apply.consumers >= 1,
            "apply.consumers must be at least 1"
        );
        anyhow::ensure!(
            settings.source.kinesis.reader_stall_timeout > settings.queue.sqs.operation_timeout * 2,
            "source.kinesis.reader_stall_timeout ({:?}) must exceed twice \
             queue.sqs.operation_timeout ({:?}): one delivery may send several queue calls, \
             and a reader still making progress must not lose its shard",
            settings.source.kinesis.reader_stall_timeout,
            settings.queue.sqs.operation_timeout
        );
        anyhow::ensure!(
            settings.queue.fifo,
            "queue.fifo must be true: lanes are FIFO message groups, and per-product order needs them"
        );

        let db = mall_db::connect::<Migrator>(&settings.database).await?;
        let queue = Queue::open(&settings.queue, Some(db.clone()))
            .await
            .context("failed to open the relay's queue")?;
        let mut server = GrpcServer::bind(SERVICE, &settings.server).await?;
        let metrics = RelayMetrics::register(server.registry())
            .context("failed to register relay metrics")?;
        let gauges = metrics.queue.clone();
        let store = RelayStore::new(db.clone());
        let control = Control::load(store.clone()).await?;
        let types = Arc::new(relay.product_types.clone());
        let ingest = Ingest::new(
            queue.clone(),
            store.clone(),
            types.clone(),
            relay.lanes,
            relay.max_message_bytes,
            metrics.clone(),
            control.clone(),
        );

        let kinesis_stream = match settings.source.kind {
            SourceKind::Grpc => None,
            SourceKind::Kinesis => {
                let replica = settings
                    .source
                    .replica_id
                    .clone()
                    .unwrap_or_else(default_replica_id);
                let kinesis = settings.source.kinesis.clone();
                let stream = kinesis.stream_name.clone();
                let source = KinesisSource::new(kinesis, db.clone(), replica, server.registry())?;
                server.spawn(
                    "kinesis source",
                    source.run(
                        KinesisSink {
                            ingest: ingest.clone(),
                        },
                        control.paused(),
                        server.shutdown_token(),
                    ),
                );
                Some(stream)
            }
        };

        let catalog = connect_catalog(
            &settings.apply.catalog_url,
            settings.apply.catalog_tls.as_ref(),
            settings.apply.catalog_timeout,
        )?;
        // Resolved here, where the lanes are known: the consumers share them.
        let mut apply = settings.apply.clone();
        apply.receive_lanes = Some(apply.receive_lanes(relay.lanes));
        let applier = Applier::new(
            queue.clone(),
            catalog,
            store.clone(),
            apply,
            settings.queue.visibility_timeout,
            metrics,
            control.clone(),
        );
        for _ in 0..settings.apply.consumers {
            server.spawn(
                "apply consumer",
                applier.clone().run(server.shutdown_token()),
            );
        }
        server.spawn(
            "pause switch",
            control
                .clone()
                .follow(relay.control_poll_interval, server.shutdown_token()),
        );

        server.spawn(
            "admin request retention",
            store.clone().expire_requests(server.shutdown_token()),
        );
        let api = RelayApi::new(
            ingest,
            queue.clone(),
            store,
            control,
            types,
            kinesis_stream,
            relay.lanes,
        );
        let max_message = settings.server.max_message_bytes;
        server.add_service(
            SyncRelayServiceServer::new(api)
                .max_decoding_message_size(max_message)
                .max_encoding_message_size(max_message),
        );
        let shutdown = server.shutdown_token();
        let watched = queue.clone();
        server.spawn("lane queue gauges", async move {
            mall_queue::watch_counts(
                watched,
                QUEUE_GAUGE_INTERVAL,
                shutdown.cancelled_owned(),
                move |counts| {
                    for (state, n) in [
                        ("visible", counts.visible),
                        ("in_flight", counts.in_flight),
                        ("dead", counts.dead),
                    ] {
                        gauges
                            .with_label_values(&[state])
                            .set(i64::try_from(n).unwrap_or(i64::MAX));
                    }
                },
            )
            .await;
            Ok(())
        });
        server.set_readiness(move || {
            let db = db.clone();
            let queue = queue.clone();
            async move {
                mall_db::ping(&db).await?;
                queue.ping().await.context("the queue does not answer")
            }
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

/// `<host name>-<process id>`: unique per replica without configuration (a pod's host name is
/// its name).
fn default_replica_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "relay".into());
    format!("{host}-{}", std::process::id())
}
