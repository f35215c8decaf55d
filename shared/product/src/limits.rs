//! Size limits of a product and of the requests that carry products.
//!
//! They keep one product well under the 4 MiB a default gRPC client accepts in one message, so
//! any stored product can always be read back, and keep database rows and indexes small.

/// Longest product code, in characters (the legacy platform's codes are at most 40).
pub const MAX_CODE_CHARS: usize = 64;
/// Longest brand, in characters.
pub const MAX_BRAND_CHARS: usize = 128;
/// Deepest category path.
pub const MAX_CATEGORY_LEVELS: usize = 8;
/// Longest category path segment, in characters.
pub const MAX_CATEGORY_CHARS: usize = 128;
/// Most languages in `names` and in `descriptions`.
pub const MAX_LANGUAGES: usize = 32;
/// Longest name, in characters.
pub const MAX_NAME_CHARS: usize = 500;
/// Longest description, in characters.
pub const MAX_DESCRIPTION_CHARS: usize = 20_000;
/// Most currencies in `prices`.
pub const MAX_CURRENCIES: usize = 32;
/// Largest `attributes`, protobuf-encoded, in bytes.
pub const MAX_ATTRIBUTES_BYTES: usize = 64 * 1024;
/// Highest source version: versions are stored as signed 64-bit integers in both databases.
pub const MAX_VERSION: u64 = i64::MAX as u64;
/// Most items in one BulkUpdateProducts, BatchGetProducts, ImportProducts or
/// PublishProductChanges message: one request is one transaction, and a thousand rows keep it
/// short (tens of milliseconds) while amortising the round trip.
pub const MAX_ITEMS_PER_REQUEST: usize = 1_000;
