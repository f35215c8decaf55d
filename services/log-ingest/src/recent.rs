//! Batches sent again: a sender whose acknowledgement was lost (log-ingest killed between
//! syncing a chunk and answering it, a connection cut) sends the same chunk again. Stored
//! twice, its lines would reach the multi-line grouping twice, and the lines at its start
//! would join whatever record was in progress at its end (a stack trace glued to another).
//! So the forward input remembers the digests of the last batches it stored and answers a
//! batch it has already stored without storing it again.
//!
//! By content (SHA-256 of the batch as stored), not by chunk id: Fluent Bit does not keep a
//! chunk's id across retries. A batch identical to a recent one in every line, time and
//! field but sent on purpose is dropped too; Loki would drop its entries anyway (it keeps
//! one of entries identical in stream, time and line). The memory is seeded at start from the batches still in the
//! buffer, where a batch whose acknowledgement was lost almost always still is (the
//! pipeline acknowledges the buffer only after a push, long after the sender's ack).

use std::{
    collections::{HashSet, VecDeque},
    sync::{Arc, Mutex},
};

use sha2::{Digest as _, Sha256};

use crate::buffer::{Buffer, Position};

/// How many batches are remembered.
pub const REMEMBERED: usize = 4_096;

/// Digests of the last [`REMEMBERED`] batches stored.
#[derive(Debug, Clone, Default)]
pub struct Recent {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    order: VecDeque<[u8; 32]>,
    set: HashSet<[u8; 32]>,
}

/// A batch's digest.
pub fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

impl Recent {
    /// Remembers the batches in `buffer` from `start` to its end (the last of them).
    ///
    /// # Errors
    /// When the buffer cannot be read.
    pub fn seed(buffer: &Buffer, start: Position) -> std::io::Result<Self> {
        let recent = Self::default();
        let mut reader = buffer.reader(start);
        while let Some((bytes, _)) = reader.try_next()? {
            recent.insert(digest(&bytes));
        }
        Ok(recent)
    }

    /// Remembers `digest`; `false` when it was remembered already (a batch sent again).
    pub fn insert(&self, digest: [u8; 32]) -> bool {
        let mut inner = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !inner.set.insert(digest) {
            return false;
        }
        inner.order.push_back(digest);
        if inner.order.len() > REMEMBERED
            && let Some(old) = inner.order.pop_front()
        {
            inner.set.remove(&old);
        }
        true
    }

    /// Forgets `digest` (its batch could not be stored after all).
    pub fn forget(&self, digest: &[u8; 32]) {
        let mut inner = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if inner.set.remove(digest) {
            inner.order.retain(|d| d != digest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_new_once_and_forgotten_after_enough_others() {
        let recent = Recent::default();
        assert!(recent.insert(digest(b"a")));
        assert!(!recent.insert(digest(b"a")));
        recent.forget(&digest(b"a"));
        assert!(recent.insert(digest(b"a")));
        for i in 0..REMEMBERED {
            recent.insert(digest(&i.to_le_bytes()));
        }
        assert!(recent.insert(digest(b"a")), "pushed out by newer ones");
    }
}
