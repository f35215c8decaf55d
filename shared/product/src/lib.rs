//! The product model shared by `product-catalog`, which stores products, and `sync-relay`, which
//! validates and orders product changes before they reach the catalog. Both must agree on what
//! a valid product is, so the rules live here once.
//!
//! # Layout
//! - [`limits`]: every size limit of a product and of a request, with the reason for it.
//! - [`types`]: [`ProductTypes`], the configured registry of product types and the attributes
//!   each one allows.
//! - [`mask`]: [`UpdateMask`], which fields a partial update writes, and how it applies.
//! - [`validate`]: [`validate_product`], every rule of `mall.catalog.v1.Product` on input.
//! - [`language`] and [`currency`]: BCP 47 language tags and ISO 4217 currency codes.
//! - [`attributes`]: `google.protobuf.Struct` to and from JSON, for storage.

pub mod attributes;
pub mod currency;
pub mod language;
pub mod limits;
pub mod mask;
pub mod types;
pub mod validate;

pub use mask::{FieldVersions, UpdateMask};
pub use types::{AttributeType, ProductTypeSpec, ProductTypes};
pub use validate::validate_product;
