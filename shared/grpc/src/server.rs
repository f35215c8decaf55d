//! [`GrpcServer`]: binds the listeners, wires health, reflection, the tower stack and the
//! admin server around a service's own gRPC services, and runs until shutdown.

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use anyhow::Context as _;
use futures::future::BoxFuture;
use mall_telemetry::metrics::{IntGauge, Registry};
use rustls::ServerConfig;
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::{body::Body, server::NamedService, service::RoutesBuilder, transport::Server};
use tonic_health::{ServingStatus, server::HealthReporter};
use tower::ServiceBuilder;

use crate::{
    admin,
    authz::{AuthzLayer, AuthzMetrics, Policy},
    listen::{self, ConnMetrics, Limits, Listener},
    methods::Methods,
    observe::{GrpcMetrics, ObserveLayer},
    settings::ServerSettings,
    tls::{self, Reloading},
};

/// Largest header block (gRPC metadata) a call may send: oversized metadata is refused by
/// HTTP/2 itself before it reaches a handler.
const MAX_HEADER_LIST_BYTES: u32 = 64 * 1024;

/// Calls open at once on one HTTP/2 connection (the shared and per-caller limits still apply).
const MAX_STREAMS_PER_CONNECTION: u32 = 256;

/// Largest HTTP/2 frame a client may send (HTTP/2's default is 16 KiB): from a client that
/// honours it (h2-based ones such as tonic do), a bulk request of 1,000 of the benchmark's
/// products (roughly 0.7 MB) arrives in 3 frames instead of about 45, each of which was
/// handled on its own (the catalog's process CPU per written row at 4 requests in flight fell
/// by about a tenth). The flow-control windows stay hyper's (1 MiB per connection and per
/// stream): a connection may hold up to 1 MiB of request data not yet read plus one frame
/// being received, so `server.max_connections` bounds that memory at about 1.25 MiB each.
/// One frame delays the connection's other requests for as long as 256 KiB takes to send.
const MAX_FRAME_BYTES: u32 = 256 * 1024;

/// Connections open at once on the admin gRPC listener, a pool apart from the main one's.
const ADMIN_MAX_CONNECTIONS: usize = 64;

/// A check of the dependencies a service needs to do useful work (database, queue).
/// Returns `Err` with the reason when one is unreachable.
pub type Readiness = Arc<dyn Fn() -> BoxFuture<'static, anyhow::Result<()>> + Send + Sync>;

/// A gRPC server with its listeners already bound; see the crate docs.
pub struct GrpcServer {
    name: &'static str,
    settings: ServerSettings,
    grpc_listener: TcpListener,
    /// `server.admin_grpc_addr`: the admin-only methods' own listener, when configured.
    admin_grpc_listener: Option<TcpListener>,
    admin_listener: TcpListener,
    tls: Option<Reloading<ServerConfig>>,
    registry: Registry,
    routes: RoutesBuilder,
    service_names: Vec<String>,
    advertised: Vec<String>,
    descriptors: Vec<&'static [u8]>,
    readiness: Option<Readiness>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for GrpcServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcServer")
            .field("name", &self.name)
            .field("services", &self.service_names)
            .finish_non_exhaustive()
    }
}

