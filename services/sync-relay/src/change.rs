//! One product change as the relay receives it: decoded from a record's bytes (protobuf, or
//! JSON for producers that send JSON), checked against the same rules the catalog applies,
//! and assigned its lane.
//!
//! Pure functions: the quarantine, the queue and the catalog are elsewhere.

use std::sync::LazyLock;

use mall_grpc::Violations;
use mall_product::{ProductTypes, UpdateMask, limits::MAX_VERSION, validate};
use mall_proto::sync::v1::ProductChange;
use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor};

/// Longest `trace_context.tracestate` (the W3C limit is 512 characters).
pub const MAX_TRACESTATE_CHARS: usize = 512;

/// The descriptor of `mall.sync.v1.ProductChange`, for the proto3 JSON mapping.
static PRODUCT_CHANGE: LazyLock<MessageDescriptor> = LazyLock::new(|| {
    DescriptorPool::decode(mall_proto::FILE_DESCRIPTOR_SET)
        .expect("the compiled descriptor set decodes")
        .get_message_by_name("mall.sync.v1.ProductChange")
        .expect("mall.sync.v1.ProductChange is in the descriptor set")
});

/// Decodes a record: the protobuf encoding of `ProductChange`, or its proto3 JSON form (a
/// record whose first non-blank byte is `{`).
///
/// # Errors
/// Why the bytes are neither, for the quarantine.
pub fn decode(data: &[u8]) -> Result<ProductChange, String> {
    let first = data.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'{') {
        let mut json = serde_json::Deserializer::from_slice(data);
        let message = DynamicMessage::deserialize(PRODUCT_CHANGE.clone(), &mut json)
            .map_err(|e| format!("record is not a valid JSON ProductChange: {e}"))?;
        json.end()
            .map_err(|e| format!("record has trailing data after the JSON ProductChange: {e}"))?;
        message
            .transcode_to()
            .map_err(|e| format!("record is not a valid JSON ProductChange: {e}"))
    } else {
        ProductChange::decode(data)
            .map_err(|e| format!("record is not a protobuf ProductChange: {e}"))
    }
}

