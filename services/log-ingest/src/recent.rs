//! Batches sent again: a sender whose acknowledgement was lost (log-ingest killed between
//! syncing a chunk and answering it, a connection cut) sends the same chunk again. Stored
//! twice, its lines would reach the multi-line grouping twice, and the lines at its start
//! would join whatever record was in progress at its end (a stack trace glued to another).
//! So the inputs (forward and OTLP) remember the digests of the last batches they stored
//! and answer a batch stored already without storing it again; a batch arriving while the
//! same one is being stored waits for that store's outcome.
//!
//! By content (SHA-256 of the batch as stored, but for when it was received; one stored by
//! a version that did not keep that time reads as if stored now), not by chunk id alone:
//! senders differ in how they make ids (Fluent Bit's is a digest of the chunk's data, the
//! same on a retry; others' are random). Times finer than a second (Fluent Bit's tail
//! stamps each line in nanoseconds) make a batch sent on purpose differ from an earlier
//! one. A sender writing whole seconds can send the same line twice in a second on purpose:
//! such a forward batch carries the sender's chunk id in what is stored
//! ([`crate::batch::Batch::encode_with`]), so it is recognised only when sent again under
//! the same id, and a batch sent on purpose under a new id is stored. (Fluent Bit with
//! `time_as_integer` gives identical chunks the same id: the second is taken for a resend.
//! A sender without acks sends no `chunk` and never resends: its batches are not matched at
//! all.) The memory is seeded at start from the newest batches still in the buffer (its
//! last [`SEED_BYTES`]), where a batch whose acknowledgement was lost almost always is: it
//! was among the last stored before the crash, and the pipeline acknowledges the buffer
//! only after a push, long after the sender's ack. Only the newest: a buffer filled during
//! a long Loki outage (gigabytes) would otherwise be read whole before the service answers
//! its start-up probe.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
};

use sha2::{Digest as _, Sha256};
use tokio::sync::watch;

use crate::buffer::{Buffer, BufferError, Position};

/// How many batches are remembered.
/// About 100 bytes each (3 MiB); at 350 chunks a second, a minute and a half of them: a
/// sender's retries after a cut connection come within it.
pub const REMEMBERED: usize = 32_768;

/// How much of the buffer's newest data is read at start to seed the memory: a few seconds
/// of reading on a slow volume (128 MiB/s), and hundreds of Fluent Bit's chunks.
pub const SEED_BYTES: u64 = 256 << 20;

/// What became of a batch handed to [`Recent::store`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// It is in the buffer now, synced.
    New,
    /// It was stored (and synced) before: sent again.
    SentAgain,
}

/// Digests of the last [`REMEMBERED`] batches stored, and of those being stored.
#[derive(Debug, Clone, Default)]
pub struct Recent {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Stored digests, oldest first (what is forgotten first).
    order: VecDeque<[u8; 32]>,
    /// Every digest known: stored, or being stored (its watch turns `true` when settled).
    states: HashMap<[u8; 32], State>,
}

#[derive(Debug)]
enum State {
    Stored,
    Pending(watch::Receiver<bool>),
}

/// A stored batch's digest: of its [`crate::batch::identity`], all but when it was received
/// (a resend comes later than the first copy).
pub fn digest(bytes: &[u8]) -> [u8; 32] {
    let mut sha = Sha256::new();
    for piece in crate::batch::identity(bytes) {
        sha.update(piece);
    }
    sha.finalize().into()
}

impl Recent {
    /// Remembers the newest batches in `buffer` after `start`: those in its last
    /// [`SEED_BYTES`] (whole segments; the last of them at most [`REMEMBERED`]).
    ///
    /// Best effort: a corrupt stretch is passed over (the pipeline skips it too, and says
    /// so), any other read error ends the seeding; a WARN line either way.
    pub fn seed(buffer: &Buffer, start: Position) -> Self {
        let recent = Self::default();
        let mut reader = buffer.reader(buffer.newest_from(start, SEED_BYTES));
        loop {
            match reader.try_next() {
                Ok(Some((bytes, _))) => recent.settle(digest(&bytes), true),
                Ok(None) => break,
                // Corrupt: the rest of that segment is passed over, as the pipeline does.
                Err(error) if error.kind() == std::io::ErrorKind::InvalidData => {
                    tracing::warn!(%error, "a corrupt stretch of the buffer is passed over while recognising chunks sent again");
                    reader.skip_segment();
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot read the newest batches to recognise chunks sent again; those before the fault are remembered");
                    break;
                }
            }
        }
        recent
    }