impl GrpcServer {
    /// Binds the gRPC and admin listeners of service `name` (such as `product-catalog`).
    /// Port 0 picks a free port; [`GrpcServer::grpc_addr`] tells which.
    ///
    /// # Errors
    /// When a listener cannot be bound (port taken, address not local), when the TLS files
    /// cannot be loaded, or when the gRPC listener would serve plaintext on an address other
    /// than loopback without `server.insecure = true`.
    pub async fn bind(name: &'static str, settings: &ServerSettings) -> anyhow::Result<Self> {
        tls::install_crypto_provider();
        // A zero limit would refuse every connection or call: a typo, not a choice.
        for (key, value) in [
            ("server.max_connections", settings.max_connections),
            (
                "server.per_caller_concurrency",
                settings.per_caller_concurrency,
            ),
            ("server.concurrency_limit", settings.concurrency_limit),
        ] {
            anyhow::ensure!(value > 0, "{key} must be at least 1");
        }
        let tls = match &settings.tls {
            Some(files) => Some(tls::server_config(files).context("server.tls")?),
            None => {
                refuse_plaintext(
                    "server.listen_addr",
                    settings.listen_addr,
                    settings.insecure,
                )?;
                None
            }
        };
        let grpc_listener = TcpListener::bind(settings.listen_addr)
            .await
            .with_context(|| {
                format!(
                    "failed to bind the grpc listener on {}",
                    settings.listen_addr
                )
            })?;
        let admin_grpc_listener =
            match settings.admin_grpc_addr {
                None => None,
                Some(addr) => {
                    if tls.is_none() {
                        refuse_plaintext("server.admin_grpc_addr", addr, settings.insecure)?;
                    }
                    Some(TcpListener::bind(addr).await.with_context(|| {
                        format!("failed to bind the admin grpc listener on {addr}")
                    })?)
                }
            };
        let admin_listener = TcpListener::bind(settings.admin_addr)
            .await
            .with_context(|| {
                format!(
                    "failed to bind the admin listener on {}",
                    settings.admin_addr
                )
            })?;
        let prefix = format!("mall_{}", name.replace('-', "_"));
        let registry =
            Registry::with_prefix(&prefix).context("failed to create the metrics registry")?;
        Ok(Self {
            name,
            settings: settings.clone(),
            grpc_listener,
            admin_grpc_listener,
            admin_listener,
            tls,
            registry,
            routes: RoutesBuilder::default(),
            service_names: Vec::new(),
            advertised: Vec::new(),
            descriptors: vec![mall_proto::FILE_DESCRIPTOR_SET],
            readiness: None,
            tasks: TaskTracker::new(),
            shutdown: CancellationToken::new(),
        })
    }

