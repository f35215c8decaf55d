//! The relay as a real child process, configured through `SYNC_RELAY__*` variables, that can
//! be killed with SIGKILL and started again with the same settings.

use std::{net::SocketAddr, process::ExitStatus, time::Duration};

use mall_proto::sync::v1::{
    GetRelayStatusRequest, ListDeadLettersRequest, ListQuarantinedRequest, QuarantinedRecord,
    RelayStatus, sync_relay_service_client::SyncRelayServiceClient,
};
use mall_test_support::{probe, process::ServiceProcess};
use tokio::sync::watch;
use tonic::transport::Channel;

const BINARY: &str = env!("CARGO_BIN_EXE_sync-relay");

/// How long a relay may take to start (migrations, queue creation, binding).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// One relay replica: its settings and its current process, if any.
pub struct RelayProcess {
    name: String,
    env: Vec<(String, String)>,
    process: Option<ServiceProcess>,
    /// The gRPC address of the running process; `None` while it is down.
    addr: watch::Sender<Option<SocketAddr>>,
    /// SIGKILLs so far.
    pub kills: usize,
}

impl RelayProcess {
    /// Starts a relay with `env` (`SYNC_RELAY__...` pairs) and waits until it serves.
    pub async fn start(name: &str, env: Vec<(String, String)>) -> Self {
        let mut relay = Self {
            name: name.to_owned(),
            env,
            process: None,
            addr: watch::channel(None).0,
            kills: 0,
        };
        relay.spawn().await;
        relay
    }

    async fn spawn(&mut self) {
        assert!(self.process.is_none(), "{} is already running", self.name);
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let mut process = ServiceProcess::start(BINARY, "SYNC_RELAY", &env);
        let listening = process.wait_until_serving(START_TIMEOUT).await;
        process.drain_output(&self.name);
        self.addr.send_replace(Some(listening.grpc_addr));
        self.process = Some(process);
    }

    /// Kills the process with SIGKILL, as a crash would: no shutdown code runs, leases and
    /// in-flight messages stay as they were.
    pub async fn kill(&mut self) {
        let mut process = self.process.take().expect("the relay is running");
        self.assert_alive(&mut process);
        self.addr.send_replace(None);
        let status = process.kill().await;
        assert!(!status.success(), "a killed process does not exit cleanly");
        self.kills += 1;
    }

    /// Starts the process again with the same settings, as a container restart does.
    pub async fn restart(&mut self) {
        self.spawn().await;
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub async fn terminate(&mut self) -> ExitStatus {
        let mut process = self.process.take().expect("the relay is running");
        self.assert_alive(&mut process);
        self.addr.send_replace(None);
        process.terminate().await;
        process.wait_for_exit(Duration::from_secs(30)).await
    }

    /// Panics with the last output when the process has exited on its own.
    pub fn check_alive(&mut self) {
        let mut process = self.process.take().expect("the relay is running");
        self.assert_alive(&mut process);
        self.process = Some(process);
    }

    fn assert_alive(&self, process: &mut ServiceProcess) {
        if let Some(status) = process.try_exit() {
            panic!(
                "{} exited on its own ({status}); its last output:\n{}",
                self.name,
                process.recent_output().join("\n")
            );
        }
    }

    /// The address of the running process, following restarts.
    pub fn addresses(&self) -> watch::Receiver<Option<SocketAddr>> {
        self.addr.subscribe()
    }

    /// A client of the running process.
    pub fn client(&self) -> SyncRelayServiceClient<Channel> {
        let addr = (*self.addr.borrow()).expect("the relay is running");
        client(addr)
    }

    /// GetRelayStatus.
    pub async fn status(&self) -> RelayStatus {
        self.client()
            .get_relay_status(GetRelayStatusRequest {})
            .await
            .expect("GetRelayStatus answers")
            .into_inner()
            .status
            .expect("the status is set")
    }

    /// Every quarantined record, following pages.
    pub async fn quarantined(&self) -> Vec<QuarantinedRecord> {
        let mut records = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = self
                .client()
                .list_quarantined(ListQuarantinedRequest {
                    page_size: 1_000,
                    page_token,
                })
                .await
                .expect("ListQuarantined answers")
                .into_inner();
            records.extend(page.quarantined_records);
            if page.next_page_token.is_empty() {
                return records;
            }
            page_token = page.next_page_token;
        }
    }

    /// How many dead letters ListDeadLetters shows (first page of up to 1,000).
    pub async fn dead_letters(&self) -> usize {
        self.client()
            .list_dead_letters(ListDeadLettersRequest {
                page_size: 1_000,
                page_token: String::new(),
            })
            .await
            .expect("ListDeadLetters answers")
            .into_inner()
            .dead_letters
            .len()
    }
}

/// A relay client for `addr`.
pub fn client(addr: SocketAddr) -> SyncRelayServiceClient<Channel> {
    SyncRelayServiceClient::new(probe::channel(addr))
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

/// `SYNC_RELAY__<KEY>` pairs from `(key, value)` with keys like `queue.visibility_timeout`.
pub fn env(pairs: &[(&str, String)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(key, value)| {
            (
                format!("SYNC_RELAY__{}", key.replace('.', "__").to_uppercase()),
                value.clone(),
            )
        })
        .collect()
}
