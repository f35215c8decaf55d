//! Faults LocalStack cannot produce on demand: throttled calls and batch entries that fail
//! while the call succeeds. A scripted SQS speaking the SDK's JSON protocol on 127.0.0.1
//! answers each call from a script, so the SQS backend's retries can be watched: failed
//! entries are sent again (alone), throttling is retried with backoff, an entry refused for
//! its content fails the send by index, a hung endpoint costs an attempt timeout rather than
//! the caller's whole run, and nothing is lost or dropped silently.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use mall_queue::{BackendKind, OutgoingMessage, Queue, QueueError, QueueSettings};
use secrecy::SecretString;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{TcpListener, TcpStream},
};

/// How the scripted SQS answers the next `SendMessageBatch`.
#[derive(Debug, Clone)]
enum Reply {
    /// HTTP 400 with a throttling error.
    Throttle,
    /// Success, except the entries at these positions fail with this sender-fault flag.
    FailEntries(Vec<usize>, bool),
    /// Read the request and never answer, keeping the connection open: a hung endpoint.
    Hang,
}

#[derive(Default)]
struct State {
    script: VecDeque<Reply>,
    /// Every `SendMessageBatch` call: the bodies of its entries, in order.
    calls: Vec<Vec<String>>,
    /// Bodies accepted, in the order accepted.
    accepted: Vec<String>,
}

struct ScriptedSqs {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
}

impl ScriptedSqs {
    async fn start(script: Vec<Reply>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binds");
        let addr = listener.local_addr().expect("has an address");
        let state = Arc::new(Mutex::new(State {
            script: script.into(),
            ..State::default()
        }));
        let shared = state.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, addr, shared.clone()));
            }
        });
        Self { addr, state }
    }

    async fn queue(&self) -> Queue {
        self.queue_with(|_| {}).await
    }

    async fn queue_with(&self, configure: impl FnOnce(&mut QueueSettings)) -> Queue {
        let mut settings = QueueSettings {
            backend: BackendKind::Sqs,
            name: "faults".to_owned(),
            ..QueueSettings::default()
        };
        settings.sqs.endpoint_url = Some(
            format!("http://{}", self.addr)
                .parse()
                .expect("a valid url"),
        );
        settings.sqs.region = Some("us-east-1".to_owned());
        settings.sqs.access_key_id = Some("test".to_owned());
        settings.sqs.secret_access_key = Some(SecretString::from("test"));
        settings.sqs.max_attempts = 4;
        configure(&mut settings);
        Queue::open(&settings, None).await.expect("opens")
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("not poisoned")
    }
}

/// Answers HTTP/1.1 requests on one connection until the client closes it.
async fn serve(stream: TcpStream, addr: SocketAddr, state: Arc<Mutex<State>>) {
    let mut reader = BufReader::new(stream);
    loop {
        let mut target = String::new();
        let mut length = 0usize;
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                return;
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                match name.to_ascii_lowercase().as_str() {
                    "content-length" => length = value.trim().parse().unwrap_or(0),
                    "x-amz-target" => target = value.trim().to_owned(),
                    _ => {}
                }
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).await.is_err() {
            return;
        }
        let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let Some((status, reply)) = answer(&target, &request, addr, &state) else {
            // Hung: hold the connection and say nothing until the client gives up on it.
            let mut rest = Vec::new();
            let _ = reader.read_to_end(&mut rest).await;
            return;
        };
        let reply = reply.to_string();
        let response = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/x-amz-json-1.0\r\n\
             content-length: {}\r\n\r\n{reply}",
            reply.len()
        );
        if reader
            .get_mut()
            .write_all(response.as_bytes())
            .await
            .is_err()
        {
            return;
        }
    }
}

/// The reply to one call; `None` for no reply at all (a hung endpoint).
fn answer(
    target: &str,
    request: &Value,
    addr: SocketAddr,
    state: &Mutex<State>,
) -> Option<(&'static str, Value)> {
    let mut state = state.lock().expect("not poisoned");
    Some(match target {
        "AmazonSQS.GetQueueUrl" => {
            let name = request["QueueName"].as_str().unwrap_or_default();
            (
                "200 OK",
                json!({ "QueueUrl": format!("http://{addr}/000000000000/{name}") }),
            )
        }
        "AmazonSQS.SendMessageBatch" => {
            let entries = request["Entries"].as_array().cloned().unwrap_or_default();
            let bodies: Vec<String> = entries
                .iter()
                .map(|e| e["MessageBody"].as_str().unwrap_or_default().to_owned())
                .collect();
            state.calls.push(bodies.clone());
            let (failing, sender_fault) = match state.script.pop_front() {
                Some(Reply::Throttle) => {
                    return Some((
                        "400 Bad Request",
                        json!({
                            "__type": "com.amazonaws.sqs#ThrottlingException",
                            "message": "Rate exceeded"
                        }),
                    ));
                }
                Some(Reply::FailEntries(positions, sender_fault)) => (positions, sender_fault),
                Some(Reply::Hang) => return None,
                None => (Vec::new(), false),
            };
            let mut successful = Vec::new();
            let mut failed = Vec::new();
            for (position, entry) in entries.iter().enumerate() {
                let id = entry["Id"].clone();
                if failing.contains(&position) {
                    failed.push(json!({
                        "Id": id,
                        "SenderFault": sender_fault,
                        "Code": if sender_fault { "InvalidParameterValue" } else { "InternalError" },
                        "Message": "scripted failure"
                    }));
                } else {
                    state.accepted.push(bodies[position].clone());
                    successful.push(json!({
                        "Id": id,
                        "MessageId": format!("m-{}", state.accepted.len()),
                        "MD5OfMessageBody": "00000000000000000000000000000000"
                    }));
                }
            }
            (
                "200 OK",
                json!({ "Successful": successful, "Failed": failed }),
            )
        }
        other => (
            "400 Bad Request",
            json!({ "__type": "com.amazonaws.sqs#InvalidAction", "message": other }),
        ),
    })
}