    /// Stores `bytes` in `buffer` unless the same batch is stored already; answers only
    /// once it is synced (or was). The same batch arriving while it is being stored waits
    /// for that store's outcome (and stores it itself if that failed), so a batch is never
    /// answered as stored before it is. The append runs on a task of its own: a caller
    /// that goes away (a gRPC deadline) cannot leave it half done or remembered unstored.
    ///
    /// # Errors
    /// As [`Buffer::append`]: full, too large, or the disk failed.
    pub async fn store(&self, buffer: &Buffer, bytes: Vec<u8>) -> Result<Stored, BufferError> {
        let digest = digest(&bytes);
        let mut bytes = Some(bytes);
        loop {
            let next = {
                let mut inner = crate::lock(&self.inner);
                match inner.states.get(&digest) {
                    Some(State::Stored) => Next::SentAgain,
                    Some(State::Pending(settled)) => Next::Wait(settled.clone()),
                    None => {
                        let (settled, pending) = watch::channel(false);
                        inner.states.insert(digest, State::Pending(pending));
                        Next::Store(settled)
                    }
                }
            };
            match next {
                Next::SentAgain => return Ok(Stored::SentAgain),
                // Another store of the same batch is under way: its outcome decides.
                Next::Wait(mut pending) => {
                    let _ = pending.wait_for(|settled| *settled).await;
                }
                Next::Store(settled) => {
                    let recent = self.clone();
                    let buffer = buffer.clone();
                    let bytes = bytes.take().unwrap_or_default();
                    let append = tokio::spawn(async move {
                        let mut settle = Settle {
                            recent,
                            digest,
                            stored: false,
                            settled,
                        };
                        let result = buffer.append(bytes).await;
                        settle.stored = result.is_ok();
                        result
                    });
                    return match append.await {
                        Ok(result) => result.map(|_| Stored::New),
                        Err(error) => Err(BufferError::Io(std::io::Error::other(error))),
                    };
                }
            }
        }
    }

    /// Records the outcome of a store of `digest`.
    fn settle(&self, digest: [u8; 32], stored: bool) {
        let mut inner = crate::lock(&self.inner);
        if !stored {
            inner.states.remove(&digest);
            return;
        }
        // Remembered once (the buffer can hold a batch twice: seeding reads both copies).
        if matches!(
            inner.states.insert(digest, State::Stored),
            Some(State::Stored)
        ) {
            return;
        }
        inner.order.push_back(digest);
        if inner.order.len() > REMEMBERED
            && let Some(old) = inner.order.pop_front()
            && matches!(inner.states.get(&old), Some(State::Stored))
        {
            inner.states.remove(&old);
        }
    }
}

/// What a store does after looking at what is known.
enum Next {
    SentAgain,
    Wait(watch::Receiver<bool>),
    Store(watch::Sender<bool>),
}

/// Settles a store when its task ends, however it ends (a panic included).
struct Settle {
    recent: Recent,
    digest: [u8; 32],
    stored: bool,
    settled: watch::Sender<bool>,
}

