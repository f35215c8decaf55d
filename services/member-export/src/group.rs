//! Group commit: requests that arrive while the previous write runs are written together, in
//! one statement and one transaction.
//!
//! A delivery round sends up to `delivery.max_concurrency` requests at once, and each claims
//! its members just before it is sent and records the partner's answer after. With one member
//! per request, a transaction each made the database's writer (SQLite has one) the limit;
//! grouped, a round of 128 requests costs a handful of transactions and each request still
//! claims at the moment it is about to be sent.
//!
//! The writer is a task of its own, so a request waiting for its group never holds SQLite's
//! write turn and never needs to be polled for the group to be written.

use mall_grpc::ServiceError;
use tokio::sync::{mpsc, oneshot};

use crate::deliver::AbortOnDrop;

/// Members per group: three bound values each, well inside SQLite's 32,766 and
/// PostgreSQL's 65,535.
pub const MAX_MEMBERS: usize = 1_000;

/// A request of a group: its members (counted against [`MAX_MEMBERS`]).
pub trait Members {
    /// Members the request holds.
    fn members(&self) -> usize;
}

type Pending<T, R> = (T, oneshot::Sender<Result<R, ServiceError>>);

/// Where requests go to be written in groups; the writer task stops when this is dropped
/// (requests still queued then get UNAVAILABLE).
#[derive(Debug)]
pub struct Group<T, R> {
    requests: mpsc::UnboundedSender<Pending<T, R>>,
    _writer: AbortOnDrop<()>,
}

impl<T, R> Group<T, R>
where
    T: Members + Send + 'static,
    R: Send + 'static,
{
    /// Starts the writer: `write` takes a group (at least one request, at most
    /// [`MAX_MEMBERS`] members unless one request holds more) and answers each request, in
    /// order. The queue holds at most one request per caller waiting (each waits for its
    /// answer), so it is bounded by the requests in flight.
    pub fn spawn<F, Fut>(write: F) -> Self
    where
        F: Fn(Vec<T>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Vec<R>, ServiceError>> + Send,
    {
        let (requests, mut queue) = mpsc::unbounded_channel::<Pending<T, R>>();
        let writer = tokio::spawn(async move {
            let mut carried: Option<Pending<T, R>> = None;
            loop {
                let first = match carried.take() {
                    Some(request) => request,
                    None => match queue.recv().await {
                        Some(request) => request,
                        None => return,
                    },
                };
                let mut members = first.0.members();
                let mut group = vec![first];
                while let Ok(next) = queue.try_recv() {
                    if members + next.0.members() > MAX_MEMBERS {
                        carried = Some(next);
                        break;
                    }
                    members += next.0.members();
                    group.push(next);
                }
                let (items, answers): (Vec<T>, Vec<_>) = group.into_iter().unzip();
                match write(items).await {
                    Ok(results) => {
                        debug_assert_eq!(results.len(), answers.len(), "one result per request");
                        for (answer, result) in answers.into_iter().zip(results) {
                            // A caller that went away needs no answer.
                            let _ = answer.send(Ok(result));
                        }
                    }
                    Err(error) => {
                        for answer in answers {
                            let _ = answer.send(Err(copy_error(&error)));
                        }
                    }
                }
            }
        });
        Self {
            requests,
            _writer: AbortOnDrop(writer),
        }
    }

    /// Writes `request` with whatever else arrives meanwhile; returns its answer once the
    /// group is committed.
    ///
    /// # Errors
    /// The group's write failed (each request of the group gets the same error).
    pub async fn call(&self, request: T) -> Result<R, ServiceError> {
        let (answer, answered) = oneshot::channel();
        let gone = || ServiceError::Unavailable("the group writer stopped".to_owned());
        self.requests.send((request, answer)).map_err(|_| gone())?;
        answered.await.map_err(|_| gone())?
    }
}

/// The same failure for every request of a group whose write failed (the error is not
/// `Clone`): still UNAVAILABLE when it was, so the round is retried the same way.
fn copy_error(error: &ServiceError) -> ServiceError {
    match error {
        ServiceError::Unavailable(message) => ServiceError::Unavailable(message.clone()),
        other => ServiceError::Internal(anyhow::anyhow!("{other:#}")),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    impl Members for Vec<u32> {
        fn members(&self) -> usize {
            self.len()
        }
    }

    #[tokio::test]
    async fn requests_that_arrive_together_are_written_together_within_the_limit() {
        let writes: Arc<Mutex<Vec<usize>>> = Arc::default();
        let seen = writes.clone();
        let group = Group::spawn(move |items: Vec<Vec<u32>>| {
            let seen = seen.clone();
            async move {
                seen.lock()
                    .expect("not poisoned")
                    .push(items.iter().map(Vec::len).sum());
                Ok(items.iter().map(|i| i.iter().sum::<u32>()).collect())
            }
        });
        // 300 requests of 10 members at once: at most 1,000 members per write, each
        // request answered with its own result.
        let calls = (0..300u32).map(|i| group.call(vec![i; 10]));
        let results = futures::future::join_all(calls).await;
        for (i, result) in (0u32..).zip(results) {
            assert_eq!(result.expect("written"), i * 10);
        }
        let writes = writes.lock().expect("not poisoned").clone();
        assert_eq!(writes.iter().sum::<usize>(), 3_000);
        assert!(writes.iter().all(|&w| w <= MAX_MEMBERS), "{writes:?}");
        assert!(writes.len() < 300, "grouped: {} writes", writes.len());
    }

    #[tokio::test]
    async fn a_failed_write_fails_every_request_of_its_group() {
        let group = Group::spawn(|_: Vec<Vec<u32>>| async {
            Err::<Vec<()>, _>(ServiceError::Unavailable("database down".to_owned()))
        });
        let results = futures::future::join_all([group.call(vec![1]), group.call(vec![2])]).await;
        for result in results {
            assert!(
                matches!(&result, Err(ServiceError::Unavailable(m)) if m == "database down"),
                "{result:?}"
            );
        }
    }
}
