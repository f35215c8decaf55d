//! Every rule of `mall.catalog.v1.Product` on input, collected as field violations so a caller
//! learns all problems of a request at once.

use std::{borrow::Cow, collections::BTreeMap};

use mall_grpc::Violations;
use mall_proto::catalog::v1::{Product, ProductStatus};
use prost::Message as _;
use prost_types::value::Kind;

use crate::{
    AttributeType, ProductTypes, UpdateMask, currency, language,
    limits::{
        MAX_ATTRIBUTES_BYTES, MAX_BRAND_CHARS, MAX_CATEGORY_CHARS, MAX_CATEGORY_LEVELS,
        MAX_CODE_CHARS, MAX_CURRENCIES, MAX_DESCRIPTION_CHARS, MAX_LANGUAGES, MAX_NAME_CHARS,
        MAX_VERSION,
    },
};

/// Checks a product code: 1 to 64 characters of `[A-Za-z0-9._-]`.
///
/// # Errors
/// What is wrong, in lowercase words.
pub fn check_code(code: &str) -> Result<(), String> {
    if code.is_empty() {
        return Err("must not be empty".into());
    }
    if code.len() > MAX_CODE_CHARS {
        return Err(format!("must be at most {MAX_CODE_CHARS} characters"));
    }
    if !code
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err("may only contain A-Z, a-z, 0-9, '.', '_' and '-'".into());
    }
    Ok(())
}

