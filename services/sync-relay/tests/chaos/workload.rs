//! What the chaos tests publish: 50,000 valid changes of 5,000 products, each product's
//! versions in a shuffled order, products interleaved at random, and a few hundred malformed
//! records mixed in, every one of them distinct so the quarantine can be compared with them.

use std::collections::{BTreeMap, BTreeSet};

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
    /// The raw payloads of the malformed records: exactly what the quarantine must hold.
    pub malformed: BTreeSet<Vec<u8>>,
    /// Valid changes sent as proto3 JSON (Kinesis only).
    pub json_changes: usize,
}

impl Workload {
    /// A workload from `seed`: same seed, same records in the same order.
    pub fn generate(seed: u64, style: Style, size: Size) -> Self {
        let mut rng = fastrand::Rng::with_seed(seed);
        // Each product's versions in a shuffled order; about a third are partial updates
        // (status and prices), which may also create a product.
        let mut per_product: Vec<std::collections::VecDeque<ProductChange>> = (0..size.products)
            .map(|p| {
                let mut versions: Vec<u64> = (1..=VERSIONS).collect();
                rng.shuffle(&mut versions);
                versions
                    .into_iter()
                    .map(|v| valid_change(p, v, rng.u8(..3) == 0))
                    .collect()
            })
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
            malformed,
            json_changes,
        }
    }

    /// How many valid changes it holds.
    pub fn valid_count(&self) -> usize {
        self.items.iter().filter(|i| !i.malformed).count()
    }
}

/// A valid change of product `p` at `version`: a full replacement, or with `partial` an
/// update of status and prices only.
pub fn valid_change(p: usize, version: u64, partial: bool) -> ProductChange {
    let code = code(p);
    let product_type = TYPES[p % TYPES.len()].to_owned();
    ProductChange {
        product_code: code.clone(),
        product_type: product_type.clone(),
        version,
        product: Some(Product {
            code: code.clone(),
            product_type,
            brand: "Chaos".into(),
            status: ProductStatus::OnSale as i32,
            names: [("ko".to_owned(), format!("카오스 {code} v{version}"))].into(),
            prices: [("KRW".to_owned(), price(version))].into(),
            version,
            ..Product::default()
        }),
        update_mask: partial.then(|| FieldMask {
            paths: vec!["status".into(), "prices".into()],
        }),
        ..ProductChange::default()
    }
}

/// Malformed record `i`: one of several kinds of invalid change (with a real product's code
/// and, where it has one, a version above every valid one, so a record that slipped through
/// would show in the catalog), and on Kinesis also undecodable bytes and broken JSON. Each is
/// distinct from every other.
fn malformed(i: usize, style: Style, products: usize, rng: &mut fastrand::Rng) -> Item {
    let p = rng.usize(..products);
    let high = 1_000 + i as u64;
    let kinds = if style == Style::Kinesis { 9 } else { 7 };
    let mut change = valid_change(p, high, false);
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
