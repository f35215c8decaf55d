//! gRPC handlers of `mall.catalog.v1.ProductCatalogService`: check the request, call the
//! store or a domain module, map errors (through `ServiceError`); nothing else.

use std::sync::Arc;

use mall_grpc::{ServiceError, Violations};
use mall_product::{ProductTypes, limits::MAX_ITEMS_PER_REQUEST, validate::check_code};
use mall_proto::catalog::v1::{
    BatchGetProductsRequest, BatchGetProductsResponse, BulkUpdateProductsRequest,
    BulkUpdateProductsResponse, GetProductRequest, GetProductResponse, ImportProductsRequest,
    ImportProductsResponse, ListPendingProductsRequest, ListPendingProductsResponse,
    ListProductsRequest, ListProductsResponse, PendingProduct, ProductLookup, ProductStatus,
    ProductUpdateResult, WatchProductChangesRequest,
    product_catalog_service_server::ProductCatalogService,
};
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};

use crate::{
    bulk::check_bulk_request,
    import::Importer,
    metrics::CatalogMetrics,
    store::{ListFilter, OnRefusal, Store, WriteOutcome, micros},
    tokens,
    watch::{ChangeStream, Watcher},
};

/// Default page size of ListProducts.
const DEFAULT_PAGE_SIZE: u64 = 50;
/// Largest page size of ListProducts; larger requests are clamped.
const MAX_PAGE_SIZE: u64 = 1_000;

/// The service; cheap to clone.
#[derive(Debug, Clone)]
pub struct CatalogApi {
    store: Store,
    types: Arc<ProductTypes>,
    metrics: CatalogMetrics,
    commits: Arc<watch::Sender<u64>>,
    watcher: Watcher,
    importer: Importer,
}

impl CatalogApi {
    /// Handlers over `store`; `commits` is bumped after every write so watch streams wake.
    pub fn new(
        store: Store,
        types: Arc<ProductTypes>,
        metrics: CatalogMetrics,
        commits: Arc<watch::Sender<u64>>,
        watcher: Watcher,
    ) -> Self {
        let importer = Importer {
            store: store.clone(),
            types: types.clone(),
            metrics: metrics.clone(),
        };
        Self {
            store,
            types,
            metrics,
            commits,
            watcher,
            importer,
        }
    }

    fn committed(&self) {
        self.commits.send_modify(|n| *n = n.wrapping_add(1));
    }
}

#[tonic::async_trait]
impl ProductCatalogService for CatalogApi {
    #[tracing::instrument(skip_all, fields(code = %request.get_ref().code))]
    async fn get_product(
        &self,
        request: Request<GetProductRequest>,
    ) -> Result<Response<GetProductResponse>, Status> {
        let code = request.into_inner().code;
        check_code(&code).map_err(|problem| ServiceError::invalid("code", problem))?;
        let product = self.store.get(&code).await?.ok_or(ServiceError::NotFound {
            resource: "product",
            name: code,
        })?;
        Ok(Response::new(GetProductResponse {
            product: Some(product),
        }))
    }

