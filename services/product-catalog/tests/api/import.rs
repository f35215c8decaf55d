//! ImportProducts: chunked commits, counts, safe re-runs.

use mall_proto::catalog::v1::{ImportProductsRequest, ImportProductsResponse, Product};
use mall_test_support::Engine;

use crate::both_engines;
use crate::helpers::{TestCatalog, bag, shoe, violations};

fn stream() -> Vec<ImportProductsRequest> {
    let mut bad_price = bag("B-bad", 1);
    bad_price.prices.insert("XYZ".into(), 1);
    let mut first: Vec<Product> = (0..10).map(|i| shoe(&format!("S-{i}"), 3)).collect();
    first.push(shoe("not valid!", 1));
    let mut second: Vec<Product> = (0..5).map(|i| bag(&format!("B-{i}"), 1)).collect();
    second.push(bad_price);
    vec![
        ImportProductsRequest { products: first },
        ImportProductsRequest { products: second },
        ImportProductsRequest {
            products: vec![shoe("S-0", 2), shoe("S-1", 3)],
        },
    ]
}

async fn import(
    catalog: &TestCatalog,
    messages: Vec<ImportProductsRequest>,
) -> ImportProductsResponse {
    catalog
        .client
        .clone()
        .import_products(tokio_stream::iter(messages))
        .await
        .expect("import succeeds")
        .into_inner()
}

async fn an_import_counts_every_product_and_is_safe_to_run_again(engine: Engine) {
    let catalog = TestCatalog::spawn(engine).await;
    let first = import(&catalog, stream()).await;
    assert_eq!(
        (first.applied_count, first.stale_count, first.invalid_count),
        (15, 2, 2)
    );
    let errors: Vec<_> = first
        .errors
        .iter()
        .map(|e| (e.index, e.code.as_str()))
        .collect();
    assert_eq!(errors, [(10, "not valid!"), (16, "B-bad")]);
    assert!(
        first.errors[1].reason.contains("prices[\"XYZ\"]"),
        "{}",
        first.errors[1].reason
    );
    assert_eq!(catalog.get("S-0").await.expect("stored").version, 3);
    assert_eq!(
        catalog.get("B-4").await.expect("stored").product_type,
        "bags"
    );

    let again = import(&catalog, stream()).await;
    assert_eq!(
        (again.applied_count, again.stale_count, again.invalid_count),
        (0, 17, 2)
    );
}

async fn a_message_over_the_limit_is_refused_and_earlier_ones_stay(engine: Engine) {
    let catalog = TestCatalog::spawn(engine).await;
    let status = catalog
        .client
        .clone()
        .import_products(tokio_stream::iter(vec![
            ImportProductsRequest {
                products: (0..5).map(|i| shoe(&format!("S-{i}"), 1)).collect(),
            },
            ImportProductsRequest {
                products: (0..1001).map(|i| shoe(&format!("T-{i}"), 1)).collect(),
            },
        ]))
        .await
        .expect_err("refused");
    assert_eq!(violations(&status), ["products"]);
    assert!(
        catalog.get("S-4").await.is_some(),
        "the first message was committed"
    );
    assert!(catalog.get("T-0").await.is_none());
}

both_engines!(
    an_import_counts_every_product_and_is_safe_to_run_again,
    a_message_over_the_limit_is_refused_and_earlier_ones_stay,
);
