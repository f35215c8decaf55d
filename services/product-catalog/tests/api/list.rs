//! ListProducts: keyset pages, filters, tokens.

use std::collections::BTreeMap;

use mall_proto::catalog::v1::{ListProductsRequest, Product, ProductStatus};
use mall_test_support::Engine;

use crate::both_engines;
use crate::helpers::{TestCatalog, bag, bulk_of, shoe, violations};

/// Every page of `request`, following tokens; the products of each page.
async fn pages(catalog: &TestCatalog, request: ListProductsRequest) -> Vec<Vec<Product>> {
    let mut client = catalog.client.clone();
    let mut request = request;
    let mut pages = Vec::new();
    loop {
        let page = client
            .list_products(request.clone())
            .await
            .expect("list")
            .into_inner();
        pages.push(page.products);
        if page.next_page_token.is_empty() {
            return pages;
        }
        request.page_token = page.next_page_token;
    }
}

async fn pages_walk_every_product_once_in_code_order(engine: Engine) {
    let catalog = TestCatalog::spawn(engine).await;
    let products = (0..120)
        .rev()
        .map(|i| shoe(&format!("S-{i:03}"), 1))
        .collect();
    catalog.bulk(bulk_of("shoes", products)).await;

    let default = pages(&catalog, ListProductsRequest::default()).await;
    assert_eq!(
        default.iter().map(Vec::len).collect::<Vec<_>>(),
        [50, 50, 20]
    );
    let codes: Vec<String> = default.concat().into_iter().map(|p| p.code).collect();
    let expected: Vec<String> = (0..120).map(|i| format!("S-{i:03}")).collect();
    assert_eq!(codes, expected);

    let clamped = pages(
        &catalog,
        ListProductsRequest {
            page_size: 5_000,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(clamped.len(), 1);
    assert_eq!(clamped[0].len(), 120);

    let status = catalog
        .client
        .clone()
        .list_products(ListProductsRequest {
            page_size: -1,
            ..Default::default()
        })
        .await
        .expect_err("refused");
    assert_eq!(violations(&status), ["page_size"]);
}

async fn filters_combine(engine: Engine) {
    let catalog = TestCatalog::spawn(engine).await;
    let mut other_brand = shoe("S-2", 1);
    other_brand.brand = "Corsa".into();
    let mut sold_out = shoe("S-3", 1);
    sold_out.status = ProductStatus::SoldOut as i32;
    catalog
        .bulk(bulk_of(
            "shoes",
            vec![shoe("S-1", 1), other_brand, sold_out],
        ))
        .await;
    catalog.bulk(bulk_of("bags", vec![bag("B-1", 1)])).await;
    let first_write = catalog.get("B-1").await.expect("stored").update_time;
    catalog.bulk(bulk_of("shoes", vec![shoe("S-4", 1)])).await;

    let codes = |request: ListProductsRequest| {
        let catalog = &catalog;
        async move {
            pages(catalog, request)
                .await
                .concat()
                .into_iter()
                .map(|p| p.code)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        codes(ListProductsRequest {
            product_type: "shoes".into(),
            ..Default::default()
        })
        .await,
        ["S-1", "S-2", "S-3", "S-4"]
    );
    assert_eq!(
        codes(ListProductsRequest {
            product_type: "shoes".into(),
            brand: "Pedala".into(),
            status: ProductStatus::OnSale as i32,
            ..Default::default()
        })
        .await,
        ["S-1", "S-4"]
    );
    assert_eq!(
        codes(ListProductsRequest {
            updated_after: first_write,
            ..Default::default()
        })
        .await,
        ["S-4"]
    );
    let status = catalog
        .client
        .clone()
        .list_products(ListProductsRequest {
            product_type: "spaceships".into(),
            ..Default::default()
        })
        .await
        .expect_err("refused");
    assert_eq!(violations(&status), ["product_type"]);
}

async fn a_token_is_refused_when_malformed_or_for_other_filters(engine: Engine) {
    let catalog = TestCatalog::spawn(engine).await;
    let products = (0..3).map(|i| shoe(&format!("S-{i}"), 1)).collect();
    catalog.bulk(bulk_of("shoes", products)).await;
    let mut client = catalog.client.clone();
    let first = client
        .list_products(ListProductsRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    let other_filters = client
        .list_products(ListProductsRequest {
            page_size: 1,
            page_token: first.next_page_token,
            brand: "Corsa".into(),
            ..Default::default()
        })
        .await
        .expect_err("refused");
    assert_eq!(violations(&other_filters), ["page_token"]);
    let malformed = client
        .list_products(ListProductsRequest {
            page_token: "not-a-token".into(),
            ..Default::default()
        })
        .await
        .expect_err("refused");
    assert_eq!(violations(&malformed), ["page_token"]);
}

async fn paging_while_writes_happen_returns_every_existing_product_exactly_once(engine: Engine) {
    let catalog = TestCatalog::spawn(engine).await;
    let existing: Vec<String> = (0..400).map(|i| format!("S-{i:04}")).collect();
    for chunk in existing.chunks(200) {
        let products = chunk.iter().map(|code| shoe(code, 1)).collect();
        catalog.bulk(bulk_of("shoes", products)).await;
    }

    // A writer updates existing products and inserts new ones between them while we page.
    let writer = {
        let mut client = catalog.client.clone();
        tokio::spawn(async move {
            for round in 0..30u64 {
                let products = (0..400)
                    .step_by(7)
                    .flat_map(|i| {
                        [
                            shoe(&format!("S-{i:04}"), round + 2),
                            shoe(&format!("S-{i:04}-new{round}"), 1),
                        ]
                    })
                    .collect();
                client
                    .bulk_update_products(bulk_of("shoes", products))
                    .await
                    .expect("write");
            }
        })
    };

    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for page in pages(
        &catalog,
        ListProductsRequest {
            page_size: 13,
            ..Default::default()
        },
    )
    .await
    {
        for product in page {
            *seen.entry(product.code).or_default() += 1;
        }
    }
    writer.await.expect("writer finished");
    for code in &existing {
        assert_eq!(seen.get(code), Some(&1), "{code} seen once");
    }
    assert!(
        seen.values().all(|n| *n == 1),
        "no product is returned twice"
    );
}

both_engines!(
    pages_walk_every_product_once_in_code_order,
    filters_combine,
    a_token_is_refused_when_malformed_or_for_other_filters,
    paging_while_writes_happen_returns_every_existing_product_exactly_once,
);
