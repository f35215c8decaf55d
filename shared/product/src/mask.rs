//! Update masks: which fields of a product a write replaces, and the per-field version guard.
//!
//! A mask is a set of the seven writable fields. An empty `google.protobuf.FieldMask` means a
//! full replacement, which is the mask with every field. Each field is replaced whole: a map
//! in the mask replaces the stored map, it is not merged key by key.
//!
//! Every stored field keeps the version of the change that last wrote it ([`FieldVersions`]).
//! A change writes each field of its mask whose stored version is older than its own
//! ([`UpdateMask::apply_newer`]). Applying changes therefore commutes: any order, any
//! batching and any duplicates end in the state of applying them in version order, because
//! each field ends with the value of the newest change that carries it.

use mall_proto::catalog::v1::Product;
use prost_types::FieldMask;

/// The writable fields, as written in `update_mask.paths`.
pub const PATHS: [&str; 7] = [
    "brand",
    "category_path",
    "status",
    "names",
    "descriptions",
    "prices",
    "attributes",
];

/// The set of fields a write replaces. `code`, `product_type` and `version` are not in it:
/// they are part of every write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UpdateMask {
    bits: u8,
}

const FULL: u8 = (1 << PATHS.len()) - 1;

impl UpdateMask {
    /// Every field: a full replacement.
    pub const fn full() -> Self {
        Self { bits: FULL }
    }

    /// Reads a request's mask; an absent or empty one is a full replacement.
    ///
    /// # Errors
    /// The index and text of every path that is not one of [`PATHS`].
    pub fn from_field_mask(mask: Option<&FieldMask>) -> Result<Self, Vec<(usize, String)>> {
        let paths = mask.map(|m| m.paths.as_slice()).unwrap_or_default();
        if paths.is_empty() {
            return Ok(Self::full());
        }
        let mut bits = 0;
        let mut unknown = Vec::new();
        for (i, path) in paths.iter().enumerate() {
            match PATHS.iter().position(|p| p == path) {
                Some(bit) => bits |= 1 << bit,
                None => unknown.push((i, path.clone())),
            }
        }
        if unknown.is_empty() {
            Ok(Self { bits })
        } else {
            Err(unknown)
        }
    }

    /// The mask as a `FieldMask`: empty for a full replacement, as the API writes it.
    pub fn to_field_mask(self) -> Option<FieldMask> {
        if self.is_full() {
            return None;
        }
        Some(self.to_listed_field_mask())
    }

    /// The mask as a `FieldMask` that lists every field, a full one included: how records
    /// of what was written show it.
    pub fn to_listed_field_mask(self) -> FieldMask {
        FieldMask {
            paths: self.fields().map(|bit| PATHS[bit].to_owned()).collect(),
        }
    }

    /// Whether this is a full replacement.
    pub fn is_full(self) -> bool {
        self.bits == FULL
    }

    /// Whether every field of `other` is also in `self`: a write with `self` then makes a
    /// write with `other` before it invisible.
    pub fn covers(self, other: Self) -> bool {
        self.bits & other.bits == other.bits
    }

    /// The fields of both masks.
    #[must_use]
    pub fn union(self, other: Self) -> Self {
        Self {
            bits: self.bits | other.bits,
        }
    }

    /// Whether the field at `path` (one of [`PATHS`]) is in the mask.
    pub fn contains(self, path: &str) -> bool {
        PATHS
            .iter()
            .position(|p| *p == path)
            .is_some_and(|bit| self.bits & (1 << bit) != 0)
    }

    /// Whether `status` is in the mask.
    pub fn has_status(self) -> bool {
        self.contains("status")
    }

    /// Whether no field is in the mask.
    pub fn is_empty(self) -> bool {
        self.bits == 0
    }

    /// The mask as bits, bit `i` for `PATHS[i]`: how the change log stores it.
    pub fn bits(self) -> u8 {
        self.bits
    }

    /// The mask of `bits` (bit `i` for `PATHS[i]`); bits past the seventh are ignored.
    pub fn from_bits(bits: u8) -> Self {
        Self { bits: bits & FULL }
    }

    /// Copies the masked fields of `update`, and its version, onto `base`, whatever their
    /// stored versions. `code`, `product_type` and the timestamps of `base` are kept.
    pub fn apply(self, base: &mut Product, update: &Product) {
        for bit in self.fields() {
            copy_field(bit, base, update);
        }
        base.version = update.version;
    }

    /// Writes each field of the mask whose version in `versions` is older than
    /// `update.version`, records the new versions, and sets `base.version` to the highest
    /// field version. Returns the fields written (empty: the change is stale everywhere).
    pub fn apply_newer(
        self,
        base: &mut Product,
        versions: &mut FieldVersions,
        update: &Product,
    ) -> UpdateMask {
        let written = self.newer(versions, update.version);
        for bit in written.fields() {
            copy_field(bit, base, update);
        }
        base.version = versions.max();
        written
    }

