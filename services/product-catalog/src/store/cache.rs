//! A bounded in-memory cache of products for GetProduct and BatchGetProducts, so the read
//! path other teams hit all day is a map lookup rather than a database round trip.
//!
//! Storage and eviction are quick_cache's (a concurrent S3-FIFO cache: recently and often
//! read products stay, one-off reads do not push them out). What is ours is consistency:
//! - a write on this replica puts the products it committed into the cache (on PostgreSQL,
//!   with its transaction id, which orders one product's writes; see `write_pg`), or
//!   removes them (SQLite), so a caller reads its own writes and a steady stream of writes
//!   does not turn reads of the written products into database reads. A put never replaces
//!   an entry written by a later transaction, nor lands after a later write was seen;
//! - writes on other replicas reach the cache through the change log, which a follower task
//!   reads every `catalog.watch_poll_interval`: another replica's write is visible here
//!   within that interval (plus the time to read the log). The follower reads in log
//!   order up to the commit-order watermark, and each poll also invalidates entries that
//!   committed above it, so a long-running transaction elsewhere on the PostgreSQL server
//!   (which holds the watermark back) does not hold back this replica's reads; only a change
//!   committing above the watermark but below what an earlier poll read waits for it to
//!   pass. A change the cached entry already
//!   includes (its writer's id is not above the entry's) leaves the entry alone, so this
//!   replica's own writes are not thrown out again when the follower reads them;
//! - a read that raced a write of the *same* product is not cached. Every invalidation
//!   records, per product, the generation it happened at; a database read takes a ticket (the
//!   generation before it started) and its products are cached only where no invalidation of
//!   that product came after the ticket. Invalidation and insertion of one product hold the
//!   same stripe lock, so one always sees the other. A steady stream of writes to other
//!   products does not stop anything from being cached;
//! - invalidations are remembered for [`RACE_WINDOW`]; a read that took longer than that
//!   is not cached at all;
//! - when the follower cannot read the change log (database down, fell behind retention),
//!   the cache is emptied rather than left to go stale.