    /// The address the gRPC server listens on.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_listener
            .local_addr()
            .expect("a bound tcp listener has a local address")
    }

    /// The address of the admin-only methods' gRPC listener, when `server.admin_grpc_addr` is
    /// set.
    pub fn admin_grpc_addr(&self) -> Option<SocketAddr> {
        self.admin_grpc_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// The address the admin HTTP server listens on.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_listener
            .local_addr()
            .expect("a bound tcp listener has a local address")
    }

    /// The registry served on `/metrics`; metric names get the `mall_<service>_` prefix.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Cancelled when shutdown starts: long-running streams and workers watch it to finish.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// The settings this server was bound with.
    pub fn settings(&self) -> &ServerSettings {
        &self.settings
    }

    /// Serves a gRPC service; it is listed by reflection and reported by health checks.
    pub fn add_service<S>(&mut self, service: S) -> &mut Self
    where
        S: tower::Service<http::Request<Body>, Error = Infallible, Response = http::Response<Body>>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.service_names.push(S::NAME.to_owned());
        self.routes.add_service(service);
        self
    }

    /// Describes a service from outside `mall-proto` (such as OTLP's `LogsService`) in
    /// reflection: an encoded `FileDescriptorSet` holding its files.
    pub fn add_descriptor_set(&mut self, encoded: &'static [u8]) -> &mut Self {
        self.descriptors.push(encoded);
        self
    }

    /// Lists a contract (`mall.sync.v1.SyncRelayService`) in reflection before it is
    /// implemented, so callers can review it; its calls answer UNIMPLEMENTED, honestly, until
    /// a later change serves it with [`GrpcServer::add_service`].
    pub fn advertise_unimplemented(&mut self, service_name: &str) -> &mut Self {
        self.advertised.push(service_name.to_owned());
        self
    }

    /// Sets the readiness probe: health is NOT_SERVING until it passes and whenever it fails.
    /// Without one the server is SERVING as soon as it runs.
    pub fn set_readiness<F, Fut>(&mut self, probe: F) -> &mut Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        self.readiness = Some(Arc::new(move || Box::pin(probe())));
        self
    }

    /// Runs background work (a queue consumer, a stream reader) for the server's lifetime.
    /// It must finish soon after [`GrpcServer::shutdown_token`] is cancelled; shutdown waits
    /// for it up to the drain timeout. An error is logged; the server keeps running.
    pub fn spawn<F>(&self, task: &'static str, work: F)
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        self.tasks.spawn(async move {
            if let Err(error) = work.await {
                tracing::error!(task, error = ?error, "background task failed");
            }
        });
    }

    /// Serves until `signal` completes, then drains: health goes NOT_SERVING, listeners stop
    /// accepting, in-flight calls and background tasks get up to `drain_timeout` to finish.
    ///
    /// # Errors
    /// When the gRPC server fails (not on a slow drain, which is logged).
    pub async fn run_until(self, signal: impl Future<Output = ()>) -> anyhow::Result<()> {
        let Self {
            name,
            settings,
            grpc_listener,
            admin_grpc_listener,
            admin_listener,
            tls,
            registry,
            mut routes,
            mut service_names,
            advertised,
            descriptors,
            readiness,
            tasks,
            shutdown,
        } = self;
        let grpc_addr = grpc_listener
            .local_addr()
            .context("grpc listener has no address")?;
        let admin_addr = admin_listener
            .local_addr()
            .context("admin listener has no address")?;

        let (health, health_service) = tonic_health::server::health_reporter();
        let ready = Ready::register(&registry)?;
        set_health(&health, &service_names, false).await;
        service_names.push(<tonic_health::pb::health_server::HealthServer<
            tonic_health::server::HealthService,
        > as NamedService>::NAME
            .to_owned());
        routes.add_service(health_service);
        let reflection = [
            "grpc.reflection.v1.ServerReflection".to_owned(),
            "grpc.reflection.v1alpha.ServerReflection".to_owned(),
        ];
        let listed: Vec<String> = service_names
            .iter()
            .chain(&advertised)
            .chain(&reflection)
            .cloned()
            .collect();
        add_reflection(&mut routes, &descriptors, &listed)?;

        let mut all_descriptors = descriptors.clone();
        all_descriptors.extend([
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ]);
        let methods = Arc::new(Methods::from_descriptors(&all_descriptors, &listed)?);
        let policy = Policy::compile(&settings.authz, &listed, &methods)?;
        if tls.is_none() {
            tracing::warn!(
                %grpc_addr,
                "gRPC is plaintext: no caller identities, the authorization policy is not applied"
            );
        }
        let metrics =
            GrpcMetrics::register(&registry).context("failed to register grpc metrics")?;
        metrics.preinit(&methods);
        let authz_metrics =
            AuthzMetrics::register(&registry).context("failed to register authz metrics")?;
        let conn_metrics =
            ConnMetrics::register(&registry).context("failed to register connection metrics")?;
        let stack = ServiceBuilder::new()
            // Traces, deadlines and metrics see every call, shed and refused ones included.
            .layer(ObserveLayer::new(
                metrics,
                methods.clone(),
                settings.request_timeout,
            ))
            // Who may call what, and each caller's own bound, before the shared limit below.
            .layer(AuthzLayer::new(
                policy,
                methods,
                tls.is_some(),
                authz_metrics,
                settings.per_caller_concurrency,
                admin_grpc_listener.is_some(),
            ))
            // Refuse at once rather than queue when the limit below has no permit free.
            .load_shed()
            // One limit shared by all connections, so many clients cannot multiply it.
            .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
                settings.concurrency_limit,
            ))
            .into_inner();

        let limits = Limits {
            max_connections: settings.max_connections,
            handshake_timeout: settings.handshake_timeout,
        };
        // The main listener's connections are bounded by `max_connections`; the admin listener
        // has a small pool of its own, so a flood of connections to the main one cannot lock
        // the operators out.
        let permits = Arc::new(Semaphore::new(settings.max_connections));
        let admin_permits = Arc::new(Semaphore::new(ADMIN_MAX_CONNECTIONS));
        let routes = routes.routes();
        let serve = |listener, side| {
            let incoming = listen::incoming(
                listener,
                side,
                tls.clone(),
                match side {
                    Listener::Main => permits.clone(),
                    Listener::Admin => admin_permits.clone(),
                },
                limits,
                conn_metrics.clone(),
                shutdown.clone(),
            );
            Server::builder()
                .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
                .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
                .max_frame_size(Some(MAX_FRAME_BYTES))
                // Find connections whose peer vanished without closing them.
                .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
                .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
                .layer(stack.clone())
                .serve_with_incoming_shutdown(
                    routes.clone(),
                    incoming,
                    shutdown.clone().cancelled_owned(),
                )
        };
        let main_grpc = serve(grpc_listener, Listener::Main);
        let admin_grpc = admin_grpc_listener.map(|listener| serve(listener, Listener::Admin));
        let grpc = async move {
            match admin_grpc {
                Some(admin_grpc) => {
                    let (main, admin) = tokio::join!(main_grpc, admin_grpc);
                    main.and(admin)
                }
                None => main_grpc.await,
            }
        };
        let admin_router = admin::router(admin::AdminState {
            registry,
            ready: ready.clone(),
        });
        let admin = axum::serve(admin_listener, admin_router)
            .with_graceful_shutdown(shutdown.clone().cancelled_owned());

        // Health changes one at a time: a probe that passes just as the drain begins must not
        // mark the server SERVING after the drain marked it NOT_SERVING.
        let health_gate = Arc::new(tokio::sync::Mutex::new(()));
        tasks.spawn(watch_readiness(
            readiness,
            settings.readiness_interval,
            health.clone(),
            service_names.clone(),
            ready.clone(),
            (shutdown.clone(), health_gate.clone()),
        ));
        tracing::info!(service = name, %grpc_addr, %admin_addr, "serving");

        let mut grpc = std::pin::pin!(grpc);
        let mut admin = std::pin::pin!(admin.into_future());
        tokio::select! {
            () = signal => {}
            result = &mut grpc => {
                shutdown.cancel();
                return result.context("grpc server failed");
            }
            result = &mut admin => {
                shutdown.cancel();
                return result.context("admin server failed");
            }
        }

        tracing::info!(drain_timeout = ?settings.drain_timeout, "draining");
        {
            let _gate = health_gate.lock().await;
            set_health(&health, &service_names, false).await;
            // /readyz too, from the first moment of the drain: readiness probes go to /readyz
            // (kubelet's gRPC probes present no client certificate), and the pod must leave
            // the Service's endpoints while it finishes its calls.
            ready.set(false);
            shutdown.cancel();
        }
        tasks.close();
        let drained = tokio::time::timeout(settings.drain_timeout, async {
            let (grpc, admin, ()) = tokio::join!(grpc, admin, tasks.wait());
            grpc.context("grpc server failed while draining")?;
            admin.context("admin server failed while draining")
        })
        .await;
        match drained {
            Ok(result) => result?,
            // Nothing is acknowledged before it is durable, so abandoning work is safe: it is
            // redelivered to a replica. Say so and exit cleanly.
            Err(_) => tracing::warn!(
                drain_timeout = ?settings.drain_timeout,
                "drain timeout passed; abandoning the calls and tasks still running"
            ),
        }
        tracing::info!(service = name, "stopped");
        Ok(())
    }
}

