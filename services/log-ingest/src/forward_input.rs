//! The forward protocol's TCP listener: messages in, batches into the durable buffer, and
//! `{"ack": chunk}` back only once a message's batch is on disk (a message with nothing
//! to store, metrics or traces sent here by mistake, at once).
//!
//! - With `shared_key` set, every connection starts with the protocol's handshake (HELO
//!   from us with a fresh nonce; PING with the client's SHA-512 digest; PONG with ours);
//!   a wrong key gets a PONG saying so and the connection is closed.
//! - Bounded: connections (`max_connections`; one more is closed at once), one message's
//!   bytes (`max_message_bytes`; a compressed one's inflated bytes too), a quiet
//!   connection (`idle_timeout`), and the bytes of messages being received and stored on
//!   all connections together (`max_bytes_in_flight`, below).
//! - Memory: a message takes `max_message_bytes` of `max_bytes_in_flight` from its first
//!   byte until it is whole (within `message_timeout`), then its own size until it is
//!   stored and acknowledged; a connection whose next message would pass the budget stops
//!   reading (TCP holds the sender) until others are stored. So at most
//!   `max_bytes_in_flight / max_message_bytes` messages arrive at once. What the budget
//!   counts is the bytes received: while a message arrives, its frame may be allocated
//!   up to twice its size, or as large as the connection's previous message and an eighth
//!   (room made at once, within `max_message_bytes`; a message using less than half of it
//!   gives it back when whole); a read may take the start of the sender's next message with
//!   it; decoding (on as many threads as there are cores) briefly holds the frame and its
//!   decoded copy together (and a compressed message's inflated bytes, up to 4×
//!   `max_message_bytes`); and a compressed message is stored at up to 4×
//!   `max_message_bytes`, whatever its counted size. The decoded copy is what is stored
//!   (written around, not copied again; in the decoder's allocation, a little more than its
//!   size, up to 1.4 times it in the packed modes); the frame is freed before the store's
//!   wait.
//! - Garbage (not MessagePack, not the protocol) closes its connection with one WARN line
//!   naming the peer and why; it never stops the listener.
//! - A full buffer: the message is not acknowledged and the connection is closed, so the
//!   sender retries it. (Fluent Bit may retry chunks out of order; grouping then sees the
//!   lines of a trace out of order and may split it, which loses nothing.) A message
//!   without `chunk` cannot be retried by its sender: it waits for room instead, its
//!   connection unread meanwhile (TCP holds the sender), until it is stored or log-ingest
//!   shuts down (then the connection closes without it, as any message a sender without
//!   acks has sent may be lost to a closed connection).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use mall_grpc::tls::{Reloading, ServerTls};
use mall_telemetry::metrics::IntGauge;
use rmpv::Value;
use rustls::ServerConfig;
use secrecy::{ExposeSecret as _, SecretString};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha512};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::TcpListener,
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tokio_util::sync::CancellationToken;

use crate::{
    batch::{Batch, Source},
    buffer::{Buffer, BufferError},
    forward::{self, Frame, Garbage},
    metrics::LogMetrics,
    recent::{Recent, Stored},
};

/// The forward input's settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ForwardSettings {
    /// Where to listen. Default `127.0.0.1:24224` (the protocol's port).
    pub listen_addr: SocketAddr,
    /// The shared key clients must prove they know (a secret); none: no handshake.
    #[serde(serialize_with = "mall_config::serialize_optional_secret")]
    pub shared_key: Option<SecretString>,
    /// Our name in the handshake's PONG.
    pub self_hostname: String,
    /// Connections at once. Default 1,024.
    pub max_connections: usize,
    /// Bytes of messages being received or stored at once, all connections together
    /// (memory; see the module's docs). At least `max_message_bytes`. Default 64 MiB.
    pub max_bytes_in_flight: usize,
    /// Largest message, bytes (and largest a compressed message may inflate to, times 4;
    /// `buffer.segment_bytes` must hold that). Default 8 MiB (Fluent Bit's chunks are about
    /// 2 MB).
    pub max_message_bytes: usize,
    /// A connection whose next message has not wholly arrived this long after the previous
    /// one is closed. Default 5 minutes.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// A message that has begun arriving (and holds its share of `max_bytes_in_flight`)
    /// must be whole this long after it took that share, or its connection is closed.
    /// Default 30s (Fluent Bit sends a 2 MB chunk in milliseconds on the same network).
    #[serde(with = "humantime_serde")]
    pub message_timeout: Duration,
    /// TLS on this listener (`[forward.tls]`: `cert_file`, `key_file`, `client_ca_file`,
    /// reloaded when they change, as the gRPC server's). Client certificates are optional
    /// here: the shared key authenticates a shipper. Without it the listener is plaintext,
    /// which it refuses on an address other than loopback unless `server.insecure = true`.
    pub tls: Option<ServerTls>,
    /// Longest time a TLS handshake may take, the shared-key handshake too (HELO to PONG),
    /// and the peer's taking of one acknowledgement written to it. Default 10s.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
}

