//! A service binary run as a child process: for tests of start-up, configuration errors and
//! signals, which only a real process shows.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    process::{ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncRead, BufReader},
    process::{Child, Command},
};

/// Lines of output kept by [`ServiceProcess::drain_output`] for failure messages.
const KEPT_LINES: usize = 200;

/// A running service process whose JSON log lines are read from stdout.
#[derive(Debug)]
pub struct ServiceProcess {
    child: Child,
    /// Stdout, until [`ServiceProcess::drain_output`] hands it to a background reader.
    lines: Option<tokio::io::Lines<BufReader<tokio::process::ChildStdout>>>,
    /// The last lines of stdout and stderr once they are drained in the background.
    recent: Arc<Mutex<VecDeque<String>>>,
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
        Self::start_command(Command::new(binary), binary, prefix, env)
    }

    /// As [`ServiceProcess::start`], with the binary started by `sh -c script binary`:
    /// `script` sets up the process (a resource limit, a signal ignored) and ends with
    /// `exec "$0"`, so the binary replaces the shell and is what is signalled and waited on.
    ///
    /// # Panics
    /// When the shell cannot be started.
    pub fn start_in_shell(script: &str, binary: &str, prefix: &str, env: &[(&str, &str)]) -> Self {
        let mut command = Command::new("sh");
        command.args(["-c", script, binary]);
        Self::start_command(command, binary, prefix, env)
    }

    fn start_command(
        mut command: Command,
        binary: &str,
        prefix: &str,
        env: &[(&str, &str)],
    ) -> Self {
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
        let mut child = command.spawn().unwrap_or_else(|error| {
            let program = command
                .as_std()
                .get_program()
                .to_string_lossy()
                .into_owned();
            panic!("failed to start {program} (for {binary}): {error}")
        });
        let stdout = child.stdout.take().expect("stdout is piped");
        Self {
            child,
            lines: Some(BufReader::new(stdout).lines()),
            recent: Arc::default(),
        }
    }

    /// Reads log lines until the `serving` line and returns the addresses in it.
    ///
    /// # Panics
    /// When the process exits or stays silent for `timeout`.
    pub async fn wait_until_serving(&mut self, timeout: Duration) -> Listening {
        let event = self.wait_for_message("serving", timeout).await;
        Listening {
            grpc_addr: address(&event, "grpc_addr"),
            admin_addr: address(&event, "admin_addr"),
        }
    }

    /// Reads JSON log lines until one whose message is `message` and returns it, skipping the
    /// lines before it: for what a service logs while it starts, before the `serving` line.
    ///
    /// # Panics
    /// When the process exits first or no such line comes within `timeout`.
    pub async fn wait_for_message(
        &mut self,
        message: &str,
        timeout: Duration,
    ) -> serde_json::Value {
        let lines = self
            .lines
            .as_mut()
            .expect("stdout is read here until drain_output is called");
        let read = async {
            while let Some(line) = lines.next_line().await.expect("stdout readable") {
                let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if event["message"] == message {
                    return event;
                }
            }
            panic!("the process ended before it logged {message:?}");
        };
        tokio::time::timeout(timeout, read)
            .await
            .unwrap_or_else(|_| panic!("the process did not log {message:?} within {timeout:?}"))
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
            if let Some(lines) = self.lines.as_mut() {
                while let Ok(Some(_)) = lines.next_line().await {}
            }
            self.child.wait().await.expect("wait on child")
        };
        tokio::time::timeout(timeout, wait)
            .await
            .unwrap_or_else(|_| panic!("the process did not exit within {timeout:?}"))
    }

    /// Ends the process with SIGKILL, as a crash, an OOM kill or a lost node does: no
    /// shutdown code runs. Returns its exit status once it is gone.
    ///
    /// # Panics
    /// When the signal cannot be sent or the process cannot be waited on.
    pub async fn kill(&mut self) -> ExitStatus {
        self.child.kill().await.expect("SIGKILL is sent");
        self.child.wait().await.expect("wait on child")
    }

    /// The exit status if the process has ended, `None` while it runs.
    ///
    /// # Panics
    /// When the process cannot be waited on.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("wait on child")
    }

    /// From now on reads stdout and stderr in background tasks, so a process that logs for
    /// a long time never blocks on a full pipe. The last lines stay available through
    /// [`ServiceProcess::recent_output`]; with `TEST_LOG=1` every line is also printed,
    /// prefixed with `name`. Call it after [`ServiceProcess::wait_until_serving`].
    pub fn drain_output(&mut self, name: &str) {
        let echo = std::env::var_os("TEST_LOG").is_some_and(|v| v == "1");
        if let Some(lines) = self.lines.take() {
            tokio::spawn(keep_lines(
                lines.into_inner(),
                self.recent.clone(),
                format!("{name} stdout"),
                echo,
            ));
        }
        if let Some(stderr) = self.child.stderr.take() {
            tokio::spawn(keep_lines(
                BufReader::new(stderr),
                self.recent.clone(),
                format!("{name} stderr"),
                echo,
            ));
        }
    }

    /// The last lines of output read since [`ServiceProcess::drain_output`], oldest first.
    pub fn recent_output(&self) -> Vec<String> {
        self.recent
            .lock()
            .map(|recent| recent.iter().cloned().collect())
            .unwrap_or_default()
    }
}

/// Reads `reader` to its end, keeping the last [`KEPT_LINES`] lines in `recent`.
async fn keep_lines(
    reader: BufReader<impl AsyncRead + Unpin>,
    recent: Arc<Mutex<VecDeque<String>>>,
    label: String,
    echo: bool,
) {
    let mut lines = reader.lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if echo {
            println!("[{label}] {line}");
        }
        if let Ok(mut recent) = recent.lock() {
            if recent.len() == KEPT_LINES {
                recent.pop_front();
            }
            recent.push_back(format!("[{label}] {line}"));
        }
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

/// The socket address in `event`'s field `key`.
///
/// # Panics
/// When the field is missing or is not a socket address.
pub fn address(event: &serde_json::Value, key: &str) -> SocketAddr {
    event[key]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("log line lacks the address {key}: {event}"))
}