impl Drop for Settle {
    fn drop(&mut self) {
        self.recent.settle(self.digest, self.stored);
        let _ = self.settled.send(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::buffer::Limits;

    fn buffer(max_bytes: u64) -> (Buffer, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let limits = Limits {
            max_bytes,
            segment_bytes: max_bytes,
        };
        let (buffer, _) = Buffer::open(dir.path(), limits).expect("opens");
        (buffer, dir)
    }

    #[tokio::test]
    async fn a_batch_is_stored_once_and_forgotten_after_enough_others() {
        let (buffer, _dir) = buffer(64 << 20);
        let recent = Recent::default();
        assert_eq!(
            recent.store(&buffer, b"a".to_vec()).await.ok(),
            Some(Stored::New)
        );
        assert_eq!(
            recent.store(&buffer, b"a".to_vec()).await.ok(),
            Some(Stored::SentAgain)
        );
        for i in 0..REMEMBERED {
            // Text, which no batch header starts (`identity` reads those).
            recent.settle(digest(format!("other {i}").as_bytes()), true);
        }
        assert_eq!(
            recent.store(&buffer, b"a".to_vec()).await.ok(),
            Some(Stored::New),
            "pushed out by newer ones"
        );
    }

    /// Seeding reads what it can: a batch the buffer holds twice is remembered once, and a
    /// corrupt stretch is passed over without failing the start.
    #[tokio::test]
    async fn seeding_is_best_effort_and_remembers_a_batch_once() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        // A segment per batch: the corrupt one is not the last (which opening checks).
        let limits = Limits {
            max_bytes: 1 << 20,
            segment_bytes: 64,
        };
        let (buffer, start) = Buffer::open(dir.path(), limits).expect("opens");
        for batch in [b'a', b'a', b'b'] {
            buffer.append(vec![batch; 40]).await.expect("appends");
        }
        let recent = Recent::seed(&buffer, start);
        assert_eq!(
            crate::lock(&recent.inner).order.len(),
            2,
            "a and b, once each"
        );
        drop((buffer, recent));
        let mut segments: Vec<_> = std::fs::read_dir(dir.path())
            .expect("lists")
            .map(|e| e.expect("an entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "seg"))
            .collect();
        segments.sort();
        let first = &segments[0];
        let mut bytes = std::fs::read(first).expect("reads");
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(first, bytes).expect("writes");
        let (buffer, start) = Buffer::open(dir.path(), limits).expect("opens");
        let recent = Recent::seed(&buffer, start);
        assert_eq!(
            crate::lock(&recent.inner).order.len(),
            2,
            "the corrupt first segment passed over, a and b after it remembered"
        );
    }

    /// A chunk sent again comes later than its first copy: it is recognised though its
    /// received time differs, while live, after a restart (seeded from the buffer) and after
    /// the upgrade that began keeping the time.
    #[tokio::test]
    async fn a_batch_sent_again_later_is_recognised_by_all_but_its_received_time() {
        use crate::batch::{Batch, Events, Source};
        let (buffer, _dir) = buffer(64 << 20);
        let mut batch = Batch {
            source: Source::Forward,
            tag: "hybris.wrapper".to_owned(),
            events: Events::default(),
            received_ms: 1_764_979_200_000,
        };
        batch.events.push(&crate::forward::Event {
            time_nanos: 1_764_979_199_000_000_123,
            record: vec![(rmpv::Value::from("log"), rmpv::Value::from("a line"))],
        });
        let recent = Recent::default();
        let stored = |batch: &Batch| {
            let bytes = batch.encode_with(Some(b"\xa2id"));
            let (recent, buffer) = (recent.clone(), buffer.clone());
            async move { recent.store(&buffer, bytes).await.ok() }
        };
        assert_eq!(stored(&batch).await, Some(Stored::New));
        batch.received_ms += 30_000;
        assert_eq!(stored(&batch).await, Some(Stored::SentAgain));
        let seeded = Recent::seed(&buffer, Position::default());
        batch.received_ms += 30_000;
        let again = batch.encode_with(Some(b"\xa2id"));
        assert_eq!(
            seeded.store(&buffer, again).await.ok(),
            Some(Stored::SentAgain),
            "after a restart"
        );
        let mut other = batch.clone();
        other.events = Events::default();
        other.events.push(&crate::forward::Event {
            time_nanos: 1_764_979_199_000_000_124,
            record: vec![(rmpv::Value::from("log"), rmpv::Value::from("a line"))],
        });
        assert_eq!(stored(&other).await, Some(Stored::New), "another batch");
        // Across the upgrade: the first copy stored by the previous version (four parts,
        // no received time), the resend by this one.
        let (before, _before_dir) = self::buffer(64 << 20);
        let mut legacy = batch.encode_with(Some(b"\xa2id"));
        legacy.truncate(legacy.len() - 9);
        legacy[0] = 0x94;
        before.append(legacy).await.expect("appends");
        let seeded = Recent::seed(&before, Position::default());
        let again = batch.encode_with(Some(b"\xa2id"));
        assert_eq!(
            seeded.store(&before, again).await.ok(),
            Some(Stored::SentAgain),
            "a first copy the previous version stored"
        );
    }

    #[tokio::test]
    async fn a_batch_that_could_not_be_stored_is_not_remembered() {
        let (buffer, _dir) = buffer(1 << 20);
        let recent = Recent::default();
        let big = vec![7_u8; 2 << 20];
        assert!(recent.store(&buffer, big.clone()).await.is_err());
        assert!(
            recent.store(&buffer, big).await.is_err(),
            "refused again, not SentAgain"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_same_batch_twice_at_once_is_stored_once_and_both_answered_after_it() {
        let (buffer, _dir) = buffer(64 << 20);
        let recent = Recent::default();
        let (a, b) = tokio::join!(
            recent.store(&buffer, b"same".to_vec()),
            recent.store(&buffer, b"same".to_vec())
        );
        let mut outcomes = [a.expect("stored"), b.expect("stored")];
        outcomes.sort_by_key(|o| *o == Stored::SentAgain);
        assert_eq!(outcomes, [Stored::New, Stored::SentAgain]);
        let mut reader = buffer.reader(Position::default());
        assert!(reader.try_next().expect("reads").is_some());
        assert!(reader.try_next().expect("reads").is_none(), "stored once");
    }

    #[tokio::test]
    async fn a_caller_that_goes_away_does_not_leave_its_batch_half_remembered() {
        let (buffer, _dir) = buffer(64 << 20);
        let recent = Recent::default();
        // Dropped at once: the append goes on without it and settles.
        drop(
            tokio::time::timeout(
                std::time::Duration::ZERO,
                recent.store(&buffer, b"x".to_vec()),
            )
            .await,
        );
        let outcome = recent.store(&buffer, b"x".to_vec()).await.expect("stored");
        let mut reader = buffer.reader(Position::default());
        let mut count = 0;
        while reader.try_next().expect("reads").is_some() {
            count += 1;
        }
        // Either the first store finished (sent again) or it never started (new): never
        // answered as stored without being in the buffer.
        assert_eq!(count, 1, "{outcome:?}");
    }
}