/// Refuses a plaintext listener on `addr` unless it is loopback or `insecure` is set.
///
/// # Errors
/// The refusal, naming the setting and how to change it.
pub fn refuse_plaintext(setting: &str, addr: SocketAddr, insecure: bool) -> anyhow::Result<()> {
    if addr.ip().is_loopback() || insecure {
        return Ok(());
    }
    anyhow::bail!(
        "{setting} = {addr} is not a loopback address and no TLS is configured: configure \
         [server.tls] (cert_file, key_file, client_ca_file), or set server.insecure = true to \
         serve plaintext to the whole network on purpose"
    )
}

fn add_reflection(
    routes: &mut RoutesBuilder,
    descriptors: &[&'static [u8]],
    service_names: &[String],
) -> anyhow::Result<()> {
    let mut v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
    let mut v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
    for &descriptor in descriptors {
        v1 = v1.register_encoded_file_descriptor_set(descriptor);
        v1alpha = v1alpha.register_encoded_file_descriptor_set(descriptor);
    }
    // List only what this server serves, not every service in the shared descriptor set.
    for name in service_names {
        v1 = v1.with_service_name(name.clone());
        v1alpha = v1alpha.with_service_name(name.clone());
    }
    routes.add_service(v1.build_v1().context("failed to build reflection v1")?);
    routes.add_service(
        v1alpha
            .build_v1alpha()
            .context("failed to build reflection v1alpha")?,
    );
    Ok(())
}

async fn set_health(health: &HealthReporter, services: &[String], serving: bool) {
    let status = if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    // "" is the whole server, which is what Kubernetes' gRPC probe asks about by default.
    health.set_service_status("", status).await;
    for name in services {
        health.set_service_status(name, status).await;
    }
}

/// Whether the service takes traffic: `/readyz` answers from it and `mall_<service>_ready`
/// (1 or 0) reports it to Prometheus, so the "not ready" alert sees what Kubernetes sees.
#[derive(Debug, Clone)]
pub(crate) struct Ready {
    flag: Arc<AtomicBool>,
    gauge: IntGauge,
}

impl Ready {
    fn register(registry: &Registry) -> anyhow::Result<Self> {
        let gauge = IntGauge::new(
            "ready",
            "1 while the service is ready for traffic (dependencies reachable, not draining), else 0",
        )?;
        registry
            .register(Box::new(gauge.clone()))
            .context("failed to register the readiness gauge")?;
        Ok(Self {
            flag: Arc::new(AtomicBool::new(false)),
            gauge,
        })
    }

    fn set(&self, ready: bool) {
        self.flag.store(ready, Ordering::Relaxed);
        self.gauge.set(i64::from(ready));
    }

    pub(crate) fn get(&self) -> bool {
        self.flag.load(Ordering::Relaxed)
    }
}

/// Keeps health and `/readyz` in line with the readiness probe until shutdown.
async fn watch_readiness(
    probe: Option<Readiness>,
    interval: std::time::Duration,
    health: HealthReporter,
    services: Vec<String>,
    ready: Ready,
    (shutdown, gate): (CancellationToken, Arc<tokio::sync::Mutex<()>>),
) {
    let mut last: Option<bool> = None;
    loop {
        let result = match &probe {
            Some(probe) => probe().await,
            None => Ok(()),
        };
        let serving = result.is_ok();
        if last != Some(serving) {
            match &result {
                Ok(()) => tracing::info!("dependencies reachable; health is SERVING"),
                Err(error) => {
                    tracing::warn!(error = ?error, "a dependency is unreachable; health is NOT_SERVING");
                }
            }
            // A probe that finished after the drain began must not mark the pod ready again:
            // the drain cancels under the same gate, after setting NOT_SERVING.
            let _gate = gate.lock().await;
            if shutdown.is_cancelled() {
                return;
            }
            set_health(&health, &services, serving).await;
            ready.set(serving);
            last = Some(serving);
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn zero_limits_and_plaintext_beyond_loopback_stop_start_up_naming_the_key() {
        for (key, settings) in [
            (
                "server.max_connections",
                ServerSettings {
                    max_connections: 0,
                    ..ServerSettings::default()
                },
            ),
            (
                "server.per_caller_concurrency",
                ServerSettings {
                    per_caller_concurrency: 0,
                    ..ServerSettings::default()
                },
            ),
            (
                "server.listen_addr",
                ServerSettings {
                    listen_addr: "0.0.0.0:0".parse().expect("an address"),
                    ..ServerSettings::default()
                },
            ),
        ] {
            let error = GrpcServer::bind("test", &settings)
                .await
                .expect_err(key)
                .to_string();
            assert!(error.contains(key), "{key}: {error}");
        }
        GrpcServer::bind("test", &ServerSettings::default())
            .await
            .expect("the defaults bind");
    }

    /// The server announces [`MAX_FRAME_BYTES`] in its HTTP/2 SETTINGS, so clients may send
    /// frames that large (read off the wire: h2's client API does not expose the peer's value).
    #[tokio::test]
    async fn the_server_lets_clients_send_frames_of_max_frame_bytes() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        const SETTINGS: u8 = 0x4;
        const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;

        let server = GrpcServer::bind("test", &ServerSettings::default())
            .await
            .expect("the defaults bind");
        let addr = server.grpc_addr();
        let stop = CancellationToken::new();
        let running = tokio::spawn(server.run_until(stop.clone().cancelled_owned()));

        let mut stream = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        .expect("connects in time")
        .expect("connects");
        // The client preface and an empty SETTINGS frame.
        stream
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .await
            .expect("preface sent");
        let announced = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            // The server's first frame is its SETTINGS.
            let mut header = [0u8; 9];
            stream
                .read_exact(&mut header)
                .await
                .expect("a frame header");
            assert_eq!(header[3], SETTINGS, "the first frame is SETTINGS");
            let length = usize::from(header[1]) << 8 | usize::from(header[2]);
            let mut payload = vec![0; length];
            stream.read_exact(&mut payload).await.expect("the settings");
            payload.chunks_exact(6).find_map(|setting| {
                (u16::from_be_bytes([setting[0], setting[1]]) == SETTINGS_MAX_FRAME_SIZE)
                    .then(|| u32::from_be_bytes([setting[2], setting[3], setting[4], setting[5]]))
            })
        })
        .await
        .expect("the server answers in time");
        assert_eq!(announced, Some(MAX_FRAME_BYTES));

        // Closed first, or the shutdown waits out its grace period for this connection.
        drop(stream);
        stop.cancel();
        running
            .await
            .expect("the server task ends")
            .expect("the server stops cleanly");
    }
}