impl Default for ForwardSettings {
    fn default() -> Self {
        Self {
            listen_addr: SocketAddr::from(([127, 0, 0, 1], 24224)),
            shared_key: None,
            self_hostname: "log-ingest".to_owned(),
            max_connections: 1_024,
            max_bytes_in_flight: 64 * 1024 * 1024,
            max_message_bytes: 8 * 1024 * 1024,
            idle_timeout: Duration::from_secs(300),
            message_timeout: Duration::from_secs(30),
            tls: None,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// A bound forward listener.
#[derive(Debug)]
pub struct ForwardInput {
    listener: TcpListener,
    tls: Option<Reloading<ServerConfig>>,
    settings: Arc<ForwardSettings>,
    buffer: Buffer,
    recent: Recent,
    metrics: LogMetrics,
}

impl ForwardInput {
    /// Binds the listener; `recent` remembers the batches stored lately (see
    /// [`crate::recent`]). `insecure` is `server.insecure`: whether plaintext may be served
    /// beyond loopback.
    ///
    /// # Errors
    /// When the address cannot be bound, the TLS files cannot be loaded, or the listener
    /// would be plaintext beyond loopback without `insecure`.
    pub async fn bind(
        settings: ForwardSettings,
        insecure: bool,
        buffer: Buffer,
        recent: Recent,
        metrics: LogMetrics,
    ) -> anyhow::Result<Self> {
        let tls = match &settings.tls {
            Some(files) => Some(mall_grpc::tls::server_config(files).context("forward.tls")?),
            None => {
                mall_grpc::server::refuse_plaintext(
                    "forward.listen_addr",
                    settings.listen_addr,
                    insecure,
                )?;
                None
            }
        };
        let listener = TcpListener::bind(settings.listen_addr)
            .await
            .with_context(|| format!("cannot listen for forward on {}", settings.listen_addr))?;
        Ok(Self {
            listener,
            tls,
            settings: Arc::new(settings),
            buffer,
            recent,
            metrics,
        })
    }

    /// Where it listens.
    ///
    /// # Errors
    /// When the socket has no address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts connections until `shutdown`; then stops accepting and ends each connection
    /// after the message it is handling.
    pub async fn run(self, shutdown: CancellationToken) {
        let slots = Arc::new(Semaphore::new(self.settings.max_connections));
        let budget = Budget::new(
            self.settings.max_bytes_in_flight,
            self.metrics.in_flight_bytes.clone(),
        );
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let accepted = tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = self.listener.accept() => accepted,
                Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: wait a little rather than spin.
                    tracing::warn!(%error, "forward: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::warn!(%peer, limit = self.settings.max_connections, "forward: too many connections; closed");
                self.metrics
                    .connections_closed
                    .with_label_values(&["too_many"])
                    .inc();
                continue;
            };
            let tls = self.tls.clone();
            let (settings, buffer, recent, metrics, shutdown) = (
                self.settings.clone(),
                self.buffer.clone(),
                self.recent.clone(),
                self.metrics.clone(),
                shutdown.clone(),
            );
            let budget = budget.clone();
            connections.spawn(async move {
                let _slot = slot;
                if let Err(error) = stream.set_nodelay(true) {
                    tracing::debug!(%error, "forward: failed to set TCP_NODELAY");
                }
                metrics.connections.inc();
                let shared = Shared {
                    settings: &settings,
                    budget: &budget,
                    buffer: &buffer,
                    recent: &recent,
                    metrics: &metrics,
                    shutdown: &shutdown,
                };
                let closed = match tls {
                    None => connection(stream, &shared).await,
                    Some(tls) => {
                        let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
                        match tokio::time::timeout(
                            settings.handshake_timeout,
                            acceptor.accept(stream),
                        )
                        .await
                        {
                            Ok(Ok(stream)) => connection(stream, &shared).await,
                            // Closed before the handshake ended: a TCP health check, a
                            // scanner, a sender giving up; not a certificate refused.
                            Ok(Err(error)) if error.kind() == std::io::ErrorKind::UnexpectedEof => {
                                Err(Closed::ByPeer("during the TLS handshake"))
                            }
                            Ok(Err(error)) => Err(Closed::Tls(error.to_string())),
                            Err(_) => Err(Closed::Tls(format!(
                                "no TLS handshake within {:?}",
                                settings.handshake_timeout
                            ))),
                        }
                    }
                };
                metrics.connections.dec();
                match closed {
                    // Shutting down while it waited for room: nothing to warn about.
                    Ok(()) | Err(Closed::ShuttingDown) => {}
                    Err(why) => {
                        let reason = why.reason();
                        // A peer hanging up (a sender restarting or giving up, a network
                        // blip) is theirs, not ours to warn about; its sender resends what
                        // was not acknowledged.
                        if reason == "peer_closed" {
                            tracing::info!(%peer, %why, "forward: connection closed");
                        } else {
                            tracing::warn!(%peer, %why, "forward: connection closed");
                        }
                        metrics
                            .connections_closed
                            .with_label_values(&[reason])
                            .inc();
                    }
                }
            });
        }
        while connections.join_next().await.is_some() {}
    }
}

/// Largest PING accepted in the handshake.
const MAX_PING_BYTES: usize = 4 * 1024;

/// Why a connection was closed by us.
#[derive(Debug, thiserror::Error)]
enum Closed {
    #[error("{0}")]
    Garbage(#[from] Garbage),
    #[error("no whole message within {0:?}")]
    Idle(Duration),
    #[error("the shared key handshake failed: {0}")]
    Handshake(&'static str),
    #[error("{0} took longer than {1:?}")]
    Slow(&'static str, Duration),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("the buffer is full; the message was not acknowledged")]
    Full,
    #[error("shutting down")]
    ShuttingDown,
    #[error("the buffer failed: {0}")]
    Buffer(BufferError),
    #[error("the peer closed {0}")]
    ByPeer(&'static str),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl Closed {
    /// Its `reason` label in `forward_connections_closed_total` (one of
    /// [`crate::metrics::CLOSES`]); a shutdown's close is not counted.
    fn reason(&self) -> &'static str {
        use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
        match self {
            Self::Tls(_) => "tls",
            Self::Handshake(_) => "handshake",
            Self::Slow(..) => "slow",
            Self::Idle(_) => "idle",
            Self::Garbage(_) => "garbage",
            Self::Full => "full",
            Self::Buffer(_) => "buffer",
            Self::ByPeer(_) => "peer_closed",
            Self::Io(error)
                if matches!(
                    error.kind(),
                    UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe
                ) =>
            {
                "peer_closed"
            }
            Self::Io(_) | Self::ShuttingDown => "io",
        }
    }
}

/// What every connection shares.
struct Shared<'a> {
    settings: &'a ForwardSettings,
    /// `max_bytes_in_flight`, in bytes.
    budget: &'a Arc<Budget>,
    buffer: &'a Buffer,
    recent: &'a Recent,
    metrics: &'a LogMetrics,
    shutdown: &'a CancellationToken,
}

/// Serves one connection until the peer closes it (`Ok`) or we do (why).
async fn connection<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    shared: &Shared<'_>,
) -> Result<(), Closed> {
    let Shared {
        settings,
        budget,
        buffer,
        recent,
        metrics,
        shutdown,
    } = *shared;
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    if let Some(key) = &settings.shared_key {
        // Bounded as a whole: a peer that connects and says nothing must not hold one of
        // `max_connections` for `idle_timeout` before it is even known.
        tokio::time::timeout(
            settings.handshake_timeout,
            handshake(&mut stream, &mut buf, settings, key.expose_secret()),
        )
        .await
        .map_err(|_| Closed::Slow("the shared key handshake", settings.handshake_timeout))??;
    }
    let max_inflated = settings.max_message_bytes.saturating_mul(4);
    let mut told_not_logs = false;
    // The size of this connection's last message: room for the next is made at once.
    let mut last_len = 0;
    loop {
        // Held until the message is stored and acknowledged (dropped at the loop's end).
        let Some((frame, _in_flight)) = next_frame(
            &mut stream,
            &mut buf,
            &mut last_len,
            settings,
            shutdown,
            Some(budget),
        )
        .await?
        else {
            return Ok(());
        };
        let message = match forward::decode(&frame, max_inflated)? {
            Frame::Heartbeat => continue,
            Frame::Message(message) => message,
            Frame::NotLogs { tag, signal, chunk } => {
                // Once per connection: Fluent Bit sends such a chunk every flush.
                if !told_not_logs {
                    told_not_logs = true;
                    tracing::warn!(
                        tag = %tag.escape_debug(),
                        signal,
                        "a forward sender sends metrics or traces (fluent_signal), which log-ingest does not take: acknowledged and dropped (counted in forward_messages_total with outcome not_logs); match only log inputs in its forward output"
                    );
                }
                metrics.chunks.with_label_values(&["not_logs"]).inc();
                forward::Message {
                    tag,
                    events: Default::default(),
                    chunk,
                }
            }
        };
        // Only the stored form is kept through the store's wait.
        drop(frame);
        if !message.events.is_empty() {
            let entries = message.events.len() as u64;
            // Whole-second times cannot tell a line sent twice in a second on purpose from
            // a resend: the chunk id goes with such a batch (see `crate::recent`).
            let chunk = message
                .chunk
                .as_deref()
                .filter(|_| message.events.whole_seconds());
            let bytes = Batch {
                source: Source::Forward,
                tag: message.tag,
                events: message.events,
                received_ms: crate::batch::now_ms(),
            }
            .into_stored(chunk);
            // Without a `chunk` the sender wants no ack and never resends: nothing to
            // recognise (the same record twice in a second is two records).
            let stored = if message.chunk.is_some() {
                recent.store(buffer, bytes).await
            } else {
                append_when_room(buffer, bytes, shutdown).await
            };
            let outcome = match stored {
                // Stored already (sent again after a lost ack): acknowledged, not stored twice.
                Ok(Stored::SentAgain) => "sent_again",
                Ok(Stored::New) => {
                    metrics
                        .received
                        .with_label_values(&["forward"])
                        .inc_by(entries);
                    "stored"
                }
                Err(e) => {
                    let (outcome, closed) = match e {
                        BufferError::Full(_) => ("refused_full", Closed::Full),
                        e => ("refused_error", Closed::Buffer(e)),
                    };
                    metrics.chunks.with_label_values(&[outcome]).inc();
                    return Err(closed);
                }
            };
            metrics.chunks.with_label_values(&[outcome]).inc();
        }
        if let Some(chunk) = message.chunk {
            // A peer that stops reading (its receive window closed) would hold this write,
            // outside `idle_timeout`, for ever. Its chunk is stored; closing makes it resend,
            // and the resend is recognised (acknowledged, not stored twice).
            let ack = async {
                stream.write_all(&forward::ack(&chunk)).await?;
                // A TLS stream holds written records until flushed; a TCP stream sends at
                // once.
                stream.flush().await
            };
            tokio::time::timeout(settings.handshake_timeout, ack)
                .await
                .map_err(|_| Closed::Slow("writing an ack", settings.handshake_timeout))??;
            metrics.acks.inc();
        }
    }
}

/// Appends a message without `chunk` (which its sender never resends) to `buffer`, waiting
/// while the buffer is full, until `shutdown` (then `Full`).
async fn append_when_room(
    buffer: &Buffer,
    bytes: Vec<u8>,
    shutdown: &CancellationToken,
) -> Result<Stored, BufferError> {
    // Room comes as the pipeline acknowledges what Loki took: checked again at most a
    // second apart.
    let mut backoff = mall_retry::Backoff::new(Duration::from_millis(20), Duration::from_secs(1));
    // Shared, not copied, with each try: `append` takes the bytes, and a full buffer does
    // not give them back.
    let bytes = bytes::Bytes::from(bytes);
    loop {
        match buffer.append(bytes.clone()).await {
            Err(BufferError::Full(used)) => {
                tokio::select! {
                    () = tokio::time::sleep(backoff.next_delay()) => {}
                    () = shutdown.cancelled() => return Err(BufferError::Full(used)),
                }
            }
            stored => return stored.map(|_| Stored::New),
        }
    }
}

/// The next whole frame, reading as needed, with its share of `budget` (when given);
/// `None` when the peer closed between frames or we are shutting down. The whole frame
/// must arrive within `idle_timeout` of the wait starting (not each read: a byte every few
/// minutes does not keep a slot), waiting for the budget aside. `last_len`: the size of
/// the connection's previous frame (set to this one's).
async fn next_frame<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    last_len: &mut usize,
    settings: &ForwardSettings,
    shutdown: &CancellationToken,
    budget: Option<&Arc<Budget>>,
) -> Result<Option<(Vec<u8>, Option<Share>)>, Closed> {
    let mut deadline = tokio::time::Instant::now() + settings.idle_timeout;
    let mut allowed = settings.idle_timeout;
    let mut held: Option<Share> = None;
    // Goes on where it stopped after each read: a message trickling in is scanned once.
    let mut scan = forward::Scan::default();
    loop {
        if let Some(len) = scan.resume(buf, settings.max_message_bytes)? {
            // Whole: from now on it holds its own size (a small one read at once takes it
            // here).
            match (&mut held, budget) {
                (Some(share), _) => share.keep(len),
                (None, Some(budget)) => {
                    held = Some(
                        budget
                            .take(len, shutdown)
                            .await
                            .ok_or(Closed::ShuttingDown)?,
                    );
                }
                (None, None) => {}
            }
            // Not a heartbeat (one byte), which says nothing of the next message's size.
            if len > 1 {
                *last_len = len;
            }
            let rest = buf.split_off(len);
            let mut frame = std::mem::replace(buf, rest);
            // Room made for a message larger than this one (after the connection's
            // previous) is given back, so the frame is about the size the budget holds
            // from here on (mimalloc moves a block shrunk to less than half its size; a
            // larger one keeps its block until the frame is freed, after decoding).
            if frame.capacity() > len + len / 4 + 64 * 1024 {
                frame.shrink_to_fit();
            }
            return Ok(Some((frame, held)));
        }
        // A message has begun and is not whole: it may take up to `max_message_bytes`
        // before it is; that is taken before reading more of it. Nothing is taken while a
        // connection is quiet between messages.
        if !buf.is_empty()
            && held.is_none()
            && let Some(budget) = budget
        {
            held = Some(
                budget
                    .take(settings.max_message_bytes, shutdown)
                    .await
                    .ok_or(Closed::ShuttingDown)?,
            );
            // Holding a share of the budget, the rest must come soon: a sender that stalls
            // mid-message (a server gone while flushing) keeps it from others only this long.
            allowed = settings.message_timeout.min(settings.idle_timeout);
            deadline = tokio::time::Instant::now() + allowed;
            // Room for all of it at once if it is about as large as the connection's
            // previous one (a sender's chunks are alike; an eighth more for a larger one;
            // within the share just taken), rather than growing by doubling: that allocated
            // and copied a message of megabytes about twice over, and left blocks of every
            // size behind.
            let expected = *last_len + *last_len / 8;
            buf.reserve(
                expected
                    .min(settings.max_message_bytes)
                    .saturating_sub(buf.len()),
            );
        }
        if buf.capacity() - buf.len() < 16 * 1024 {
            buf.reserve(64 * 1024);
        }
        let read = tokio::select! {
            () = shutdown.cancelled(), if buf.is_empty() => return Ok(None),
            read = tokio::time::timeout_at(deadline, stream.read_buf(buf)) => read,
        };
        let Ok(read) = read else {
            return Err(Closed::Idle(allowed));
        };
        if read? == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(Closed::ByPeer("in the middle of a message"))
            };
        }
    }
}

