//! A front for the catalog that forwards BulkUpdateProducts to it and can, for a while,
//! answer as a broken catalog would: INTERNAL for every call (a bug or a lost database in the
//! catalog: the relay must keep the messages and retry, never use up their receives), or
//! INVALID_ARGUMENT refusing every other item (a catalog deployed with a wrong rule: the relay
//! quarantines those changes, and an operator redrives them later, behind newer ones).
//!
//! The relay only calls BulkUpdateProducts; every other method answers UNIMPLEMENTED.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU8, AtomicU64, Ordering},
    },
};

use mall_proto::catalog::v1::{
    BatchGetProductsRequest, BatchGetProductsResponse, BulkUpdateProductsRequest,
    BulkUpdateProductsResponse, GetProductRequest, GetProductResponse, ImportProductsRequest,
    ImportProductsResponse, ListPendingProductsRequest, ListPendingProductsResponse,
    ListProductsRequest, ListProductsResponse, WatchProductChangesRequest,
    WatchProductChangesResponse,
    product_catalog_service_client::ProductCatalogServiceClient,
    product_catalog_service_server::{ProductCatalogService, ProductCatalogServiceServer},
};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming, transport::Channel};

/// What the front does with a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Fault {
    /// Forward it.
    None = 0,
    /// Answer INTERNAL.
    Internal = 1,
    /// Answer INVALID_ARGUMENT naming every other item.
    RefuseItems = 2,
}

/// The running front.
pub struct Front {
    /// Where the relay sends its calls.
    pub addr: SocketAddr,
    fault: Arc<AtomicU8>,
    refused: Arc<AtomicU64>,
    shutdown: CancellationToken,
}

impl Front {
    /// Starts a front for the catalog at `catalog`.
    pub async fn start(catalog: SocketAddr) -> Self {
        let upstream = ProductCatalogServiceClient::new(
            Channel::from_shared(format!("http://{catalog}"))
                .expect("valid")
                .connect_lazy(),
        )
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
        let fault = Arc::new(AtomicU8::new(Fault::None as u8));
        let refused = Arc::new(AtomicU64::new(0));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a free port");
        let addr = listener.local_addr().expect("bound");
        let shutdown = CancellationToken::new();
        let service = ProductCatalogServiceServer::new(Forward {
            upstream,
            fault: fault.clone(),
            refused: refused.clone(),
        })
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
        let stop = shutdown.clone();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    stop.cancelled_owned(),
                ),
        );
        Self {
            addr,
            fault,
            refused,
            shutdown,
        }
    }

    /// From now on, answer calls with `fault`.
    pub fn set(&self, fault: Fault) {
        self.fault.store(fault as u8, Ordering::SeqCst);
    }

    /// Calls answered with [`Fault::RefuseItems`] so far.
    pub fn refused_calls(&self) -> u64 {
        self.refused.load(Ordering::SeqCst)
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

struct Forward {
    upstream: ProductCatalogServiceClient<Channel>,
    fault: Arc<AtomicU8>,
    refused: Arc<AtomicU64>,
}

fn unimplemented<T>() -> Result<T, Status> {
    Err(Status::unimplemented(
        "the chaos front only forwards BulkUpdateProducts",
    ))
}

#[tonic::async_trait]
impl ProductCatalogService for Forward {
    async fn bulk_update_products(
        &self,
        request: Request<BulkUpdateProductsRequest>,
    ) -> Result<Response<BulkUpdateProductsResponse>, Status> {
        let request = request.into_inner();
        match self.fault.load(Ordering::SeqCst) {
            1 => Err(Status::internal("the chaos front fails inside")),
            2 => {
                self.refused.fetch_add(1, Ordering::SeqCst);
                // Through the services' own error mapping, so the details are capped as the
                // catalog's are (a status's details travel in an HTTP/2 trailer, which the
                // client limits: 500 violations of a 1,000-item call would not fit).
                let violations = (0..request.updates.len())
                    .step_by(2)
                    .map(|i| mall_grpc::FieldViolation {
                        field: format!("updates[{i}].product.brand"),
                        description: "refused by a catalog deployed with a wrong rule (chaos)"
                            .into(),
                    })
                    .collect();
                Err(mall_grpc::ServiceError::InvalidArgument(violations).into())
            }
            _ => self.upstream.clone().bulk_update_products(request).await,
        }
    }

    async fn get_product(
        &self,
        _: Request<GetProductRequest>,
    ) -> Result<Response<GetProductResponse>, Status> {
        unimplemented()
    }

    async fn batch_get_products(
        &self,
        _: Request<BatchGetProductsRequest>,
    ) -> Result<Response<BatchGetProductsResponse>, Status> {
        unimplemented()
    }

    async fn list_products(
        &self,
        _: Request<ListProductsRequest>,
    ) -> Result<Response<ListProductsResponse>, Status> {
        unimplemented()
    }

    async fn import_products(
        &self,
        _: Request<Streaming<ImportProductsRequest>>,
    ) -> Result<Response<ImportProductsResponse>, Status> {
        unimplemented()
    }

    type WatchProductChangesStream =
        Pin<Box<dyn futures::Stream<Item = Result<WatchProductChangesResponse, Status>> + Send>>;

    async fn watch_product_changes(
        &self,
        _: Request<WatchProductChangesRequest>,
    ) -> Result<Response<Self::WatchProductChangesStream>, Status> {
        unimplemented()
    }

    async fn list_pending_products(
        &self,
        _: Request<ListPendingProductsRequest>,
    ) -> Result<Response<ListPendingProductsResponse>, Status> {
        unimplemented()
    }
}
