//! The `Learner` gRPC service: thin handlers that unwrap each request, call into the
//! hub's modules and wrap the answer.

use super::Hub;
use crate::parallel::ranks::ShardAnswer;
use quill_proto::auth::session_of;
use quill_proto::learner_server::Learner;
use quill_proto::{
    HeartbeatReply, HeartbeatRequest, JoinRankReply, JoinRankRequest, LeaseReply, LeaseRequest,
    RegisterReply, RegisterRequest, ReleaseReply, ReleaseRequest, Role, ScoredGroup, ShardReply,
    ShardRequest, StatusReply, StatusRequest, SubmitReply, WeightsRequest,
};
use quill_relay::ChunkStream;
use std::sync::Arc;
use std::time::Duration;
use tonic::{Request, Response, Status};

/// How long a `GetShard` call waits for the batch before answering "not yet".
const SHARD_POLL: Duration = Duration::from_secs(1);

/// How long a `Lease` call waits for room in the pipeline before answering with none.
const LEASE_PATIENCE: Duration = Duration::from_secs(1);

/// The `Learner` service over a shared [`Hub`].
#[derive(Clone)]
pub struct LearnerService(pub Arc<Hub>);

#[tonic::async_trait]
impl Learner for LearnerService {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterReply>, Status> {
        self.0.register(request.into_inner()).map(Response::new)
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatReply>, Status> {
        let member = &request.get_ref().member_id;
        self.0
            .members
            .authenticate(member, session_of(&request), None)?;
        self.0.heartbeat(request.into_inner()).map(Response::new)
    }

    async fn lease(&self, request: Request<LeaseRequest>) -> Result<Response<LeaseReply>, Status> {
        let member = &request.get_ref().member_id;
        self.0
            .members
            .authenticate(member, session_of(&request), Some(Role::Actor))?;
        self.0
            .lease_or_wait(request.into_inner(), LEASE_PATIENCE)
            .await
            .map(Response::new)
    }

    /// Only a reward worker submits, under its own id (`reward_worker`).
    async fn submit_scored(
        &self,
        request: Request<ScoredGroup>,
    ) -> Result<Response<SubmitReply>, Status> {
        let member = &request.get_ref().reward_worker;
        self.0
            .members
            .authenticate(member, session_of(&request), Some(Role::Reward))?;
        self.0.submit(request.into_inner()).await.map(Response::new)
    }

    async fn release_leases(
        &self,
        request: Request<ReleaseRequest>,
    ) -> Result<Response<ReleaseReply>, Status> {
        let member = &request.get_ref().member_id;
        self.0
            .members
            .authenticate(member, session_of(&request), Some(Role::Actor))?;
        Ok(Response::new(self.0.release(request.get_ref())))
    }

    type GetWeightsStream = ChunkStream;

    async fn get_weights(
        &self,
        request: Request<WeightsRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let stall = Duration::from_secs_f64(self.0.job.cluster.rpc_timeout_seconds);
        self.0
            .weights
            .serve(&request.into_inner(), stall)
            .map(Response::new)
    }

    /// Records the rank, then waits for rank 0 to form the group.
    async fn join_rank(
        &self,
        request: Request<JoinRankRequest>,
    ) -> Result<Response<JoinRankReply>, Status> {
        let hub = Arc::clone(&self.0);
        let (peer, local) = match (request.remote_addr(), request.local_addr()) {
            (Some(peer), Some(local)) => (peer.ip(), local.ip()),
            _ => {
                return Err(Status::internal(
                    "join rank: the connection has no addresses",
                ))
            }
        };
        let req = request.into_inner();
        let port = u16::try_from(req.ring_port).map_err(|_| {
            Status::invalid_argument(format!("join rank: port {} is not a port", req.ring_port))
        })?;
        hub.ranks
            .join(
                req.rank as usize,
                req.world_size as usize,
                port,
                req.name,
                peer,
                local,
            )
            .map_err(Status::invalid_argument)?;
        tracing::info!(rank = req.rank, "learner rank joined");
        let rank = req.rank as usize;
        let timeout = hub.job.parallel.timeout();
        let reply = tokio::task::spawn_blocking(move || {
            hub.ranks.wait_for_setup(rank, timeout, &hub.info.job_json)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(Status::failed_precondition)?;
        Ok(Response::new(reply))
    }

    /// The rank's shard of the step once rank 0 has formed the batch ("not yet" after
    /// `SHARD_POLL`), to the rank that joined as it (its session secret); the rank's
    /// metrics ride along.
    async fn get_shard(
        &self,
        request: Request<ShardRequest>,
    ) -> Result<Response<ShardReply>, Status> {
        let hub = Arc::clone(&self.0);
        hub.ranks
            .check_session(request.get_ref().rank as usize, session_of(&request))
            .map_err(Status::unauthenticated)?;
        let req = request.into_inner();
        let reported = req.metrics.filter(|m| {
            m.rank == req.rank
                && req.rank > 0
                && (req.rank as usize) < hub.ranks.world_size()
                && m.gauges().iter().all(|g| g.value.is_finite())
        });
        if let Some(metrics) = reported {
            hub.set_rank_metrics(metrics);
        }
        let answer = tokio::task::spawn_blocking(move || {
            hub.ranks.shard(req.rank as usize, req.step, SHARD_POLL)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(Status::invalid_argument)?;
        Ok(Response::new(match answer {
            ShardAnswer::Ready(samples) => ShardReply {
                ready: true,
                samples,
                ..ShardReply::default()
            },
            ShardAnswer::NotYet => ShardReply::default(),
            ShardAnswer::Finished => ShardReply {
                finished: true,
                ..ShardReply::default()
            },
        }))
    }

    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusReply>, Status> {
        let json = serde_json::to_string(&self.0.status_document())
            .map_err(|e| Status::internal(format!("status document: {e}")))?;
        Ok(Response::new(StatusReply { json }))
    }
}
