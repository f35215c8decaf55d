//! A WatchProductChanges follower: opened from the oldest change before anything is
//! published, it resumes from its last cursor whenever the catalog goes away, and checks each
//! product's history as it goes: a product's version never goes back, every change starts
//! from the version the previous one left (nothing missing from the stream), and a change
//! that leaves the version as it was is a late change of older fields. It keeps each
//! product's last state, which must equal the catalog's.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use mall_proto::catalog::v1::{
    Product, WatchProductChangesRequest,
    product_catalog_service_client::ProductCatalogServiceClient,
};
use mall_test_support::probe;
use tokio_util::sync::CancellationToken;
use tonic::{Code, transport::Channel};

/// Problems reported, at most (the first ones tell the story).
const MAX_PROBLEMS: usize = 50;

#[derive(Debug, Default)]
struct Seen {
    /// The last state seen per product.
    last: HashMap<String, Product>,
    /// Sum of `last`: progress towards the sum of the highest versions.
    version_sum: u64,
    /// Change records read.
    records: u64,
    /// Streams opened (1 + reconnects).
    streams: u64,
    /// Regressions, gaps and stream errors that are not outages.
    problems: Vec<String>,
}

/// A running watch; stops when dropped.
pub struct Watch {
    seen: Arc<Mutex<Seen>>,
    stop: CancellationToken,
}

impl Watch {
    /// Opens WatchProductChanges from the oldest change at `addr` and returns once the first
    /// stream is open, so nothing published afterwards can be missed.
    pub async fn start(addr: SocketAddr) -> Self {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = CancellationToken::new();
        let (opened, first_open) = tokio::sync::oneshot::channel();
        tokio::spawn(follow(addr, seen.clone(), stop.clone(), opened));
        tokio::time::timeout(Duration::from_secs(30), first_open)
            .await
            .expect("the watch opens within 30s")
            .expect("the watch task reports its first stream");
        Self { seen, stop }
    }

    fn with<T>(&self, f: impl FnOnce(&Seen) -> T) -> T {
        f(&self.seen.lock().expect("the lock is not poisoned"))
    }

    /// Sum over products of the last version seen: progress towards the sum of the highest
    /// versions.
    pub fn version_sum(&self) -> u64 {
        self.with(|s| s.version_sum)
    }

    /// (change records read, streams opened).
    pub fn counts(&self) -> (u64, u64) {
        self.with(|s| (s.records, s.streams))
    }

    /// Waits until the stream last showed every product of `expected` exactly as expected
    /// (timestamps aside), or a problem shows.
    ///
    /// # Panics
    /// After `timeout`, naming the products still behind.
    pub async fn wait_for(&self, expected: &BTreeMap<String, Product>, timeout: Duration) {
        // The whole state, not the versions: writes commute, so a late change of a lower
        // version (a message redelivered after a kill) still writes the fields it is the
        // newest for after every product reached its highest version.
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let behind: Vec<String> = self.with(|s| {
                if !s.problems.is_empty() {
                    return Vec::new();
                }
                expected
                    .iter()
                    .filter(|(code, want)| {
                        s.last.get(*code).map(|p| Product {
                            create_time: None,
                            update_time: None,
                            ..p.clone()
                        }) != Some((*want).clone())
                    })
                    .map(|(code, want)| {
                        format!(
                            "{code} at {} of {}",
                            s.last.get(code).map_or(0, |p| p.version),
                            want.version
                        )
                    })
                    .collect()
            });
            if behind.is_empty() {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "after {timeout:?}, the change stream shows {} products not in the state their \
                 changes give (changes lost?), e.g. {:?}",
                behind.len(),
                &behind[..behind.len().min(10)]
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// What the stream showed: the last state of every product, and every problem.
    pub fn result(&self) -> (HashMap<String, Product>, Vec<String>) {
        self.with(|s| (s.last.clone(), s.problems.clone()))
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn follow(
    addr: SocketAddr,
    seen: Arc<Mutex<Seen>>,
    stop: CancellationToken,
    opened: tokio::sync::oneshot::Sender<()>,
) {
    let mut opened = Some(opened);
    let mut cursor = String::new();
    let problem = |text: String| {
        let mut seen = seen.lock().expect("the lock is not poisoned");
        if seen.problems.len() < MAX_PROBLEMS {
            seen.problems.push(text);
        }
    };
    while !stop.is_cancelled() {
        let request = WatchProductChangesRequest {
            from_oldest: cursor.is_empty(),
            start_cursor: cursor.clone(),
            product_type: String::new(),
        };
        let mut client = client(addr);
        let call = tokio::select! {
            () = stop.cancelled() => return,
            call = client.watch_product_changes(request) => call,
        };
        let mut stream = match call {
            Ok(response) => response.into_inner(),
            Err(status) => {
                if !is_outage(&status) {
                    problem(format!("WatchProductChanges failed: {status}"));
                    return;
                }
                // The catalog is down (the outage): ask again shortly.
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
        };
        seen.lock().expect("the lock is not poisoned").streams += 1;
        if let Some(opened) = opened.take() {
            let _ = opened.send(());
        }
        loop {
            let message = tokio::select! {
                () = stop.cancelled() => return,
                message = stream.message() => message,
            };
            let response = match message {
                Ok(Some(response)) => response,
                Ok(None) => break,
                Err(status) if is_outage(&status) => break,
                Err(status) => {
                    problem(format!("the change stream failed: {status}"));
                    return;
                }
            };
            let mut seen = seen.lock().expect("the lock is not poisoned");
            for record in &response.changes {
                seen.records += 1;
                let Some(product) = &record.product else {
                    drop(seen);
                    problem(format!("change record {} has no product", record.cursor));
                    return;
                };
                let last = seen.last.get(&product.code).map_or(0, |p| p.version);
                let complaint = if product.version < last {
                    Some(format!(
                        "{} went back from version {last} to {}",
                        product.code, product.version
                    ))
                } else if product.version == last && record.change_version >= last {
                    Some(format!(
                        "{} stayed at version {last} after a change of version {}, which is \
                         not older",
                        product.code, record.change_version
                    ))
                } else if record.previous_version != last {
                    Some(format!(
                        "{} changed from version {} to {}, but the stream last showed {last}",
                        product.code, record.previous_version, product.version
                    ))
                } else {
                    None
                };
                if let Some(complaint) = complaint
                    && seen.problems.len() < MAX_PROBLEMS
                {
                    seen.problems.push(complaint);
                }
                seen.version_sum += product.version.saturating_sub(last);
                seen.last.insert(product.code.clone(), product.clone());
            }
            if !response.resume_cursor.is_empty() {
                cursor = response.resume_cursor.clone();
            } else if let Some(record) = response.changes.last() {
                cursor = record.cursor.clone();
            }
        }
    }
}

/// Whether a failed call means the catalog is away (stopped for the outage), not a bug.
fn is_outage(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled
    )
}

/// A catalog client for `addr`, with room for large watch responses.
fn client(addr: SocketAddr) -> ProductCatalogServiceClient<Channel> {
    ProductCatalogServiceClient::new(probe::channel(addr)).max_decoding_message_size(64 << 20)
}
