//! The gRPC handlers of `mall.member.v1.MemberExportService`: convert, call the domain, map
//! errors (in `mall_grpc::ServiceError`).

use std::pin::Pin;

use futures::Stream;
use mall_proto::member::v1::{
    EnqueueMemberChangesRequest, EnqueueMemberChangesResponse, EraseMemberRequest,
    EraseMemberResponse, GetDeliveryStatsRequest, GetDeliveryStatsResponse, GetJobRequest,
    GetJobResponse, GetMemberDeliveryStateRequest, GetMemberDeliveryStateResponse,
    ListFailedDeliveriesRequest, ListFailedDeliveriesResponse, StartFailoverJobRequest,
    StartFailoverJobResponse, WatchJobRequest, WatchJobResponse,
    member_export_service_server::MemberExportService,
};
use tonic::{Request, Response, Status};

use crate::{enqueue::Enqueuer, state, stats::Stats};

/// The service's handlers.
#[derive(Debug, Clone)]
pub struct MemberApi {
    /// EnqueueMemberChanges.
    pub enqueuer: Enqueuer,
    /// GetDeliveryStats.
    pub stats: Stats,
}

/// What the RPCs not built yet answer: honestly UNIMPLEMENTED.
fn not_built(rpc: &str) -> Status {
    Status::unimplemented(format!(
        "{rpc} is not built yet; failover jobs come with a later change"
    ))
}

#[tonic::async_trait]
impl MemberExportService for MemberApi {
    async fn enqueue_member_changes(
        &self,
        request: Request<EnqueueMemberChangesRequest>,
    ) -> Result<Response<EnqueueMemberChangesResponse>, Status> {
        let response = self.enqueuer.enqueue(request.into_inner()).await?;
        Ok(Response::new(response))
    }

    async fn start_failover_job(
        &self,
        _request: Request<StartFailoverJobRequest>,
    ) -> Result<Response<StartFailoverJobResponse>, Status> {
        Err(not_built("StartFailoverJob"))
    }

    async fn get_job(
        &self,
        _request: Request<GetJobRequest>,
    ) -> Result<Response<GetJobResponse>, Status> {
        Err(not_built("GetJob"))
    }

    type WatchJobStream =
        Pin<Box<dyn Stream<Item = Result<WatchJobResponse, Status>> + Send + 'static>>;

    async fn watch_job(
        &self,
        _request: Request<WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        Err(not_built("WatchJob"))
    }

    async fn get_delivery_stats(
        &self,
        _request: Request<GetDeliveryStatsRequest>,
    ) -> Result<Response<GetDeliveryStatsResponse>, Status> {
        Ok(Response::new(GetDeliveryStatsResponse {
            stats: Some(self.stats.current().await?),
        }))
    }

    async fn list_failed_deliveries(
        &self,
        request: Request<ListFailedDeliveriesRequest>,
    ) -> Result<Response<ListFailedDeliveriesResponse>, Status> {
        let response = state::list_failed(&self.enqueuer.store, request.into_inner()).await?;
        Ok(Response::new(response))
    }

    async fn erase_member(
        &self,
        request: Request<EraseMemberRequest>,
    ) -> Result<Response<EraseMemberResponse>, Status> {
        let response = self.enqueuer.erase(request.into_inner()).await?;
        Ok(Response::new(response))
    }

    async fn get_member_delivery_state(
        &self,
        request: Request<GetMemberDeliveryStateRequest>,
    ) -> Result<Response<GetMemberDeliveryStateResponse>, Status> {
        let member = request.into_inner().member_id;
        let state = state::member_state(&self.enqueuer.store, &member).await?;
        Ok(Response::new(GetMemberDeliveryStateResponse {
            state: Some(state),
        }))
    }
}