fn messages(count: usize) -> Vec<OutgoingMessage> {
    (0..count)
        .map(|i| OutgoingMessage::new(format!("m{i}")).with_group("g"))
        .collect()
}

#[tokio::test]
async fn entries_that_fail_on_the_server_are_sent_again_alone_until_accepted() {
    let sqs = ScriptedSqs::start(vec![
        Reply::FailEntries(vec![3, 7], false),
        Reply::FailEntries(vec![1], false),
    ])
    .await;
    let queue = sqs.queue().await;
    queue
        .send(messages(10))
        .await
        .expect("every message accepted");
    let state = sqs.state();
    assert_eq!(state.calls.len(), 3, "{:?}", state.calls);
    assert_eq!(
        state.calls[1],
        ["m3", "m7"],
        "only the failed entries, in order"
    );
    assert_eq!(state.calls[2], ["m7"]);
    let mut accepted = state.accepted.clone();
    accepted.sort_by_key(|b| b[1..].parse::<usize>().expect("numbered"));
    assert_eq!(
        accepted,
        (0..10).map(|i| format!("m{i}")).collect::<Vec<_>>(),
        "every message exactly once"
    );
}

#[tokio::test]
async fn throttled_calls_are_retried_with_backoff() {
    let sqs = ScriptedSqs::start(vec![Reply::Throttle, Reply::Throttle]).await;
    let queue = sqs.queue().await;
    queue
        .send(messages(3))
        .await
        .expect("accepted on the third try");
    let state = sqs.state();
    assert_eq!(state.calls.len(), 3);
    assert_eq!(state.accepted, ["m0", "m1", "m2"]);
}

#[tokio::test]
async fn throttling_through_every_attempt_is_reported_as_throttled() {
    let sqs = ScriptedSqs::start(vec![Reply::Throttle; 10]).await;
    let queue = sqs.queue().await;
    let error = queue.send(messages(2)).await.expect_err("never accepted");
    assert!(matches!(error, QueueError::Throttled { .. }), "{error:?}");
    assert!(error.is_retryable());
    assert_eq!(
        sqs.state().calls.len(),
        4,
        "max_attempts calls, then give up"
    );
}

#[tokio::test]
async fn an_entry_refused_for_its_content_fails_the_send_by_index() {
    let sqs = ScriptedSqs::start(vec![Reply::FailEntries(vec![2], true)]).await;
    let queue = sqs.queue().await;
    let error = queue.send(messages(5)).await.expect_err("refused");
    match error {
        QueueError::InvalidMessage { index, reason, .. } => {
            assert_eq!(index, 2);
            assert!(reason.contains("InvalidParameterValue"), "{reason}");
        }
        other => panic!("expected InvalidMessage, got {other:?}"),
    }
}

#[tokio::test]
async fn entries_still_failing_after_every_attempt_make_the_send_unavailable() {
    let sqs = ScriptedSqs::start(vec![Reply::FailEntries(vec![0], false); 10]).await;
    let queue = sqs.queue().await;
    let error = queue.send(messages(1)).await.expect_err("never accepted");
    assert!(matches!(error, QueueError::Unavailable { .. }), "{error:?}");
    assert_eq!(sqs.state().calls.len(), 4);
}

#[tokio::test]
async fn a_hung_endpoint_costs_an_attempt_timeout_and_the_retry_goes_through() {
    let sqs = ScriptedSqs::start(vec![Reply::Hang, Reply::Hang]).await;
    let queue = sqs
        .queue_with(|settings| {
            settings.sqs.attempt_timeout = std::time::Duration::from_millis(300);
            settings.sqs.operation_timeout = std::time::Duration::from_secs(10);
        })
        .await;
    let started = std::time::Instant::now();
    tokio::time::timeout(std::time::Duration::from_secs(8), queue.send(messages(3)))
        .await
        .expect("the send does not hang with its endpoint")
        .expect("the third attempt is answered");
    assert!(started.elapsed() >= std::time::Duration::from_millis(600));
    assert_eq!(sqs.state().accepted.len(), 3);
}

#[tokio::test]
async fn an_endpoint_that_never_answers_fails_the_call_within_its_operation_timeout() {
    let sqs = ScriptedSqs::start(vec![Reply::Hang; 100]).await;
    let queue = sqs
        .queue_with(|settings| {
            settings.sqs.attempt_timeout = std::time::Duration::from_millis(200);
            settings.sqs.operation_timeout = std::time::Duration::from_secs(1);
            settings.sqs.max_attempts = 100;
        })
        .await;
    let error = tokio::time::timeout(std::time::Duration::from_secs(5), queue.send(messages(1)))
        .await
        .expect("the send gives up by itself")
        .expect_err("nothing answered");
    assert!(matches!(error, QueueError::Unavailable { .. }), "{error:?}");
    assert!(sqs.state().accepted.is_empty());
}
