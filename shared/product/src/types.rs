//! The registry of product types: which types exist and which attributes each one allows.
//!
//! It is configuration, not code: a new type (or attribute) is a settings change in
//! `product-catalog` and `sync-relay`, which must be given the same registry. Settings are
//! merged over the default set below: a configured type is added (or, with a default's
//! name, gets the configured attributes added to its own).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The type of an attribute value in `Product.attributes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AttributeType {
    /// A JSON string.
    String,
    /// A JSON number without a fractional part, within ±2^53 (exact in a double).
    Integer,
    /// Any finite JSON number.
    Number,
    /// `true` or `false`.
    Boolean,
    /// A list of strings (sizes, colours, materials).
    StringList,
}

impl AttributeType {
    /// How the type is written in settings and error messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::String => "string",
            Self::Integer => "integer",
            Self::Number => "number",
            Self::Boolean => "boolean",
            Self::StringList => "string_list",
        }
    }
}

/// One registered product type.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProductTypeSpec {
    /// Allowed attribute keys and the type of each value. Any other key is refused.
    pub attributes: BTreeMap<String, AttributeType>,
}

/// The registered product types by name (`apparel`, `shoes`, ...).
///
/// Default: apparel, shoes, bags, accessories, golf, outdoor, kids and living, each with the
/// attributes the mall's product team sends for it (see [`ProductTypes::default`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(transparent)]
pub struct ProductTypes(BTreeMap<String, ProductTypeSpec>);

impl ProductTypes {
    /// A registry of exactly these types.
    pub fn new(types: BTreeMap<String, ProductTypeSpec>) -> Self {
        Self(types)
    }

    /// The type named `name`, if registered.
    pub fn get(&self, name: &str) -> Option<&ProductTypeSpec> {
        self.0.get(name)
    }

    /// Whether `name` is registered.
    pub fn contains(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }

    /// The registered names, sorted, for error messages.
    pub fn names(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }

    /// Checks the registry itself, so a typo in settings stops start-up instead of refusing
    /// every product of a type later.
    ///
    /// # Errors
    /// Names the first type or attribute key that is empty, too long or not lowercase
    /// `[a-z0-9_]`.
    pub fn check(&self) -> Result<(), String> {
        if self.0.is_empty() {
            return Err("product_types must register at least one product type".into());
        }
        for (name, spec) in &self.0 {
            if !is_identifier(name) {
                return Err(format!(
                    "product type {name:?} must be 1-64 characters of a-z, 0-9 and _"
                ));
            }
            for key in spec.attributes.keys() {
                if !is_identifier(key) {
                    return Err(format!(
                        "attribute {key:?} of product type {name:?} must be 1-64 characters of \
                         a-z, 0-9 and _"
                    ));
                }
            }
        }
        Ok(())
    }
}

fn is_identifier(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

impl Default for ProductTypes {
    fn default() -> Self {
        use AttributeType::{Boolean, Integer, Number, String, StringList};
        let common = [
            ("colors", StringList),
            ("materials", StringList),
            ("origin_country", String),
            ("season", String),
        ];
        let types: [(&str, &[(&str, AttributeType)]); 8] = [
            (
                "apparel",
                &[("sizes", StringList), ("fit", String), ("gender", String)],
            ),
            (
                "shoes",
                &[
                    ("sizes", StringList),
                    ("width", String),
                    ("heel_height_mm", Integer),
                    ("gender", String),
                ],
            ),
            (
                "bags",
                &[
                    ("width_mm", Integer),
                    ("height_mm", Integer),
                    ("depth_mm", Integer),
                    ("strap", String),
                ],
            ),
            ("accessories", &[("sizes", StringList), ("gender", String)]),
            (
                "golf",
                &[
                    ("club_type", String),
                    ("loft_degrees", Number),
                    ("shaft_flex", String),
                    ("left_handed", Boolean),
                    ("sizes", StringList),
                ],
            ),
            (
                "outdoor",
                &[
                    ("sizes", StringList),
                    ("waterproof", Boolean),
                    ("weight_g", Integer),
                ],
            ),
            (
                "kids",
                &[
                    ("sizes", StringList),
                    ("age_months_min", Integer),
                    ("age_months_max", Integer),
                ],
            ),
            (
                "living",
                &[
                    ("width_mm", Integer),
                    ("height_mm", Integer),
                    ("depth_mm", Integer),
                    ("weight_g", Integer),
                ],
            ),
        ];
        Self(
            types
                .into_iter()
                .map(|(name, own)| {
                    let attributes = common
                        .iter()
                        .chain(own.iter())
                        .map(|(key, ty)| ((*key).to_owned(), *ty))
                        .collect();
                    (name.to_owned(), ProductTypeSpec { attributes })
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_registry_is_valid_and_has_the_malls_types() {
        let types = ProductTypes::default();
        types.check().expect("defaults are valid");
        assert_eq!(
            types.names(),
            [
                "accessories",
                "apparel",
                "bags",
                "golf",
                "kids",
                "living",
                "outdoor",
                "shoes"
            ]
        );
        assert_eq!(
            types
                .get("golf")
                .and_then(|t| t.attributes.get("loft_degrees")),
            Some(&AttributeType::Number)
        );
    }

    #[test]
    fn a_registry_is_read_from_settings() {
        #[derive(Deserialize, Serialize)]
        struct Settings {
            product_types: ProductTypes,
        }
        impl Default for Settings {
            fn default() -> Self {
                Self {
                    product_types: ProductTypes::new(BTreeMap::new()),
                }
            }
        }
        let settings: Settings = mall_config::load_from(
            "TEST",
            mall_config::Sources {
                file: None,
                env: vec![(
                    "TEST__PRODUCT_TYPES__BEAUTY__ATTRIBUTES__SHADE".into(),
                    "string".into(),
                )],
            },
        )
        .expect("loads");
        assert_eq!(settings.product_types.names(), ["beauty"]);
        settings.product_types.check().expect("valid");
    }

    #[test]
    fn a_malformed_type_name_is_refused_naming_it() {
        let types = ProductTypes::new(BTreeMap::from([(
            "Beauty Care".to_owned(),
            ProductTypeSpec::default(),
        )]));
        assert!(types.check().expect_err("refused").contains("Beauty Care"));
    }
}
