//! A bounded in-memory cache of products for GetProduct and BatchGetProducts, so the read
//! path other teams hit all day is a map lookup rather than a database round trip.
//!
//! Consistency:
//! - a write on this replica removes its products from the cache when it commits, so a
//!   caller reads its own writes;
//! - writes on other replicas reach the cache through the change log, which a follower task
//!   reads every `catalog.watch_poll_interval`: another replica's write is visible here
//!   within that interval (plus the time to read the log);
//! - a read that raced a write is not cached: entries are stored only when no invalidation
//!   happened between the start of the database read and the insert (a generation counter);
//! - when the follower cannot read the change log (database down, fell behind retention),
//!   the cache is emptied rather than left to go stale.

use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use mall_proto::catalog::v1::Product;

/// Shards: callers on different products rarely wait on one another's lock.
const SHARDS: usize = 16;

/// The cache; cheap to clone (clones share entries).
#[derive(Debug, Clone)]
pub struct ProductCache {
    inner: Option<Arc<Inner>>,
}

#[derive(Debug)]
struct Inner {
    shards: Vec<Mutex<HashMap<String, Arc<Product>>>>,
    per_shard: usize,
    hasher: RandomState,
    /// Bumped by every invalidation; see the module docs.
    generation: AtomicU64,
}

/// Taken before a database read, handed to [`ProductCache::insert`] after it.
#[derive(Debug, Clone, Copy)]
pub struct Ticket(u64);

impl ProductCache {
    /// A cache of at most `capacity` products; 0 disables caching.
    pub fn new(capacity: usize) -> Self {
        if capacity == 0 {
            return Self { inner: None };
        }
        Self {
            inner: Some(Arc::new(Inner {
                shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
                per_shard: capacity.div_ceil(SHARDS),
                hasher: RandomState::new(),
                generation: AtomicU64::new(0),
            })),
        }
    }

    /// The cached product with `code`.
    pub fn get(&self, code: &str) -> Option<Arc<Product>> {
        let inner = self.inner.as_ref()?;
        inner.shard(code).lock().ok()?.get(code).cloned()
    }

    /// Call before reading products from the database, to cache what the read returns.
    pub fn ticket(&self) -> Ticket {
        Ticket(
            self.inner
                .as_ref()
                .map_or(0, |i| i.generation.load(Ordering::Acquire)),
        )
    }

    /// Caches `products` read under `ticket`, unless an invalidation happened since.
    pub fn insert(&self, ticket: Ticket, products: impl IntoIterator<Item = Product>) {
        let Some(inner) = &self.inner else {
            return;
        };
        for product in products {
            let Ok(mut shard) = inner.shard(&product.code).lock() else {
                return;
            };
            // Checked under the shard lock: an invalidation of this code either happened
            // before (generation moved: skip) or waits for the lock and removes it after.
            if inner.generation.load(Ordering::Acquire) != ticket.0 {
                return;
            }
            if shard.len() >= inner.per_shard && !shard.contains_key(&product.code) {
                // Full: forget an arbitrary half. Simple, bounded, and a miss only costs a read.
                let keep = inner.per_shard / 2;
                let mut seen = 0;
                shard.retain(|_, _| {
                    seen += 1;
                    seen <= keep
                });
            }
            shard.insert(product.code.clone(), Arc::new(product));
        }
    }

    /// Forgets these products (they changed).
    pub fn invalidate<'a>(&self, codes: impl IntoIterator<Item = &'a str>) {
        let Some(inner) = &self.inner else {
            return;
        };
        inner.generation.fetch_add(1, Ordering::AcqRel);
        for code in codes {
            if let Ok(mut shard) = inner.shard(code).lock() {
                shard.remove(code);
            }
        }
    }

    /// Forgets everything (the change log could not be followed).
    pub fn clear(&self) {
        let Some(inner) = &self.inner else {
            return;
        };
        inner.generation.fetch_add(1, Ordering::AcqRel);
        for shard in &inner.shards {
            if let Ok(mut shard) = shard.lock() {
                shard.clear();
            }
        }
    }

    /// Products cached now.
    pub fn len(&self) -> usize {
        self.inner.as_ref().map_or(0, |inner| {
            inner
                .shards
                .iter()
                .map(|s| s.lock().map_or(0, |s| s.len()))
                .sum()
        })
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Inner {
    fn shard(&self, code: &str) -> &Mutex<HashMap<String, Arc<Product>>> {
        let index = usize::try_from(self.hasher.hash_one(code) % SHARDS as u64)
            .expect("a remainder of 16 fits a usize");
        &self.shards[index]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn product(code: &str, version: u64) -> Product {
        Product {
            code: code.into(),
            version,
            ..Product::default()
        }
    }

    #[test]
    fn a_read_that_raced_a_write_is_not_cached() {
        let cache = ProductCache::new(100);
        let ticket = cache.ticket();
        cache.invalidate(["A"]);
        cache.insert(ticket, [product("A", 1)]);
        assert!(cache.get("A").is_none());
        let ticket = cache.ticket();
        cache.insert(ticket, [product("A", 2)]);
        assert_eq!(cache.get("A").map(|p| p.version), Some(2));
        cache.invalidate(["A"]);
        assert!(cache.get("A").is_none());
    }

    #[test]
    fn the_cache_stays_within_its_capacity() {
        let cache = ProductCache::new(160);
        for i in 0..10_000 {
            let ticket = cache.ticket();
            cache.insert(ticket, [product(&format!("P-{i}"), 1)]);
        }
        assert!(cache.len() <= 160, "{}", cache.len());
        cache.clear();
        assert!(cache.is_empty());
    }

    #[test]
    fn a_disabled_cache_caches_nothing() {
        let cache = ProductCache::new(0);
        cache.insert(cache.ticket(), [product("A", 1)]);
        assert!(cache.get("A").is_none());
    }
}