    /// [`UpdateMask::apply_newer`] without copying: the written fields' values are swapped
    /// between `base` and `update`, so `update` is left holding what `base` had.
    /// [`UpdateMask::swap_fields`] with the returned mask puts both back. For a caller that
    /// owns its updates and needs them again only when the write is undone: no value is
    /// allocated, copied or dropped.
    pub fn apply_newer_swapping(
        self,
        base: &mut Product,
        versions: &mut FieldVersions,
        update: &mut Product,
    ) -> UpdateMask {
        let written = self.newer(versions, update.version);
        written.swap_fields(base, update);
        base.version = versions.max();
        written
    }

    /// Swaps the values of the mask's fields between `a` and `b`.
    pub fn swap_fields(self, a: &mut Product, b: &mut Product) {
        for bit in self.fields() {
            match bit {
                BRAND => std::mem::swap(&mut a.brand, &mut b.brand),
                CATEGORY_PATH => std::mem::swap(&mut a.category_path, &mut b.category_path),
                STATUS => std::mem::swap(&mut a.status, &mut b.status),
                NAMES => std::mem::swap(&mut a.names, &mut b.names),
                DESCRIPTIONS => std::mem::swap(&mut a.descriptions, &mut b.descriptions),
                PRICES => std::mem::swap(&mut a.prices, &mut b.prices),
                ATTRIBUTES => std::mem::swap(&mut a.attributes, &mut b.attributes),
                other => unreachable!("bit {other} is not a writable field"),
            }
        }
    }

    /// The fields of the mask whose version in `versions` is older than `version`, now
    /// recorded at `version`.
    fn newer(self, versions: &mut FieldVersions, version: u64) -> Self {
        let mut written = 0;
        for bit in self.fields() {
            if versions.0[bit] < version {
                versions.0[bit] = version;
                written |= 1 << bit;
            }
        }
        Self { bits: written }
    }

    /// Indexes into [`PATHS`] of the fields in the mask.
    fn fields(self) -> impl Iterator<Item = usize> {
        (0..PATHS.len()).filter(move |bit| self.bits & (1 << bit) != 0)
    }
}

/// Copies field `PATHS[bit]` of `from` onto `to`.
fn copy_field(bit: usize, to: &mut Product, from: &Product) {
    match bit {
        BRAND => to.brand.clone_from(&from.brand),
        CATEGORY_PATH => to.category_path.clone_from(&from.category_path),
        STATUS => to.status = from.status,
        NAMES => to.names.clone_from(&from.names),
        DESCRIPTIONS => to.descriptions.clone_from(&from.descriptions),
        PRICES => to.prices.clone_from(&from.prices),
        ATTRIBUTES => to.attributes.clone_from(&from.attributes),
        other => unreachable!("bit {other} is not a writable field"),
    }
}

/// The version of the change that last wrote each writable field, in [`PATHS`] order; 0 for
/// a field never written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FieldVersions(pub [u64; PATHS.len()]);

impl FieldVersions {
    /// Every field at `version`: a product written whole by one change.
    pub const fn all(version: u64) -> Self {
        Self([version; PATHS.len()])
    }

    /// The highest field version: the product's `version`.
    pub fn max(&self) -> u64 {
        self.0.iter().copied().max().unwrap_or_default()
    }

    /// The fields written at least once.
    pub fn written(&self) -> UpdateMask {
        let mut bits = 0;
        for (bit, version) in self.0.iter().enumerate() {
            if *version > 0 {
                bits |= 1 << bit;
            }
        }
        UpdateMask { bits }
    }

    /// The version of `status`: 0 while no change has set it, which keeps a product pending.
    pub fn status(&self) -> u64 {
        self.0[STATUS]
    }
}

// Indexes into [`PATHS`]; a test checks each against its name.
const BRAND: usize = 0;
const CATEGORY_PATH: usize = 1;
const STATUS: usize = 2;
const NAMES: usize = 3;
const DESCRIPTIONS: usize = 4;
const PRICES: usize = 5;
const ATTRIBUTES: usize = 6;

#[cfg(test)]
mod tests {
    use super::*;

    fn mask(paths: &[&str]) -> Result<UpdateMask, Vec<(usize, String)>> {
        UpdateMask::from_field_mask(Some(&FieldMask {
            paths: paths.iter().map(|p| (*p).to_owned()).collect(),
        }))
    }

    #[test]
    fn an_empty_mask_is_a_full_replacement() {
        assert!(UpdateMask::from_field_mask(None).expect("valid").is_full());
        assert!(mask(&[]).expect("valid").is_full());
        assert_eq!(UpdateMask::full().to_field_mask(), None);
    }

    #[test]
    fn unknown_paths_are_reported_by_index() {
        assert_eq!(
            mask(&["prices", "code", "names.ko"]).expect_err("invalid"),
            vec![(1, "code".to_owned()), (2, "names.ko".to_owned())]
        );
    }

