//! A service binary run as a child process: for tests of start-up, configuration errors and
//! signals, which only a real process shows.

use std::{
    net::SocketAddr,
    process::{ExitStatus, Stdio},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt as _, BufReader},
    process::{Child, Command},
};

/// A running service process whose JSON log lines are read from stdout.
#[derive(Debug)]
pub struct ServiceProcess {
    child: Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

/// Where a started service listens, read from its `serving` log line.
#[derive(Debug, Clone, Copy)]
pub struct Listening {
    /// gRPC address.
    pub grpc_addr: SocketAddr,
    /// Admin HTTP address.
    pub admin_addr: SocketAddr,
}

impl ServiceProcess {
    /// Starts `binary` with `env` added to a cleared environment (plus `PATH`), JSON logs,
    /// and both listeners on free ports.
    ///
    /// # Panics
    /// When the binary cannot be started.
    pub fn start(binary: &str, prefix: &str, env: &[(&str, &str)]) -> Self {
        let mut command = Command::new(binary);
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env(format!("{prefix}__TELEMETRY__LOG_FORMAT"), "json")
            .env(format!("{prefix}__SERVER__LISTEN_ADDR"), "127.0.0.1:0")
            .env(format!("{prefix}__SERVER__ADMIN_ADDR"), "127.0.0.1:0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command
            .spawn()
            .unwrap_or_else(|error| panic!("failed to start {binary}: {error}"));
        let stdout = child.stdout.take().expect("stdout is piped");
        Self {
            child,
            lines: BufReader::new(stdout).lines(),
        }
    }

    /// Reads log lines until the `serving` line and returns the addresses in it.
    ///
    /// # Panics
    /// When the process exits or stays silent for `timeout`.
    pub async fn wait_until_serving(&mut self, timeout: Duration) -> Listening {
        let read = async {
            while let Some(line) = self.lines.next_line().await.expect("stdout readable") {
                let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if event["message"] == "serving" {
                    let addr = |key: &str| {
                        event[key]
                            .as_str()
                            .and_then(|s| s.parse().ok())
                            .unwrap_or_else(|| panic!("serving line lacks {key}: {line}"))
                    };
                    return Listening {
                        grpc_addr: addr("grpc_addr"),
                        admin_addr: addr("admin_addr"),
                    };
                }
            }
            panic!("the process ended before it was serving");
        };
        tokio::time::timeout(timeout, read)
            .await
            .unwrap_or_else(|_| panic!("the process was not serving within {timeout:?}"))
    }

    /// Sends SIGTERM, as Kubernetes does.
    ///
    /// # Panics
    /// When the signal cannot be sent.
    pub async fn terminate(&mut self) {
        let pid = self.child.id().expect("the process is still running");
        let status = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await
            .expect("kill runs");
        assert!(status.success(), "kill -TERM {pid} failed");
    }

    /// Waits for the process to exit, draining its stdout meanwhile.
    ///
    /// # Panics
    /// When it has not exited within `timeout`.
    pub async fn wait_for_exit(&mut self, timeout: Duration) -> ExitStatus {
        let wait = async {
            while let Ok(Some(_)) = self.lines.next_line().await {}
            self.child.wait().await.expect("wait on child")
        };
        tokio::time::timeout(timeout, wait)
            .await
            .unwrap_or_else(|_| panic!("the process did not exit within {timeout:?}"))
    }
}

/// Runs `binary` to completion with `env` (in a cleared environment) and returns its exit
/// status and standard error: for start-up failures.
///
/// # Panics
/// When it cannot be started or runs longer than `timeout`.
pub async fn run_to_exit(
    binary: &str,
    env: &[(&str, &str)],
    timeout: Duration,
) -> (ExitStatus, String) {
    let mut command = Command::new(binary);
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    for (key, value) in env {
        command.env(key, value);
    }
    let output = tokio::time::timeout(timeout, command.output())
        .await
        .unwrap_or_else(|_| panic!("{binary} did not exit within {timeout:?}"))
        .unwrap_or_else(|error| panic!("failed to start {binary}: {error}"));
    (
        output.status,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}
