//! The gRPC handlers of `mall.member.v1.MemberExportService`: convert, call the domain, map
//! errors (in `mall_grpc::ServiceError`).

use mall_proto::member::v1::{
    CancelJobRequest, CancelJobResponse, EnqueueMemberChangesRequest, EnqueueMemberChangesResponse,
    EraseMemberRequest, EraseMemberResponse, GetDeliveryStatsRequest, GetDeliveryStatsResponse,
    GetJobRequest, GetJobResponse, GetMemberDeliveryStateRequest, GetMemberDeliveryStateResponse,
    ListFailedDeliveriesRequest, ListFailedDeliveriesResponse, StartFailoverJobRequest,
    StartFailoverJobResponse, WatchJobRequest, member_export_service_server::MemberExportService,
};
use tonic::{Request, Response, Status};

use crate::{
    enqueue::Enqueuer,
    jobs::{JobStream, JobsApi},
    state,
    stats::Stats,
};

/// The service's handlers.
#[derive(Debug, Clone)]
pub struct MemberApi {
    /// EnqueueMemberChanges.
    pub enqueuer: Enqueuer,
    /// GetDeliveryStats.
    pub stats: Stats,
    /// The failover jobs' RPCs.
    pub jobs: JobsApi,
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
        request: Request<StartFailoverJobRequest>,
    ) -> Result<Response<StartFailoverJobResponse>, Status> {
        let job = self.jobs.start(request.into_inner()).await?;
        Ok(Response::new(StartFailoverJobResponse { job: Some(job) }))
    }

    async fn get_job(
        &self,
        request: Request<GetJobRequest>,
    ) -> Result<Response<GetJobResponse>, Status> {
        let job = self.jobs.get(&request.into_inner().job_id).await?;
        Ok(Response::new(GetJobResponse { job: Some(job) }))
    }

    type WatchJobStream = JobStream;

    async fn watch_job(
        &self,
        request: Request<WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let stream = self.jobs.watch(&request.into_inner().job_id).await?;
        Ok(Response::new(stream))
    }

    async fn cancel_job(
        &self,
        request: Request<CancelJobRequest>,
    ) -> Result<Response<CancelJobResponse>, Status> {
        let job = self.jobs.cancel(&request.into_inner().job_id).await?;
        Ok(Response::new(CancelJobResponse { job: Some(job) }))
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