use std::{
    collections::HashMap,
    hash::BuildHasher,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use foldhash::fast::RandomState;
use mall_proto::catalog::v1::Product;

/// Stripes of the per-product invalidation record: writers and readers of different products
/// rarely share a lock.
const STRIPES: usize = 64;

/// How long an invalidation is remembered, and so the longest database read whose products
/// are still cached (reads take milliseconds; the statement timeout is 30 s).
pub const RACE_WINDOW: Duration = Duration::from_secs(10);

/// The cache; cheap to clone (clones share entries).
#[derive(Debug, Clone)]
pub struct ProductCache {
    inner: Option<Arc<Inner>>,
}

#[derive(Debug)]
struct Inner {
    products: quick_cache::sync::Cache<String, Entry>,
    stripes: Vec<Mutex<Stripe>>,
    /// Picks a code's stripe. foldhash (seeded per process) rather than SipHash: every write
    /// hashes each of its codes here and in the stripe's map; codes come from the catalog's
    /// own callers, and colliding ones would need the seed.
    hasher: RandomState,
    /// Bumped by every invalidation.
    generation: AtomicU64,
}

/// A cached product and the commit order of the write that produced it: the writing
/// transaction's id on PostgreSQL; 0 when unknown (read from the database, or SQLite), which
/// any change of the product replaces.
#[derive(Debug, Clone)]
struct Entry {
    product: Arc<Product>,
    order: i64,
}

/// The invalidations of one stripe's products.
#[derive(Debug, Default)]
struct Stripe {
    /// Product code → generation, time and commit order of its last invalidation or write:
    /// reads from before the generation are not cached, and writes ordered before it are not
    /// put.
    invalidated: HashMap<String, Mark, RandomState>,
    /// Generation of the last [`ProductCache::clear`]: tickets before it cache nothing.
    cleared: u64,
    /// Size of `invalidated` after its last sweep, and when that was.
    swept: (usize, Option<Instant>),
}

/// The last invalidation or write of a product.
#[derive(Debug, Clone, Copy)]
struct Mark {
    generation: u64,
    at: Instant,
    order: i64,
}

/// Taken before a database read, handed to [`ProductCache::insert`] after it.
#[derive(Debug, Clone, Copy)]
pub struct Ticket {
    generation: u64,
    taken: Instant,
}

impl ProductCache {
    /// A cache of at most `capacity` products; 0 disables caching.
    pub fn new(capacity: usize) -> Self {
        if capacity == 0 {
            return Self { inner: None };
        }
        Self {
            inner: Some(Arc::new(Inner {
                products: quick_cache::sync::Cache::new(capacity),
                stripes: (0..STRIPES).map(|_| Mutex::default()).collect(),
                hasher: RandomState::default(),
                generation: AtomicU64::new(0),
            })),
        }
    }

    /// The cached product with `code`.
    pub fn get(&self, code: &str) -> Option<Arc<Product>> {
        Some(self.inner.as_ref()?.products.get(code)?.product)
    }

    /// Call before reading products from the database, to cache what the read returns.
    pub fn ticket(&self) -> Ticket {
        Ticket {
            generation: self
                .inner
                .as_ref()
                .map_or(0, |i| i.generation.load(Ordering::Acquire)),
            taken: Instant::now(),
        }
    }

    /// Caches `products` read under `ticket`, except those invalidated since it was taken.
    pub fn insert(&self, ticket: Ticket, products: impl IntoIterator<Item = Product>) {
        let Some(inner) = &self.inner else {
            return;
        };
        if ticket.taken.elapsed() >= RACE_WINDOW {
            // Invalidations that old may be forgotten: nothing proves the read is current.
            return;
        }
        for product in products {
            let Ok(stripe) = inner.stripe(&product.code).lock() else {
                return;
            };
            let invalidated_since = ticket.generation < stripe.cleared
                || stripe
                    .invalidated
                    .get(&product.code)
                    .is_some_and(|mark| mark.generation > ticket.generation);
            if !invalidated_since {
                inner.products.insert(
                    product.code.clone(),
                    Entry {
                        product: Arc::new(product),
                        order: 0,
                    },
                );
            }
        }
    }

    /// Forgets these products (they changed).
    pub fn invalidate<'a>(&self, codes: impl IntoIterator<Item = &'a str>) {
        let Some(inner) = &self.inner else {
            return;
        };
        let generation = inner.generation.fetch_add(1, Ordering::AcqRel) + 1;
        inner.invalidate_at(generation, codes.into_iter().map(|code| (code, 0)));
    }

    /// Forgets products changed by the transactions named beside them, unless the cached
    /// entry already holds that change (it was written by the same or a later transaction:
    /// one product's writers have increasing ids). Id 0 (SQLite, or an entry older than
    /// transaction ids) always forgets.
    pub fn invalidate_changed<'a>(&self, changes: impl IntoIterator<Item = (&'a str, i64)>) {
        let Some(inner) = &self.inner else {
            return;
        };
        let generation = inner.generation.fetch_add(1, Ordering::AcqRel) + 1;
        inner.invalidate_at(generation, changes);
    }

    /// Caches `products` as the transaction `order` (> 0) committed them, after the commit:
    /// reads from before are not cached over them, and an entry or a change of a later
    /// transaction is not replaced.
    pub fn put_written(&self, products: impl IntoIterator<Item = Product>, order: i64) {
        let Some(inner) = &self.inner else {
            return;
        };
        let generation = inner.generation.fetch_add(1, Ordering::AcqRel) + 1;
        let now = Instant::now();
        for product in products {
            let Ok(mut stripe) = inner.stripe(&product.code).lock() else {
                continue;
            };
            let before = stripe.mark(&product.code, generation, now, order);
            if before.is_some_and(|before| before > order) {
                // A later transaction's write or change of this product was seen first: what
                // is cached (if anything) is at least as new.
                continue;
            }
            inner.products.insert(
                product.code.clone(),
                Entry {
                    product: Arc::new(product),
                    order,
                },
            );
        }
    }

    /// Forgets everything (the change log could not be followed).
    pub fn clear(&self) {
        let Some(inner) = &self.inner else {
            return;
        };
        let generation = inner.generation.fetch_add(1, Ordering::AcqRel) + 1;
        // Every stripe is locked while clearing: no insert of an older read slips in after.
        let mut stripes: Vec<_> = inner.stripes.iter().filter_map(|s| s.lock().ok()).collect();
        for stripe in &mut stripes {
            stripe.cleared = generation;
            stripe.invalidated.clear();
            stripe.swept = (0, None);
        }
        inner.products.clear();
    }

    /// Products cached now.
    pub fn len(&self) -> usize {
        self.inner.as_ref().map_or(0, |inner| inner.products.len())
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Inner {
    /// Records an invalidation of each code at `generation` by a change of commit order
    /// `order`, and forgets the product unless its entry is from that transaction or a later
    /// one (`order` > 0).
    fn invalidate_at<'a>(
        &self,
        generation: u64,
        changes: impl IntoIterator<Item = (&'a str, i64)>,
    ) {
        let now = Instant::now();
        for (code, order) in changes {
            let Ok(mut stripe) = self.stripe(code).lock() else {
                continue;
            };
            if order > 0
                && self
                    .products
                    .get(code)
                    .is_some_and(|entry| entry.order >= order)
            {
                continue;
            }
            stripe.mark(code, generation, now, order);
            self.products.remove(code);
        }
    }

    fn stripe(&self, code: &str) -> &Mutex<Stripe> {
        let index = usize::try_from(self.hasher.hash_one(code) % STRIPES as u64)
            .expect("a remainder of 64 fits a usize");
        &self.stripes[index]
    }
}

impl Stripe {
    /// Records an invalidation or write of `code` at `generation`, `now`, by a change of
    /// commit order `order`; the commit order recorded before, if any. Keeps the newest:
    /// a slower invalidation that took its generation earlier (the change-log follower's, say)
    /// must not lower what a later one recorded.
    fn mark(&mut self, code: &str, generation: u64, now: Instant, order: i64) -> Option<i64> {
        self.forget_expired(now);
        // Look up before inserting: most writes mark codes marked before, and `entry` would
        // allocate the key every time.
        if let Some(mark) = self.invalidated.get_mut(code) {
            let before = mark.order;
            *mark = Mark {
                generation: mark.generation.max(generation),
                at: now,
                order: before.max(order),
            };
            return Some(before);
        }
        let mark = Mark {
            generation,
            at: now,
            order,
        };
        self.invalidated.insert(code.to_owned(), mark);
        None
    }

    /// Drops invalidations older than [`RACE_WINDOW`]; a ticket that old caches nothing.
    /// Amortized: a sweep runs when the record has doubled since the last one, or once per
    /// [`RACE_WINDOW`] while it holds more than 1,024 codes (so a record that stays large,
    /// marking the same codes again and again, is not swept on every call).
    fn forget_expired(&mut self, now: Instant) {
        let len = self.invalidated.len();
        let (swept_len, swept_at) = self.swept;
        let doubled = len >= (2 * swept_len).max(1_024);
        let due = len >= 1_024 && swept_at.is_some_and(|at| now.duration_since(at) >= RACE_WINDOW);
        if !(doubled || due) {
            return;
        }
        self.invalidated
            .retain(|_, mark| now.duration_since(mark.at) < RACE_WINDOW);
        self.swept = (self.invalidated.len(), Some(now));
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
    fn a_large_record_is_swept_once_per_window_not_on_every_mark() {
        let mut stripe = Stripe::default();
        let start = Instant::now();
        for i in 0..1_500 {
            stripe.mark(&format!("P{i}"), 1, start, 0);
        }
        // Swept once on reaching 1,024 (nothing had expired).
        assert_eq!(stripe.swept, (1_024, Some(start)));
        // Marking the same codes again within the window sweeps nothing more.
        let later = start + RACE_WINDOW / 2;
        for i in 0..1_500 {
            assert_eq!(stripe.mark(&format!("P{i}"), 2, later, 7), Some(0));
        }
        assert_eq!(stripe.swept, (1_024, Some(start)));
        assert_eq!(
            stripe.mark("P0", 3, later, 5),
            Some(7),
            "the order recorded before"
        );
        assert_eq!(stripe.mark("new", 3, later, 5), None);
        // A window after the last sweep, the next mark sweeps what expired meanwhile.
        let expired = later + RACE_WINDOW;
        stripe.mark("P1", 4, expired, 0);
        assert_eq!(stripe.invalidated.len(), 1);
        assert_eq!(stripe.swept.1, Some(expired));
    }

    #[test]
    fn a_read_that_raced_a_write_of_its_product_is_not_cached() {
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
    fn writes_to_other_products_do_not_stop_caching() {
        let cache = ProductCache::new(100);
        let ticket = cache.ticket();
        for i in 0..1_000 {
            cache.invalidate([format!("OTHER-{i}").as_str()]);
        }
        cache.insert(ticket, [product("A", 1)]);
        assert_eq!(cache.get("A").map(|p| p.version), Some(1));
    }

    #[test]
    fn a_late_invalidation_with_an_older_generation_does_not_lower_the_record() {
        let cache = ProductCache::new(100);
        let inner = cache.inner.as_ref().expect("enabled");
        // A follower takes its generation, a reader its ticket, a writer invalidates (a newer
        // generation), then the follower records its older one.
        let follower = inner.generation.fetch_add(1, Ordering::AcqRel) + 1;
        let ticket = cache.ticket();
        cache.invalidate(["A"]);
        inner.invalidate_at(follower, [("A", 0)]);
        cache.insert(ticket, [product("A", 1)]);
        assert!(
            cache.get("A").is_none(),
            "the read raced the writer's invalidation"
        );
    }

    #[test]
    fn writes_are_cached_in_their_commit_order() {
        let cache = ProductCache::new(100);
        let ticket = cache.ticket();
        cache.put_written([product("A", 5)], 20);
        cache.insert(ticket, [product("A", 4)]);
        assert_eq!(
            cache.get("A").map(|p| p.version),
            Some(5),
            "a read from before the write is not cached over it"
        );
        cache.put_written([product("A", 3)], 10);
        assert_eq!(
            cache.get("A").map(|p| p.version),
            Some(5),
            "an earlier transaction's put arriving late changes nothing"
        );
        cache.invalidate_changed([("A", 20), ("A", 15)]);
        assert_eq!(
            cache.get("A").map(|p| p.version),
            Some(5),
            "changes the entry already holds keep it"
        );
        cache.invalidate_changed([("A", 30)]);
        assert!(cache.get("A").is_none(), "a later change forgets it");
        cache.put_written([product("A", 6)], 25);
        assert!(
            cache.get("A").is_none(),
            "a put of a transaction before a change already seen is not cached"
        );
        cache.put_written([product("A", 7)], 31);
        assert_eq!(cache.get("A").map(|p| p.version), Some(7));
        cache.invalidate_changed([("A", 0)]);
        assert!(
            cache.get("A").is_none(),
            "an unordered change always forgets"
        );
    }

    #[test]
    fn a_clear_refuses_reads_from_before_it() {
        let cache = ProductCache::new(100);
        let ticket = cache.ticket();
        cache.clear();
        cache.insert(ticket, [product("A", 1)]);
        assert!(cache.is_empty());
        cache.insert(cache.ticket(), [product("A", 2)]);
        assert_eq!(cache.len(), 1);
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