/// Checks `change` against the catalog's rules and its envelope against its product, and
/// puts its language keys in canonical case.
///
/// # Errors
/// Every problem, as `field: description` joined by `; `, for the quarantine.
pub fn validate(change: &mut ProductChange, types: &ProductTypes) -> Result<(), String> {
    let mut violations = Violations::default();
    if let Err(problem) = validate::check_code(&change.product_code) {
        violations.add("product_code", problem);
    }
    if !types.contains(&change.product_type) {
        violations.add(
            "product_type",
            format!(
                "{:?} is not a registered product type; registered: {}",
                change.product_type,
                types.names().join(", ")
            ),
        );
    }
    if change.version == 0 || change.version > MAX_VERSION {
        violations.add("version", format!("must be 1 to {MAX_VERSION}"));
    }
    let mask = match UpdateMask::from_field_mask(change.update_mask.as_ref()) {
        Ok(mask) => mask,
        Err(unknown) => {
            for (i, path) in unknown {
                violations.add(
                    format!("update_mask.paths[{i}]"),
                    format!("{path:?} is not a writable product field"),
                );
            }
            UpdateMask::full()
        }
    };
    if let Some(trace) = &change.trace_context
        && trace.tracestate.chars().count() > MAX_TRACESTATE_CHARS
    {
        violations.add(
            "trace_context.tracestate",
            format!("must be at most {MAX_TRACESTATE_CHARS} characters"),
        );
    }
    match &change.product {
        None => violations.add("product", "must be set"),
        Some(product) => {
            if product.code != change.product_code {
                violations.add("product.code", "must equal product_code");
            }
            if product.product_type != change.product_type {
                violations.add("product.product_type", "must equal product_type");
            }
            if product.version != change.version {
                violations.add("product.version", "must equal version");
            }
            mall_product::validate_product(product, mask, types, "product", &mut violations);
        }
    }
    if violations.is_empty() {
        if let Some(product) = change.product.as_mut() {
            validate::normalize(product);
            product.create_time = None;
            product.update_time = None;
        }
        return Ok(());
    }
    Err(violations
        .into_vec()
        .into_iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; "))
}

/// The lane of a product: FNV-1a (64 bit) of its code, modulo the lane count. Stable across
/// processes, versions and platforms, so every replica sends a product to the same lane.
pub fn lane_of(product_code: &str, lanes: u32) -> u32 {
    let hash = crate::rollup::fnv64(product_code.as_bytes());
    u32::try_from(hash % u64::from(lanes.max(1))).expect("a remainder of a u32 fits a u32")
}

/// The FIFO group id of a lane.
pub fn lane_group(lane: u32) -> String {
    format!("lane-{lane:04}")
}

/// The lane of a FIFO group id made by [`lane_group`].
pub fn group_lane(group: &str) -> Option<u32> {
    group.strip_prefix("lane-")?.parse().ok()
}

#[cfg(test)]
mod tests {
    use mall_proto::catalog::v1::{Product, ProductStatus};
    use prost_types::FieldMask;

    use super::*;

    fn change(code: &str, version: u64) -> ProductChange {
        ProductChange {
            product_code: code.into(),
            product_type: "golf".into(),
            version,
            product: Some(Product {
                code: code.into(),
                product_type: "golf".into(),
                status: ProductStatus::OnSale as i32,
                names: [("zh-cn".to_owned(), "球杆".to_owned())].into(),
                prices: [("KRW".to_owned(), 390_000)].into(),
                version,
                ..Product::default()
            }),
            ..ProductChange::default()
        }
    }

    #[test]
    fn protobuf_and_json_records_decode_to_the_same_change() {
        let expected = change("GF-1", 3);
        assert_eq!(decode(&expected.encode_to_vec()), Ok(expected.clone()));
        let json = r#" {"productCode":"GF-1","productType":"golf","version":"3",
            "product":{"code":"GF-1","productType":"golf","status":"PRODUCT_STATUS_ON_SALE",
            "names":{"zh-cn":"球杆"},"prices":{"KRW":"390000"},"version":"3"}}"#;
        assert_eq!(decode(json.as_bytes()), Ok(expected));
        let snake = br#"{"product_code":"GF-1","update_mask":"prices,names"}"#;
        let decoded = decode(snake).expect("original field names are accepted too");
        assert_eq!(
            decoded.update_mask,
            Some(FieldMask {
                paths: vec!["prices".into(), "names".into()]
            })
        );
    }

    #[test]
    fn undecodable_records_say_why() {
        assert!(
            decode(b"{\"productCode\": 7}")
                .expect_err("json")
                .contains("JSON")
        );
        assert!(
            decode(&[0xff, 0xff, 0xff])
                .expect_err("binary")
                .contains("protobuf")
        );
        assert!(decode(b"{} trailing").is_err());
    }

    #[test]
    fn a_valid_change_passes_with_canonical_language_keys() {
        let mut valid = change("GF-1", 3);
        validate(&mut valid, &ProductTypes::default()).expect("valid");
        let names = &valid.product.as_ref().expect("set").names;
        assert!(names.contains_key("zh-CN"));
    }

    #[test]
    fn envelope_and_product_problems_are_all_named() {
        let mut bad = change("GF-1", 3);
        bad.version = 4;
        bad.product_type = "spaceships".into();
        bad.update_mask = Some(FieldMask {
            paths: vec!["code".into()],
        });
        let reason = validate(&mut bad, &ProductTypes::default()).expect_err("invalid");
        for field in [
            "product_type:",
            "update_mask.paths[0]",
            "product.product_type",
            "product.version",
        ] {
            assert!(reason.contains(field), "{field} in {reason}");
        }
        let mut empty = ProductChange::default();
        let reason = validate(&mut empty, &ProductTypes::default()).expect_err("invalid");
        assert!(reason.contains("product: must be set"), "{reason}");
    }

    #[test]
    fn lanes_are_stable_and_spread() {
        assert_eq!(lane_of("GF-1", 16), lane_of("GF-1", 16));
        let used: std::collections::BTreeSet<u32> =
            (0..1000).map(|i| lane_of(&format!("P-{i}"), 16)).collect();
        assert_eq!(used.len(), 16);
        assert_eq!(group_lane(&lane_group(7)), Some(7));
        assert_eq!(group_lane("other"), None);
        // The value is part of the contract between replicas: pin it.
        assert_eq!(lane_of("GF-1", 1_000_000), lane_of("GF-1", 1_000_000));
    }
}
