//! What the chaos tests publish: 50,000 valid changes of 5,000 products, each product's
//! versions in a shuffled order, products interleaved at random, and a few hundred malformed
//! records mixed in, every one of them distinct so the quarantine can be compared with them.
//!
//! Two thirds of the changes after a product's first are partial updates of a few fields
//! (several disjoint sets), and every field's value names the version that wrote it, so the
//! final state checks that each field holds the newest change that carried it, whatever
//! order the changes arrived in. A partial change that arrives before version 1 (the
//! creation) waits in the catalog as a pending product.

use std::collections::{BTreeMap, BTreeSet};

use mall_product::UpdateMask;
use mall_proto::{
    catalog::v1::{Product, ProductStatus},
    sync::v1::ProductChange,
};
use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage};
use prost_types::FieldMask;

/// Versions of each product: 1 to 10.
pub const VERSIONS: u64 = 10;

/// How big a workload is.
#[derive(Debug, Clone, Copy)]
pub struct Size {
    /// Products, each with versions 1 to [`VERSIONS`].
    pub products: usize,
    /// Malformed records mixed in.
    pub malformed: usize,
}

/// What the issue asks of a chaos run: 50,000 changes of 5,000 products, and a few hundred
/// malformed records.
pub const CHAOS: Size = Size {
    products: 5_000,
    malformed: 300,
};

/// Registered types the products are spread over (a product keeps its type).
const TYPES: [&str; 4] = ["shoes", "bags", "golf", "apparel"];

/// The code of product `index`.
pub fn code(index: usize) -> String {
    format!("CH-{index:05}")
}

/// The KRW price every change of `version` writes: the final price names the version that
/// wrote it.
pub fn price(version: u64) -> i64 {
    10_000 + i64::try_from(version).expect("small versions") * 100
}

/// The field sets partial changes write: disjoint ones, and overlapping ones.
const PARTIAL_MASKS: [&[&str]; 6] = [
    &["prices"],
    &["names"],
    &["brand", "category_path"],
    &["status", "prices"],
    &["descriptions"],
    &["status"],
];

/// How records reach the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// gRPC PublishProductChanges: decoded changes only; malformed means invalid.
    Grpc,
    /// Kinesis records: protobuf or proto3 JSON bytes; malformed also means undecodable
    /// bytes and JSON with errors.
    Kinesis,
}

/// One record as the producer sends it.
#[derive(Debug, Clone)]
pub struct Item {
    /// The Kinesis partition key: the product code (a made-up key when there is none).
    pub key: String,
    /// The change, for gRPC; its encoding (or any bytes) is what Kinesis carries.
    pub payload: Payload,
    /// Whether the relay must quarantine it.
    pub malformed: bool,
}

/// A record's content.
#[derive(Debug, Clone)]
pub enum Payload {
    /// A change sent as is (gRPC) or as its protobuf encoding (Kinesis).
    Change(Box<ProductChange>),
    /// Record bytes: proto3 JSON of a change, or bytes that are not a change at all.
    Bytes(Vec<u8>),
}

impl Item {
    /// The bytes the relay quarantines for this record: the record's bytes on Kinesis, the
    /// change's encoding on gRPC.
    pub fn raw(&self) -> Vec<u8> {
        match &self.payload {
            Payload::Change(change) => change.encode_to_vec(),
            Payload::Bytes(bytes) => bytes.clone(),
        }
    }

    /// The change, for gRPC.
    pub fn change(&self) -> ProductChange {
        match &self.payload {
            Payload::Change(change) => (**change).clone(),
            Payload::Bytes(_) => panic!("a gRPC workload holds changes only"),
        }
    }
}

/// A workload and what must come of it.
#[derive(Debug)]
pub struct Workload {
    /// Records in publish order.
    pub items: Vec<Item>,
    /// Highest published version of every product.
    pub max_versions: BTreeMap<String, u64>,
    /// Every product as applying its valid changes in version order leaves it (timestamps
    /// unset): what the catalog must hold, field for field.
    pub expected: BTreeMap<String, Product>,
    /// The raw payloads of the malformed records: exactly what the quarantine must hold.
    pub malformed: BTreeSet<Vec<u8>>,
    /// Valid changes sent as proto3 JSON (Kinesis only).
    pub json_changes: usize,
}