    #[test]
    fn apply_replaces_only_masked_fields_and_whole_maps() {
        let mut base = Product {
            code: "P1".into(),
            brand: "Old".into(),
            names: [
                ("ko".to_owned(), "옛".to_owned()),
                ("en".into(), "old".into()),
            ]
            .into(),
            prices: [("KRW".to_owned(), 1000)].into(),
            version: 1,
            ..Product::default()
        };
        let update = Product {
            code: "P1".into(),
            brand: "Ignored".into(),
            names: [("en".to_owned(), "new".to_owned())].into(),
            version: 2,
            ..Product::default()
        };
        mask(&["names"]).expect("valid").apply(&mut base, &update);
        assert_eq!(base.brand, "Old");
        assert_eq!(base.names, [("en".to_owned(), "new".to_owned())].into());
        assert_eq!(base.prices.get("KRW"), Some(&1000));
        assert_eq!(base.version, 2);
    }

    /// A product at version 7 with a brand and a price.
    fn stored_at_7() -> Product {
        Product {
            code: "P1".into(),
            brand: "B7".into(),
            prices: [("KRW".to_owned(), 7)].into(),
            version: 7,
            ..Product::default()
        }
    }

    /// A late change (version 5) of brand, names and prices.
    fn late_5() -> Product {
        Product {
            code: "P1".into(),
            brand: "B5".into(),
            names: [("en".to_owned(), "five".to_owned())].into(),
            prices: [("KRW".to_owned(), 5)].into(),
            version: 5,
            ..Product::default()
        }
    }

    #[test]
    fn apply_newer_writes_only_fields_older_than_the_change() {
        let mut base = stored_at_7();
        let mut versions = FieldVersions::all(3);
        versions.0[BRAND] = 7;
        versions.0[PRICES] = 7;
        let late = late_5();
        let written = mask(&["brand", "names", "prices"])
            .expect("valid")
            .apply_newer(&mut base, &mut versions, &late);
        assert_eq!(written, mask(&["names"]).expect("valid"));
        assert_eq!(base.brand, "B7");
        assert_eq!(base.prices.get("KRW"), Some(&7));
        assert_eq!(base.names.get("en").map(String::as_str), Some("five"));
        assert_eq!(versions.0[3], 5);
        assert_eq!(
            base.version, 7,
            "the product's version is its newest field's"
        );

        let again = mask(&["names"])
            .expect("valid")
            .apply_newer(&mut base, &mut versions, &late);
        assert!(again.is_empty(), "a repeated change writes nothing");
    }

    #[test]
    fn swapping_writes_what_copying_writes_and_swapping_back_undoes_it() {
        let stored = stored_at_7();
        let mut versions = FieldVersions::all(3);
        versions.0[BRAND] = 7;
        let update = Product {
            status: 1,
            ..late_5()
        };
        let m = mask(&["brand", "names", "prices", "status"]).expect("valid");
        let (mut copied, mut copied_versions) = (stored.clone(), versions);
        let by_copy = m.apply_newer(&mut copied, &mut copied_versions, &update);

        let (mut swapped, mut swapped_versions) = (stored.clone(), versions);
        let mut moved = update.clone();
        let by_swap = m.apply_newer_swapping(&mut swapped, &mut swapped_versions, &mut moved);
        assert_eq!(
            (by_swap, &swapped, swapped_versions),
            (by_copy, &copied, copied_versions)
        );
        assert_eq!(
            moved.brand, "B5",
            "a field not written stays with the update"
        );
        assert!(
            moved.names.is_empty(),
            "the update holds what the product had"
        );

        by_swap.swap_fields(&mut swapped, &mut moved);
        assert_eq!(
            moved, update,
            "swapping back gives the update its values again"
        );
    }

    #[test]
    fn bits_round_trip_and_status_index_is_right() {
        let m = mask(&["status", "prices"]).expect("valid");
        assert_eq!(UpdateMask::from_bits(m.bits()), m);
        assert_eq!(
            [
                BRAND,
                CATEGORY_PATH,
                STATUS,
                NAMES,
                DESCRIPTIONS,
                PRICES,
                ATTRIBUTES
            ]
            .map(|bit| PATHS[bit]),
            PATHS
        );
        let mut versions = FieldVersions::default();
        assert_eq!(versions.status(), 0);
        versions.0[STATUS] = 4;
        assert_eq!(versions.status(), 4);
        assert_eq!(versions.written(), mask(&["status"]).expect("valid"));
    }

    #[test]
    fn a_mask_covers_its_subsets() {
        let both = mask(&["prices", "names"]).expect("valid");
        let prices = mask(&["prices"]).expect("valid");
        assert!(both.covers(prices));
        assert!(!prices.covers(both));
        assert!(UpdateMask::full().covers(both));
        assert_eq!(
            both.to_field_mask().expect("partial").paths,
            ["names", "prices"]
        );
    }
}