    #[tracing::instrument(skip_all, fields(codes = request.get_ref().codes.len()))]
    async fn batch_get_products(
        &self,
        request: Request<BatchGetProductsRequest>,
    ) -> Result<Response<BatchGetProductsResponse>, Status> {
        let codes = request.into_inner().codes;
        let mut violations = Violations::default();
        if codes.len() > MAX_ITEMS_PER_REQUEST {
            violations.add(
                "codes",
                format!(
                    "holds {} codes; at most {MAX_ITEMS_PER_REQUEST} per request",
                    codes.len()
                ),
            );
        } else {
            for (i, code) in codes.iter().enumerate() {
                if let Err(problem) = check_code(code) {
                    violations.add(format!("codes[{i}]"), problem);
                }
            }
        }
        violations.into_result()?;
        let found = self.store.batch_get(&codes).await?;
        let results = codes
            .into_iter()
            .map(|code| {
                let product = found.get(&code).cloned();
                ProductLookup {
                    found: product.is_some(),
                    code,
                    product,
                }
            })
            .collect();
        Ok(Response::new(BatchGetProductsResponse { results }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_products(
        &self,
        request: Request<ListProductsRequest>,
    ) -> Result<Response<ListProductsResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::default();
        let page_size = page_size(request.page_size, &mut violations);
        if !request.product_type.is_empty() && !self.types.contains(&request.product_type) {
            violations.add(
                "product_type",
                format!(
                    "{:?} is not a registered product type; registered: {}",
                    request.product_type,
                    self.types.names().join(", ")
                ),
            );
        }
        if ProductStatus::try_from(request.status).is_err() {
            violations.add(
                "status",
                format!("{} is not a ProductStatus value", request.status),
            );
        }
        violations.into_result()?;
        let filter = ListFilter {
            product_type: (!request.product_type.is_empty()).then_some(request.product_type),
            brand: (!request.brand.is_empty()).then_some(request.brand),
            status: (request.status != ProductStatus::Unspecified as i32).then_some(request.status),
            updated_after: request.updated_after.map(micros),
        };
        let after = (!request.page_token.is_empty())
            .then(|| tokens::parse_page_token(&request.page_token, &filter))
            .transpose()?;
        // One more than asked tells whether another page follows.
        let mut products = self
            .store
            .list(&filter, after.as_deref(), page_size + 1)
            .await?;
        let next_page_token = if products.len() as u64 > page_size {
            products.truncate(usize::try_from(page_size).unwrap_or(usize::MAX));
            products
                .last()
                .map(|p| tokens::page_token(&p.code, &filter))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(ListProductsResponse {
            products,
            next_page_token,
        }))
    }

    #[tracing::instrument(skip_all, fields(
        product_type = %request.get_ref().product_type,
        items = request.get_ref().updates.len(),
    ))]
    async fn bulk_update_products(
        &self,
        request: Request<BulkUpdateProductsRequest>,
    ) -> Result<Response<BulkUpdateProductsResponse>, Status> {
        let request = check_bulk_request(request.into_inner(), &self.types)?;
        let outcome = self
            .store
            .bulk_write(
                request.request_id.as_deref(),
                request.writes,
                OnRefusal::RejectRequest,
            )
            .await?;
        let response = match outcome {
            WriteOutcome::Replayed(first) => first,
            WriteOutcome::Applied {
                results, retries, ..
            } => {
                self.committed();
                self.metrics.retries.inc_by(u64::from(retries));
                for result in &results {
                    self.metrics.count_item("bulk", result.outcome);
                }
                BulkUpdateProductsResponse {
                    results: results
                        .into_iter()
                        .map(|r| ProductUpdateResult {
                            code: r.code,
                            outcome: r.outcome as i32,
                            stored_version: r.stored_version,
                        })
                        .collect(),
                }
            }
        };
        Ok(Response::new(response))
    }

    #[tracing::instrument(skip_all)]
    async fn import_products(
        &self,
        request: Request<Streaming<ImportProductsRequest>>,
    ) -> Result<Response<ImportProductsResponse>, Status> {
        let response = self.importer.run(request.into_inner()).await;
        // Whatever committed before an error is visible to watchers.
        self.committed();
        Ok(Response::new(response?))
    }

    type WatchProductChangesStream = ChangeStream;

    #[tracing::instrument(skip_all, fields(product_type = %request.get_ref().product_type))]
    async fn watch_product_changes(
        &self,
        request: Request<WatchProductChangesRequest>,
    ) -> Result<Response<Self::WatchProductChangesStream>, Status> {
        let stream = self.watcher.start(request.into_inner()).await?;
        Ok(Response::new(stream))
    }

    #[tracing::instrument(skip_all)]
    async fn list_pending_products(
        &self,
        request: Request<ListPendingProductsRequest>,
    ) -> Result<Response<ListPendingProductsResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::default();
        let page_size = page_size(request.page_size, &mut violations);
        violations.into_result()?;
        let after = (!request.page_token.is_empty())
            .then(|| tokens::parse_pending_page_token(&request.page_token))
            .transpose()?;
        let mut rows = self
            .store
            .list_pending(after.as_deref(), page_size + 1)
            .await?;
        let next_page_token = if rows.len() as u64 > page_size {
            rows.truncate(usize::try_from(page_size).unwrap_or(usize::MAX));
            rows.last()
                .map(|r| tokens::pending_page_token(&r.code))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(ListPendingProductsResponse {
            pending_products: rows
                .into_iter()
                .map(|row| PendingProduct {
                    code: row.code,
                    product_type: row.product_type,
                    waiting_fields: Some(row.waiting.to_listed_field_mask()),
                    version: row.version,
                    first_seen_time: Some(row.first_seen),
                    update_time: Some(row.update_time),
                })
                .collect(),
            next_page_token,
        }))
    }
}

/// A list request's page size: 0 is the default, larger than the maximum is clamped,
/// negative is a violation.
fn page_size(requested: i32, violations: &mut Violations) -> u64 {
    match requested {
        n if n < 0 => {
            violations.add("page_size", "must not be negative");
            0
        }
        0 => DEFAULT_PAGE_SIZE,
        n => u64::try_from(n).unwrap_or(MAX_PAGE_SIZE).min(MAX_PAGE_SIZE),
    }
}