/// `max_bytes_in_flight`: bytes of messages being received or stored, all connections
/// together, counted in the `forward_in_flight_bytes` gauge as they are taken and given back.
struct Budget {
    bytes: Arc<Semaphore>,
    taken: IntGauge,
}

impl Budget {
    fn new(max: usize, taken: IntGauge) -> Arc<Self> {
        Arc::new(Self {
            bytes: Arc::new(Semaphore::new(max)),
            taken,
        })
    }

    /// `bytes` of it (all of it at most), once available; `None` when shutting down first.
    async fn take(self: &Arc<Self>, bytes: usize, shutdown: &CancellationToken) -> Option<Share> {
        let bytes = u32::try_from(bytes.min(MAX_BUDGET)).unwrap_or(u32::MAX);
        let permit = tokio::select! {
            () = shutdown.cancelled() => None,
            // The semaphore is never closed.
            permit = self.bytes.clone().acquire_many_owned(bytes) => permit.ok(),
        }?;
        self.taken.add(i64::from(bytes));
        Some(Share {
            permit,
            budget: self.clone(),
        })
    }
}

/// A share of the [`Budget`], given back when dropped.
struct Share {
    permit: OwnedSemaphorePermit,
    budget: Arc<Budget>,
}

impl Share {
    /// Gives back all but `bytes` of it.
    fn keep(&mut self, bytes: usize) {
        let back = self.permit.num_permits().saturating_sub(bytes);
        // Counted first: the gauge never shows more than is taken.
        self.budget
            .taken
            .sub(i64::from(u32::try_from(back).unwrap_or(u32::MAX)));
        drop(self.permit.split(back));
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        let bytes = u32::try_from(self.permit.num_permits()).unwrap_or(u32::MAX);
        self.budget.taken.sub(i64::from(bytes));
    }
}

