//! Accepting connections: a bound on how many are open, TLS handshakes with a deadline, each
//! on its own task, and the caller's identity handed to every request on the connection.
//!
//! tonic's own TLS acceptor cannot reload certificates and handshakes in its accept loop, so a
//! client that opens TCP and never finishes the handshake would hold up everyone behind it.
//! Here the accept loop only accepts: it takes a permit (at `max_connections` a new
//! connection is closed at once), spawns the handshake with `handshake_timeout`, and hands
//! finished connections to tonic through a channel. The permit lives as long as the
//! connection.

use std::{
    future::Future as _,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use mall_telemetry::metrics::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use rustls::ServerConfig;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;

use crate::{throttle::Throttle, tls::Reloading};

/// Which gRPC listener a connection came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// `server.listen_addr`.
    Main,
    /// `server.admin_grpc_addr`: where the admin-only methods are served when it is set.
    Admin,
}

/// Who is on the other end of a connection; every request carries it in its extensions
/// (`request.extensions().get::<Peer>()`).
#[derive(Debug, Clone)]
pub struct Peer {
    /// The caller's address.
    pub remote_addr: SocketAddr,
    /// The listener the connection came in on.
    pub listener: Listener,
    /// Whether the connection is TLS; without it there is no identity and no authorization.
    pub tls: bool,
    /// The identity in the caller's verified certificate (see [`crate::tls::identity_of`]);
    /// `None` without a certificate.
    pub identity: Option<Arc<str>>,
}

/// Bounds on connections, from the `server` settings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub max_connections: usize,
    pub handshake_timeout: Duration,
}

/// Connection metrics of one listener.
#[derive(Debug, Clone)]
pub(crate) struct ConnMetrics {
    open: IntGauge,
    refused: IntCounter,
    handshake_failures: IntCounterVec,
}

impl ConnMetrics {
    pub(crate) fn register(registry: &Registry) -> mall_telemetry::metrics::Result<Self> {
        let open = IntGauge::new(
            "grpc_connections_open",
            "gRPC connections open (TLS handshake finished), across listeners",
        )?;
        let refused = IntCounter::new(
            "grpc_connections_refused_total",
            "Connections closed at once because server.max_connections were open",
        )?;
        let handshake_failures = IntCounterVec::new(
            Opts::new(
                "grpc_tls_handshake_failures_total",
                "TLS handshakes that failed (error: a bad or untrusted certificate, not TLS) \
                 or did not finish within server.handshake_timeout (timeout)",
            ),
            &["reason"],
        )?;
        // Known before the first failure, so dashboards and alerts see a zero.
        for reason in ["error", "timeout"] {
            handshake_failures.with_label_values(&[reason]);
        }
        registry.register(Box::new(open.clone()))?;
        registry.register(Box::new(refused.clone()))?;
        registry.register(Box::new(handshake_failures.clone()))?;
        Ok(Self {
            open,
            refused,
            handshake_failures,
        })
    }
}

/// One accepted connection, plain or TLS.
#[derive(Debug)]
pub(crate) struct Conn {
    io: Io,
    peer: Peer,
    _open: OpenGuard,
    /// Until the client's HTTP/2 preface has arrived: when it passes, the connection is
    /// closed. hyper waits for a preface without a deadline of its own, so a client that
    /// finishes TLS (no certificate needed) and then says nothing, or a byte at a time,
    /// would hold a connection slot for good.
    preface_deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    read: usize,
}

/// The HTTP/2 client connection preface's length (`PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`).
const PREFACE_BYTES: usize = 24;

#[derive(Debug)]
enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// Holds a connection's permit and keeps the open-connections gauge while it lives.
#[derive(Debug)]
struct OpenGuard {
    _permit: OwnedSemaphorePermit,
    open: IntGauge,
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.open.dec();
    }
}

impl Connected for Conn {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(deadline) = self.preface_deadline.as_mut()
            && deadline.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no HTTP/2 preface within server.handshake_timeout",
            )));
        }
        let before = buf.filled().len();
        let result = match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        };
        if self.preface_deadline.is_some() && matches!(result, Poll::Ready(Ok(()))) {
            self.read += buf.filled().len() - before;
            if self.read >= PREFACE_BYTES {
                self.preface_deadline = None;
            }
        }
        result
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Finished connections to serve, from `listener`; see the module docs. The accept loop ends
/// at `shutdown` or when the stream is dropped.
pub(crate) fn incoming(
    listener: TcpListener,
    side: Listener,
    tls: Option<Reloading<ServerConfig>>,
    permits: Arc<Semaphore>,
    limits: Limits,
    metrics: ConnMetrics,
    shutdown: CancellationToken,
) -> ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let failures = Arc::new(Throttle::per_minute(10));
        loop {
            let accepted = tokio::select! {
                () = shutdown.cancelled() => return,
                () = tx.closed() => return,
                accepted = listener.accept() => accepted,
            };
            let (tcp, remote_addr) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "failed to accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                metrics.refused.inc();
                if let Some(suppressed) = failures.allow() {
                    tracing::warn!(%remote_addr, suppressed, max_connections = limits.max_connections,
                        "connection refused: server.max_connections are open");
                }
                continue;
            };
            // Nagle's algorithm would hold a response's last small frame until the client's
            // delayed ACK (40 ms) whenever a response spans two writes.
            if let Err(error) = tcp.set_nodelay(true) {
                tracing::debug!(%error, "failed to set TCP_NODELAY");
            }
            let tx = tx.clone();
            let tls = tls.clone();
            let metrics = metrics.clone();
            let failures = failures.clone();
            let preface_deadline = Box::pin(tokio::time::sleep(limits.handshake_timeout));
            tokio::spawn(async move {
                let (io, peer) = match tls {
                    None => (
                        Io::Plain(tcp),
                        Peer {
                            remote_addr,
                            listener: side,
                            tls: false,
                            identity: None,
                        },
                    ),
                    Some(tls) => {
                        let acceptor = TlsAcceptor::from(tls.current());
                        let handshake =
                            tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp));
                        let stream = match handshake.await {
                            Ok(Ok(stream)) => stream,
                            Ok(Err(error)) => {
                                metrics
                                    .handshake_failures
                                    .with_label_values(&["error"])
                                    .inc();
                                if let Some(suppressed) = failures.allow() {
                                    tracing::warn!(%remote_addr, %error, suppressed, "TLS handshake failed");
                                }
                                return;
                            }
                            Err(_elapsed) => {
                                metrics
                                    .handshake_failures
                                    .with_label_values(&["timeout"])
                                    .inc();
                                if let Some(suppressed) = failures.allow() {
                                    tracing::warn!(%remote_addr, timeout = ?limits.handshake_timeout, suppressed,
                                        "TLS handshake did not finish in time; connection closed");
                                }
                                return;
                            }
                        };
                        let identity = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|chain| chain.first())
                            .and_then(|leaf| crate::tls::identity_of(leaf));
                        (
                            Io::Tls(Box::new(stream)),
                            Peer {
                                remote_addr,
                                listener: side,
                                tls: true,
                                identity,
                            },
                        )
                    }
                };
                metrics.open.inc();
                let conn = Conn {
                    io,
                    peer,
                    preface_deadline: Some(preface_deadline),
                    read: 0,
                    _open: OpenGuard {
                        _permit: permit,
                        open: metrics.open.clone(),
                    },
                };
                // The server stopped accepting (shutdown): the connection is dropped.
                let _ = tx.send(Ok(conn)).await;
            });
        }
    });
    ReceiverStream::new(rx)
}