impl Workload {
    /// A workload from `seed`: same seed, same records in the same order.
    pub fn generate(seed: u64, style: Style, size: Size) -> Self {
        let mut rng = fastrand::Rng::with_seed(seed);
        // Each product's versions in a shuffled order: version 1 creates it (a full
        // replacement); of the others a third are full, the rest partial.
        let mut per_product: Vec<std::collections::VecDeque<ProductChange>> = (0..size.products)
            .map(|p| {
                let mut versions: Vec<u64> = (1..=VERSIONS).collect();
                rng.shuffle(&mut versions);
                versions
                    .into_iter()
                    .map(|v| {
                        let mask = (v > 1 && rng.u8(..3) != 0)
                            .then(|| PARTIAL_MASKS[rng.usize(..PARTIAL_MASKS.len())]);
                        valid_change(p, v, mask)
                    })
                    .collect()
            })
            .collect();
        let expected = per_product
            .iter()
            .map(|changes| in_version_order(changes.iter()))
            .map(|product| (product.code.clone(), product))
            .collect();
        // A uniformly random interleaving that keeps each product's own order.
        let mut slots: Vec<usize> = (0..size.products)
            .flat_map(|p| std::iter::repeat_n(p, VERSIONS as usize))
            .collect();
        rng.shuffle(&mut slots);
        let mut json_changes = 0;
        let mut items: Vec<Item> = slots
            .into_iter()
            .map(|p| {
                let change = per_product[p].pop_front().expect("one slot per version");
                let payload = if style == Style::Kinesis && rng.u8(..20) == 0 {
                    json_changes += 1;
                    Payload::Bytes(json(&change))
                } else {
                    Payload::Change(Box::new(change))
                };
                Item {
                    key: code(p),
                    payload,
                    malformed: false,
                }
            })
            .collect();
        for i in 0..size.malformed {
            let item = malformed(i, style, size.products, &mut rng);
            let at = rng.usize(..=items.len());
            items.insert(at, item);
        }
        let max_versions = (0..size.products).map(|p| (code(p), VERSIONS)).collect();
        let malformed: BTreeSet<Vec<u8>> = items
            .iter()
            .filter(|i| i.malformed)
            .map(Item::raw)
            .collect();
        assert_eq!(
            malformed.len(),
            size.malformed,
            "every malformed record is distinct"
        );
        Self {
            items,
            max_versions,
            expected,
            malformed,
            json_changes,
        }
    }

    /// How many valid changes it holds.
    pub fn valid_count(&self) -> usize {
        self.items.iter().filter(|i| !i.malformed).count()
    }
}

/// A valid change of product `p` at `version`: a full replacement, or a partial update of
/// the fields in `mask`. Every field's value names the version.
pub fn valid_change(p: usize, version: u64, mask: Option<&[&str]>) -> ProductChange {
    let code = code(p);
    let product_type = TYPES[p % TYPES.len()].to_owned();
    let statuses = [
        ProductStatus::OnSale,
        ProductStatus::SoldOut,
        ProductStatus::Hidden,
    ];
    ProductChange {
        product_code: code.clone(),
        product_type: product_type.clone(),
        version,
        product: Some(Product {
            code: code.clone(),
            product_type,
            brand: format!("Chaos v{version}"),
            category_path: vec!["chaos".into(), format!("v{version}")],
            status: statuses[usize::try_from(version).expect("small") % statuses.len()] as i32,
            names: [("ko".to_owned(), format!("카오스 {code} v{version}"))].into(),
            descriptions: [("ko".to_owned(), format!("설명 v{version}"))].into(),
            prices: [("KRW".to_owned(), price(version))].into(),
            version,
            ..Product::default()
        }),
        update_mask: mask.map(|paths| FieldMask {
            paths: paths.iter().map(|p| (*p).to_owned()).collect(),
        }),
        ..ProductChange::default()
    }
}

