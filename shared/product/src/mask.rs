//! Update masks: which fields of a product a write replaces.
//!
//! A mask is a set of the seven writable fields. An empty `google.protobuf.FieldMask` means a
//! full replacement, which is the mask with every field. Each field is replaced whole: a map
//! in the mask replaces the stored map, it is not merged key by key.

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
        Some(FieldMask {
            paths: PATHS
                .iter()
                .enumerate()
                .filter(|(bit, _)| self.bits & (1 << bit) != 0)
                .map(|(_, p)| (*p).to_owned())
                .collect(),
        })
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

    /// Whether `status` is in the mask: a partial update can create a product only then.
    pub fn has_status(self) -> bool {
        self.contains("status")
    }

    /// Copies the masked fields of `update`, and its version, onto `base`. `code`,
    /// `product_type` and the timestamps of `base` are kept.
    pub fn apply(self, base: &mut Product, update: &Product) {
        let has = |path| self.contains(path);
        if has("brand") {
            base.brand.clone_from(&update.brand);
        }
        if has("category_path") {
            base.category_path.clone_from(&update.category_path);
        }
        if has("status") {
            base.status = update.status;
        }
        if has("names") {
            base.names.clone_from(&update.names);
        }
        if has("descriptions") {
            base.descriptions.clone_from(&update.descriptions);
        }
        if has("prices") {
            base.prices.clone_from(&update.prices);
        }
        if has("attributes") {
            base.attributes.clone_from(&update.attributes);
        }
        base.version = update.version;
    }
}

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