/// The most one message takes of the budget at once (`acquire_many` counts in `u32`);
/// `max_bytes_in_flight` is validated to be at least `max_message_bytes` and at most this.
pub const MAX_BUDGET: usize = u32::MAX as usize;

/// The shared-key handshake: HELO, the client's PING, our PONG.
async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    settings: &ForwardSettings,
    key: &str,
) -> Result<(), Closed> {
    // From the operating system's CSPRNG (a predictable nonce would let a recorded PING be
    // replayed).
    let mut nonce = [0_u8; 16];
    getrandom::fill(&mut nonce)
        .map_err(|_| Closed::Io(std::io::Error::other("no random bytes for a nonce")))?;
    let helo = Value::Array(vec![
        Value::from("HELO"),
        Value::Map(vec![
            (Value::from("nonce"), Value::Binary(nonce.to_vec())),
            (Value::from("auth"), Value::Binary(Vec::new())),
            (Value::from("keepalive"), Value::Boolean(true)),
        ]),
    ]);
    write_value(stream, &helo).await?;
    let never = CancellationToken::new();
    // A PING is a few hundred bytes: nothing larger is read before the peer is known.
    let small = ForwardSettings {
        max_message_bytes: MAX_PING_BYTES,
        ..settings.clone()
    };
    // Not a PING's frame (a sender without the shared key sends its first message, up to
    // megabytes): the handshake failed, not the protocol.
    let next = next_frame(stream, buf, &mut 0, &small, &never, None)
        .await
        .map_err(|closed| match closed {
            Closed::Garbage(_) => {
                Closed::Handshake("the first message is no PING (a sender without the shared key?)")
            }
            other => other,
        })?;
    let Some((frame, _)) = next else {
        return Err(Closed::ByPeer("before its PING"));
    };
    let ping = rmpv::decode::read_value(&mut &frame[..])
        .map_err(|_| Closed::Handshake("PING is not MessagePack"))?;
    // Hashed as the raw bytes sent: Fluent Bit's salt is 16 random bytes in a str, not
    // UTF-8 text.
    let raw = |v: &Value| match v {
        Value::String(s) => Some(s.as_bytes().to_vec()),
        Value::Binary(b) => Some(b.clone()),
        _ => None,
    };
    let fields = match &ping {
        Value::Array(parts) if parts.len() == 6 && parts[0].as_str() == Some("PING") => {
            match (raw(&parts[1]), raw(&parts[2]), raw(&parts[3])) {
                (Some(hostname), Some(salt), Some(digest)) => Ok((hostname, salt, digest)),
                _ => Err("a PING field is not a string"),
            }
        }
        _ => Err("not a PING"),
    };
    let refused = match fields {
        Ok((hostname, salt, digest)) => {
            let expected = sha512_hex(&[&salt, &hostname, &nonce, key.as_bytes()]);
            if constant_time_eq(expected.as_bytes(), &digest) {
                let pong = Value::Array(vec![
                    Value::from("PONG"),
                    Value::Boolean(true),
                    Value::from(""),
                    Value::from(settings.self_hostname.as_str()),
                    Value::from(sha512_hex(&[
                        &salt,
                        settings.self_hostname.as_bytes(),
                        &nonce,
                        key.as_bytes(),
                    ])),
                ]);
                write_value(stream, &pong).await?;
                return Ok(());
            }
            "shared key mismatch"
        }
        Err(why) => why,
    };
    // A refusal says why and nothing else, as fluentd's does: a digest of the key over a
    // salt the peer chose would let anyone who can connect guess the key offline.
    let pong = Value::Array(vec![
        Value::from("PONG"),
        Value::Boolean(false),
        Value::from(refused),
        Value::from(""),
        Value::from(""),
    ]);
    write_value(stream, &pong).await?;
    Err(Closed::Handshake(refused))
}