/// The product that applying `changes` (of one product) in version order leaves: each
/// change replaces the fields of its mask.
fn in_version_order<'a>(changes: impl Iterator<Item = &'a ProductChange>) -> Product {
    let mut sorted: Vec<&ProductChange> = changes.collect();
    sorted.sort_by_key(|c| c.version);
    let mut product = Product::default();
    for change in sorted {
        let update = change
            .product
            .as_ref()
            .expect("valid changes carry a product");
        product.code.clone_from(&update.code);
        product.product_type.clone_from(&update.product_type);
        UpdateMask::from_field_mask(change.update_mask.as_ref())
            .expect("valid masks")
            .apply(&mut product, update);
    }
    product
}

/// Malformed record `i`: one of several kinds of invalid change (with a real product's code
/// and, where it has one, a version above every valid one, so a record that slipped through
/// would show in the catalog), and on Kinesis also undecodable bytes and broken JSON. Each is
/// distinct from every other.
fn malformed(i: usize, style: Style, products: usize, rng: &mut fastrand::Rng) -> Item {
    let p = rng.usize(..products);
    let high = 1_000 + i as u64;
    let kinds = if style == Style::Kinesis { 9 } else { 7 };
    let mut change = valid_change(p, high, None);
    let product = change.product.as_mut().expect("set");
    product.names = [("ko".to_owned(), format!("불량 레코드 {i}"))].into();
    match i % kinds {
        0 => {
            change.version = 0;
            product.version = 0;
        }
        1 => {
            change.product_type = "spaceships".into();
            product.product_type = "spaceships".into();
        }
        2 => {
            product.prices.insert("XYZ".into(), 1);
        }
        3 => product.version = high + 1,
        4 => {
            change.product_code = String::new();
            product.code = String::new();
        }
        5 => change.product = None,
        6 => {
            change.update_mask = Some(FieldMask {
                paths: vec!["code".into()],
            });
        }
        7 => {
            // Not protobuf (wire type 7 does not exist) and not JSON.
            let mut bytes = vec![0xff, 0xff, 0xff, 0xff, 0x00];
            bytes.extend_from_slice(&(i as u32).to_be_bytes());
            return Item {
                key: format!("garbage-{i}"),
                payload: Payload::Bytes(bytes),
                malformed: true,
            };
        }
        _ => {
            // JSON whose version is not a number.
            let text = format!(
                r#"{{"productCode":"{}","productType":"shoes","version":"v{i}"}}"#,
                code(p)
            );
            return Item {
                key: code(p),
                payload: Payload::Bytes(text.into_bytes()),
                malformed: true,
            };
        }
    }
    let key = if change.product_code.is_empty() {
        format!("empty-code-{i}")
    } else {
        change.product_code.clone()
    };
    let payload = if style == Style::Kinesis && rng.bool() {
        Payload::Bytes(json(&change))
    } else {
        Payload::Change(Box::new(change))
    };
    Item {
        key,
        payload,
        malformed: true,
    }
}

/// The proto3 JSON form of `change`, as a producer without protobuf would send it.
fn json(change: &ProductChange) -> Vec<u8> {
    static DESCRIPTOR: std::sync::LazyLock<prost_reflect::MessageDescriptor> =
        std::sync::LazyLock::new(|| {
            DescriptorPool::decode(mall_proto::FILE_DESCRIPTOR_SET)
                .expect("the descriptor set decodes")
                .get_message_by_name("mall.sync.v1.ProductChange")
                .expect("ProductChange is described")
        });
    let message = DynamicMessage::decode(DESCRIPTOR.clone(), change.encode_to_vec().as_slice())
        .expect("a change decodes dynamically");
    serde_json::to_vec(&message).expect("a change serializes to JSON")
}
