//! Outgoing calls: channels to other services (mutual TLS when configured) and the current
//! trace context in gRPC metadata.

use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use anyhow::Context as _;
use hyper_util::rt::TokioIo;
use opentelemetry::propagation::Injector;
use rustls::{ClientConfig, pki_types::ServerName};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::TlsConnector;
use tonic::{
    Request, Status,
    metadata::{MetadataKey, MetadataMap, MetadataValue},
    service::Interceptor,
    transport::{Channel, Endpoint},
};

use crate::tls::{self, ClientTls, Reloading};

/// A channel to `url` (`http://host:port`, or `https://host:port` with `tls`) that connects on
/// first use and reconnects after failures. With `tls`, each new connection is a TLS
/// connection with the certificate files as they are then (see [`crate::tls`]).
///
/// # Errors
/// When `url` is not a valid endpoint or the TLS files cannot be loaded.
pub fn lazy_channel(
    url: &str,
    tls: Option<&ClientTls>,
    connect_timeout: Duration,
) -> anyhow::Result<Channel> {
    let (endpoint, connector) = endpoint(url, tls, connect_timeout)?;
    Ok(match connector {
        Some(connector) => endpoint.connect_with_connector_lazy(connector.service()),
        None => endpoint.connect_lazy(),
    })
}

/// Like [`lazy_channel`], but connects now, so a command line tool can say at once that the
/// server cannot be reached.
///
/// # Errors
/// As [`lazy_channel`], and when the connection or the TLS handshake fails.
pub async fn connect(
    url: &str,
    tls: Option<&ClientTls>,
    connect_timeout: Duration,
) -> anyhow::Result<Channel> {
    let (endpoint, connector) = endpoint(url, tls, connect_timeout)?;
    let channel = match connector {
        Some(connector) => endpoint.connect_with_connector(connector.service()).await,
        None => endpoint.connect().await,
    };
    Ok(channel?)
}

fn endpoint(
    url: &str,
    tls: Option<&ClientTls>,
    connect_timeout: Duration,
) -> anyhow::Result<(Endpoint, Option<Connector>)> {
    let uri: http::Uri = url
        .parse()
        .with_context(|| format!("{url:?} is not a valid URL"))?;
    let Some(tls) = tls else {
        anyhow::ensure!(
            uri.scheme_str() != Some("https"),
            "{url} is https but no client TLS is configured"
        );
        let endpoint = Endpoint::from_shared(url.to_owned())?
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true);
        return Ok((endpoint, None));
    };
    let host = uri
        .host()
        .with_context(|| format!("{url} has no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']');
    let name = tls.server_name.as_deref().unwrap_or(host).to_owned();
    let server_name = ServerName::try_from(name.clone())
        .with_context(|| format!("{name:?} is not a valid TLS server name"))?;
    let port = uri.port_u16().unwrap_or(443);
    // tonic is handed plain http: the TLS is ours (certificates reloaded on change, see
    // crate::tls), done by the connector below.
    let plain = format!("http://{}:{port}", uri.host().unwrap_or(host));
    let endpoint = Endpoint::from_shared(plain)?.connect_timeout(connect_timeout);
    let connector = Connector {
        config: tls::client_config(tls)?,
        server_name,
    };
    Ok((endpoint, Some(connector)))
}

/// Opens TCP connections and runs the TLS handshake for a tonic channel.
#[derive(Clone)]
struct Connector {
    config: Reloading<ClientConfig>,
    server_name: ServerName<'static>,
}

impl Connector {
    fn service(
        self,
    ) -> impl tower::Service<
        http::Uri,
        Response = TokioIo<Replayed<tokio_rustls::client::TlsStream<TcpStream>>>,
        Error = std::io::Error,
        Future = impl Send,
    > + Send
    + 'static {
        tower::service_fn(move |uri: http::Uri| {
            let config = self.config.current();
            let server_name = self.server_name.clone();
            async move {
                let host = uri.host().unwrap_or("localhost").to_owned();
                let port = uri.port_u16().unwrap_or(443);
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let tcp = TcpStream::connect((host, port)).await?;
                tcp.set_nodelay(true)?;
                let mut tls = TlsConnector::from(config).connect(server_name, tcp).await?;
                // In TLS 1.3 the server checks a client certificate after the client has
                // finished its side of the handshake, and refuses one it does not trust with
                // an alert. An HTTP/2 server speaks first (its SETTINGS), so wait for its first
                // bytes: a refusal then fails this connection attempt, which the caller sees
                // as UNAVAILABLE naming the alert, instead of a call cut off as CANCELLED.
                let mut first = vec![0; 4096];
                let read = tokio::time::timeout(FIRST_BYTES_TIMEOUT, tls.read(&mut first))
                    .await
                    .map_err(|_| {
                        std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "the server sent nothing after the TLS handshake",
                        )
                    })?
                    .map_err(|error| {
                        std::io::Error::new(
                            error.kind(),
                            format!("the server refused the TLS connection: {error}"),
                        )
                    })?;
                if read == 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionAborted,
                        "the server closed the connection right after the TLS handshake",
                    ));
                }
                first.truncate(read);
                Ok(TokioIo::new(Replayed {
                    prefix: first,
                    offset: 0,
                    inner: tls,
                }))
            }
        })
    }
}

/// How long a new TLS connection waits for the server's first bytes (see the connector).
const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(10);

/// A stream whose first bytes were already read: they are read again before the rest.
#[derive(Debug)]
struct Replayed<S> {
    prefix: Vec<u8>,
    offset: usize,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Replayed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.offset < self.prefix.len() {
            let n = buf.remaining().min(self.prefix.len() - self.offset);
            let start = self.offset;
            buf.put_slice(&self.prefix[start..start + n]);
            self.offset += n;
            if self.offset == self.prefix.len() {
                self.prefix = Vec::new();
                self.offset = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replayed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// An RPC client span (OpenTelemetry semantic conventions) for a call of `path`
/// (`package.Service/Method`); run the call in it so [`TraceContextInterceptor`] sends its
/// context and the server's span becomes its child.
pub fn call_span(path: &'static str) -> tracing::Span {
    let (service, method) = path.split_once('/').unwrap_or((path, ""));
    tracing::info_span!(
        "grpc.call",
        otel.name = path,
        otel.kind = "client",
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
        rpc.grpc.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    )
}

/// Records a call's outcome on its [`call_span`]: the status code, and an error status for
/// the codes that are the server's fault.
pub fn record_call(span: &tracing::Span, code: tonic::Code) {
    span.record("rpc.grpc.status_code", code as i32);
    if crate::observe::is_server_error(code) {
        span.record("otel.status_code", "error");
    }
}

/// Interceptor that writes the current span's W3C `traceparent`/`tracestate` into every
/// outgoing request, so the callee's spans join the caller's trace.
#[derive(Debug, Clone, Copy, Default)]
pub struct TraceContextInterceptor;

impl Interceptor for TraceContextInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        inject_metadata(request.metadata_mut());
        Ok(request)
    }
}

/// Writes the current span's trace context into `metadata`.
pub fn inject_metadata(metadata: &mut MetadataMap) {
    mall_telemetry::propagation::inject(&tracing::Span::current(), &mut MetadataInjector(metadata));
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value),
        ) {
            self.0.insert(key, value);
        }
    }
}