async fn write_value<S: AsyncWrite + Unpin>(stream: &mut S, value: &Value) -> std::io::Result<()> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, value).expect("writing to a Vec cannot fail");
    stream.write_all(&out).await?;
    stream.flush().await
}

fn sha512_hex(parts: &[&[u8]]) -> String {
    let mut hasher = Sha512::new();
    for part in parts {
        hasher.update(part);
    }
    hasher
        .finalize()
        .iter()
        .fold(String::with_capacity(128), |mut hex, byte| {
            use std::fmt::Write as _;
            let _ = write!(hex, "{byte:02x}");
            hex
        })
}

/// Compares without stopping at the first difference (the digest is a credential).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0_u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A MessagePack bin of `len` bytes: a frame as far as `next_frame` is concerned.
    fn bin(len: usize) -> Vec<u8> {
        let mut out = vec![0xc6];
        out.extend_from_slice(&u32::try_from(len).expect("small").to_be_bytes());
        out.resize(5 + len, 7);
        out
    }

    /// A message about as large as the connection's previous one gets its room at once,
    /// not by doubling; the room a smaller one does not use is given back when it is whole.
    #[tokio::test]
    async fn room_for_a_message_is_made_from_the_previous_one_and_given_back() {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        let (big, small) = (bin(1 << 20), bin(1_000));
        let writer = tokio::spawn(async move {
            client.write_all(&big).await.expect("written");
            client.write_all(&big).await.expect("written");
            // Not whole at its first read.
            client.write_all(&small[..500]).await.expect("written");
            tokio::time::sleep(Duration::from_millis(50)).await;
            client.write_all(&small[500..]).await.expect("written");
            client
        });
        let settings = ForwardSettings::default();
        let taken = IntGauge::new("taken", "bytes taken").expect("a gauge");
        let budget = Budget::new(settings.max_bytes_in_flight, taken.clone());
        let shutdown = CancellationToken::new();
        let (mut buf, mut last_len) = (Vec::with_capacity(64 * 1024), 0);
        let mut frames = Vec::new();
        for _ in 0..3 {
            let (frame, permit) = next_frame(
                &mut server,
                &mut buf,
                &mut last_len,
                &settings,
                &shutdown,
                Some(&budget),
            )
            .await
            .expect("a frame")
            .expect("not closed");
            let held = permit.expect("a share of the budget");
            assert_eq!(
                held.permit.num_permits(),
                frame.len(),
                "the budget holds the message's size"
            );
            assert_eq!(taken.get(), frame.len() as i64, "and the gauge counts it");
            drop(held);
            assert_eq!(taken.get(), 0, "given back");
            frames.push(frame);
        }
        let len = (1 << 20) + 5;
        assert_eq!(frames[0].len(), len);
        assert_eq!(
            frames[1].capacity(),
            len + len / 8,
            "the previous message's size and an eighth, at once"
        );
        assert_eq!(frames[2].len(), 1_005);
        assert!(
            frames[2].capacity() <= 1_005 + 1_005 / 4 + 64 * 1024,
            "room not used given back: {}",
            frames[2].capacity()
        );
        drop(writer.await.expect("the writer"));
    }
}