/// Checks `product` as the input of a write with `mask`, recording each problem under
/// `field` (such as `updates[3].product`).
///
/// `code`, `product_type` and `version` are always checked; the other fields only when the
/// mask writes them, since unmasked fields are ignored. A write that is not a full replacement
/// and writes `status` must set it, as must a full replacement.
pub fn validate_product(
    product: &Product,
    mask: UpdateMask,
    types: &ProductTypes,
    field: &str,
    violations: &mut Violations,
) {
    if let Err(problem) = check_code(&product.code) {
        violations.add(format!("{field}.code"), problem);
    }
    let spec = if product.product_type.is_empty() {
        violations.add(format!("{field}.product_type"), "must not be empty");
        None
    } else {
        let spec = types.get(&product.product_type);
        if spec.is_none() {
            violations.add(
                format!("{field}.product_type"),
                format!(
                    "{:?} is not a registered product type; registered: {}",
                    product.product_type,
                    types.names().join(", ")
                ),
            );
        }
        spec
    };
    if product.version == 0 {
        violations.add(format!("{field}.version"), "must be at least 1");
    } else if product.version > MAX_VERSION {
        violations.add(
            format!("{field}.version"),
            format!("must be at most {MAX_VERSION}"),
        );
    }

    if mask.contains("brand") && product.brand.chars().count() > MAX_BRAND_CHARS {
        violations.add(
            format!("{field}.brand"),
            format!("must be at most {MAX_BRAND_CHARS} characters"),
        );
    }
    if mask.contains("category_path") {
        check_category_path(&product.category_path, field, violations);
    }
    if mask.has_status() {
        match ProductStatus::try_from(product.status) {
            Ok(ProductStatus::Unspecified) => violations.add(
                format!("{field}.status"),
                "must be set (PRODUCT_STATUS_ON_SALE, _SOLD_OUT, _HIDDEN or _DISCONTINUED)",
            ),
            Ok(_) => {}
            Err(_) => violations.add(
                format!("{field}.status"),
                format!("{} is not a ProductStatus value", product.status),
            ),
        }
    }
    if mask.contains("names") {
        check_texts(
            &product.names,
            TextRule {
                min_chars: 1,
                max_chars: MAX_NAME_CHARS,
            },
            field,
            "names",
            violations,
        );
    }
    if mask.contains("descriptions") {
        check_texts(
            &product.descriptions,
            TextRule {
                min_chars: 0,
                max_chars: MAX_DESCRIPTION_CHARS,
            },
            field,
            "descriptions",
            violations,
        );
    }
    if mask.contains("prices") {
        check_prices(&product.prices, field, violations);
    }
    if mask.contains("attributes")
        && let (Some(attributes), Some(spec)) = (&product.attributes, spec)
    {
        let size = attributes.encoded_len();
        if size > MAX_ATTRIBUTES_BYTES {
            violations.add(
                format!("{field}.attributes"),
                format!("is {size} bytes encoded; at most {MAX_ATTRIBUTES_BYTES} are allowed"),
            );
        }
        for (key, value) in &attributes.fields {
            // Formatted only for a violation: this runs for every attribute of every write.
            let path = || format!("{field}.attributes[{key:?}]");
            match spec.attributes.get(key) {
                None => violations.add(
                    path(),
                    format!(
                        "is not an attribute of product type {:?}; allowed: {}",
                        product.product_type,
                        spec.attributes
                            .keys()
                            .map(String::as_str)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ),
                Some(expected) => {
                    if !matches_type(value.kind.as_ref(), *expected) {
                        violations.add(path(), format!("must be a {}", expected.name()));
                    }
                }
            }
        }
    }
}

/// Rewrites the language keys of `names` and `descriptions` in their canonical case
/// (`zh-cn` to `zh-CN`). Call after [`validate_product`] passed.
pub fn normalize(product: &mut Product) {
    for map in [&mut product.names, &mut product.descriptions] {
        if map
            .keys()
            .any(|k| matches!(language::canonicalize(k), Ok(Cow::Owned(_))))
        {
            *map = std::mem::take(map)
                .into_iter()
                .map(|(k, v)| match language::canonicalize(&k) {
                    Ok(Cow::Owned(canonical)) => (canonical, v),
                    _ => (k, v),
                })
                .collect();
        }
    }
}

fn check_category_path(path: &[String], field: &str, violations: &mut Violations) {
    if path.len() > MAX_CATEGORY_LEVELS {
        violations.add(
            format!("{field}.category_path"),
            format!("has {} levels; at most {MAX_CATEGORY_LEVELS}", path.len()),
        );
    }
    for (i, segment) in path.iter().enumerate() {
        let chars = segment.chars().count();
        if chars == 0 || chars > MAX_CATEGORY_CHARS {
            violations.add(
                format!("{field}.category_path[{i}]"),
                format!("must be 1 to {MAX_CATEGORY_CHARS} characters"),
            );
        }
    }
}

struct TextRule {
    min_chars: usize,
    max_chars: usize,
}

/// Checks the texts of `{field}.{name}`.
fn check_texts(
    texts: &BTreeMap<String, String>,
    rule: TextRule,
    field: &str,
    name: &str,
    violations: &mut Violations,
) {
    if texts.len() > MAX_LANGUAGES {
        violations.add(
            format!("{field}.{name}"),
            format!("has {} languages; at most {MAX_LANGUAGES}", texts.len()),
        );
    }
    let mut seen = BTreeMap::new();
    for (tag, text) in texts {
        // Formatted only for a violation: this runs for every text of every write.
        let path = || format!("{field}.{name}[{tag:?}]");
        match language::canonicalize(tag) {
            Err(problem) => violations.add(path(), problem),
            Ok(canonical) => {
                if let Some(other) = seen.insert(canonical.clone(), tag) {
                    violations.add(
                        path(),
                        format!("is the same language as {other:?} ({canonical})"),
                    );
                }
            }
        }
        let chars = text.chars().count();
        if chars < rule.min_chars || chars > rule.max_chars {
            violations.add(
                path(),
                format!(
                    "must be {} to {} characters",
                    rule.min_chars, rule.max_chars
                ),
            );
        }
    }
}

fn check_prices(prices: &BTreeMap<String, i64>, field: &str, violations: &mut Violations) {
    if prices.len() > MAX_CURRENCIES {
        violations.add(
            format!("{field}.prices"),
            format!("has {} currencies; at most {MAX_CURRENCIES}", prices.len()),
        );
    }
    for (code, amount) in prices {
        // Formatted only for a violation: this runs for every price of every write.
        let path = || format!("{field}.prices[{code:?}]");
        if currency::minor_units(code).is_none() {
            violations.add(
                path(),
                format!("{code:?} is not an ISO 4217 currency code (upper case, like KRW)"),
            );
        }
        if *amount < 0 {
            violations.add(path(), "must not be negative");
        }
    }
}

fn matches_type(kind: Option<&Kind>, expected: AttributeType) -> bool {
    /// Integers beyond 2^53 are not exact in a double, so they are refused as integers.
    const MAX_EXACT: f64 = 9_007_199_254_740_992.0;
    match (expected, kind) {
        (AttributeType::String, Some(Kind::StringValue(_)))
        | (AttributeType::Boolean, Some(Kind::BoolValue(_))) => true,
        (AttributeType::Number, Some(Kind::NumberValue(n))) => n.is_finite(),
        (AttributeType::Integer, Some(Kind::NumberValue(n))) => {
            n.is_finite() && n.fract() == 0.0 && n.abs() <= MAX_EXACT
        }
        (AttributeType::StringList, Some(Kind::ListValue(list))) => list
            .values
            .iter()
            .all(|v| matches!(v.kind, Some(Kind::StringValue(_)))),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use mall_grpc::ServiceError;
    use prost_types::{ListValue, Struct, Value};

    use super::*;

    fn valid() -> Product {
        Product {
            code: "AP-1001".into(),
            product_type: "apparel".into(),
            brand: "Maison".into(),
            category_path: vec!["women".into(), "coats".into()],
            status: ProductStatus::OnSale as i32,
            names: [
                ("ko".to_owned(), "코트".to_owned()),
                ("en".into(), "Coat".into()),
            ]
            .into(),
            prices: [("KRW".to_owned(), 129_000), ("USD".into(), 9_900)].into(),
            attributes: Some(Struct {
                fields: [(
                    "sizes".to_owned(),
                    Value {
                        kind: Some(Kind::ListValue(ListValue {
                            values: vec![Value {
                                kind: Some(Kind::StringValue("M".into())),
                            }],
                        })),
                    },
                )]
                .into(),
            }),
            version: 3,
            ..Product::default()
        }
    }

    fn problems(product: &Product, mask: UpdateMask) -> Vec<String> {
        let mut violations = Violations::default();
        validate_product(
            product,
            mask,
            &ProductTypes::default(),
            "product",
            &mut violations,
        );
        match violations.into_result() {
            Ok(()) => Vec::new(),
            Err(ServiceError::InvalidArgument(list)) => list.into_iter().map(|v| v.field).collect(),
            Err(other) => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn a_complete_product_is_valid() {
        assert_eq!(problems(&valid(), UpdateMask::full()), Vec::<String>::new());
    }

    #[test]
    fn each_problem_is_reported_on_its_own_field() {
        let mut p = valid();
        p.code = "bad code!".into();
        p.version = 0;
        p.status = 0;
        p.names.insert("korean".into(), "x".into());
        p.names.insert("en-GB".into(), String::new());
        p.prices.insert("XYZ".into(), 1);
        p.prices.insert("EUR".into(), -1);
        p.category_path.push(String::new());
        let fields = problems(&p, UpdateMask::full());
        assert_eq!(
            fields,
            [
                "product.code",
                "product.version",
                "product.category_path[2]",
                "product.status",
                "product.names[\"en-GB\"]",
                "product.names[\"korean\"]",
                "product.prices[\"EUR\"]",
                "product.prices[\"XYZ\"]",
            ]
        );
    }

    #[test]
    fn unknown_type_and_undeclared_or_mistyped_attributes_are_refused() {
        let mut p = valid();
        let fields = p.attributes.as_mut().expect("set");
        fields.fields.insert(
            "club_type".into(),
            Value {
                kind: Some(Kind::StringValue("driver".into())),
            },
        );
        fields.fields.insert(
            "colors".into(),
            Value {
                kind: Some(Kind::StringValue("red".into())),
            },
        );
        assert_eq!(
            problems(&p, UpdateMask::full()),
            [
                "product.attributes[\"club_type\"]",
                "product.attributes[\"colors\"]"
            ]
        );
        p.product_type = "spaceships".into();
        assert_eq!(problems(&p, UpdateMask::full()), ["product.product_type"]);
    }

    #[test]
    fn fields_outside_a_partial_mask_are_not_checked() {
        let mut p = valid();
        p.status = 0;
        p.prices.insert("XYZ".into(), 1);
        let names_only = UpdateMask::from_field_mask(Some(&prost_types::FieldMask {
            paths: vec!["names".into()],
        }))
        .expect("valid mask");
        assert_eq!(problems(&p, names_only), Vec::<String>::new());
    }

    #[test]
    fn two_spellings_of_one_language_are_refused_and_keys_are_normalized() {
        let mut p = valid();
        p.names.insert("zh-cn".into(), "外套".into());
        assert_eq!(problems(&p, UpdateMask::full()), Vec::<String>::new());
        normalize(&mut p);
        assert!(p.names.contains_key("zh-CN"));
        p.names.insert("zh-cn".into(), "外套".into());
        assert_eq!(
            problems(&p, UpdateMask::full()),
            ["product.names[\"zh-cn\"]"]
        );
    }

    #[test]
    fn codes_follow_the_legacy_format() {
        assert!(check_code("AP-1001_x.2").is_ok());
        assert!(check_code("").is_err());
        assert!(check_code(&"x".repeat(65)).is_err());
        assert!(check_code("a/b").is_err());
    }
}
