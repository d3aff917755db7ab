//! A member's side of its membership in a job (actors and reward workers): connect to the
//! learner and register, then heart-beat every period until the learner answers
//! `shutdown` or has been silent for [`LEARNER_SILENCE_HEARTBEATS`] heartbeat periods.
//! What a heartbeat carries and what a member does with each reply is the member's own.

use crate::rpc::{
    connect_retrying, endpoint, learner_client, learner_client_in_session, LearnerConn,
    LEARNER_SILENCE_HEARTBEATS,
};
use crate::{HeartbeatReply, HeartbeatRequest, RegisterReply, RegisterRequest};
use std::time::{Duration, Instant};
use tonic::Status;

/// How long a member keeps trying to reach the learner, and each call's timeout.
pub const LEARNER_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a member could not join.
#[derive(Debug, thiserror::Error)]
pub enum MemberError {
    /// The learner could not be reached within [`LEARNER_TIMEOUT`].
    #[error("cannot reach the learner at {addr}: {reason}")]
    Unreachable {
        /// The learner's address.
        addr: String,
        /// What went wrong.
        reason: String,
    },
    /// The learner refused the registration.
    #[error("register with the learner at {addr}: {message}")]
    Refused {
        /// The learner's address.
        addr: String,
        /// The learner's answer.
        message: String,
    },
}

/// Why a member's heartbeat loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// The learner said the job is over.
    Shutdown,
    /// The learner did not answer for [`LEARNER_SILENCE_HEARTBEATS`] heartbeat periods.
    Silent,
}

/// A registered member: the learner's address, an authenticated client, its member id.
#[derive(Debug, Clone)]
pub struct Member {
    /// The learner's `HOST:PORT`.
    pub addr: String,
    /// The learner client (carries the job token and the member's session secret).
    pub learner: LearnerConn,
    /// The id the learner gave this member.
    pub id: String,
}

impl Member {
    /// Connects to the learner at `addr` (retrying for up to [`LEARNER_TIMEOUT`]) and
    /// registers; returns the member (whose calls carry the session secret it was given)
    /// and the learner's answer (job, model, tokenizer).
    pub async fn join(
        addr: &str,
        token: &str,
        request: RegisterRequest,
    ) -> Result<(Member, RegisterReply), MemberError> {
        let unreachable = |reason: String| MemberError::Unreachable {
            addr: addr.to_owned(),
            reason,
        };
        let endpoint = endpoint(addr, LEARNER_TIMEOUT).map_err(unreachable)?;
        let channel = connect_retrying(&endpoint, LEARNER_TIMEOUT, Duration::from_millis(200))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let reply = learner_client(channel.clone(), token)
            .register(request)
            .await
            .map_err(|status| MemberError::Refused {
                addr: addr.to_owned(),
                message: status.message().to_owned(),
            })?
            .into_inner();
        let member = Member {
            addr: addr.to_owned(),
            learner: learner_client_in_session(channel, token, &reply.session),
            id: reply.member_id.clone(),
        };
        Ok((member, reply))
    }

    /// Sends one heartbeat under this member's id.
    pub async fn heartbeat(
        &mut self,
        mut request: HeartbeatRequest,
    ) -> Result<HeartbeatReply, Status> {
        request.member_id.clone_from(&self.id);
        Ok(self.learner.heartbeat(request).await?.into_inner())
    }

    /// Heart-beats every `every`: each request comes from `build` (the member id is filled
    /// in) and each reply that does not end the job goes to `take` with the request it
    /// answers. Ends when the learner answers `shutdown`, or when it has not answered for
    /// [`LEARNER_SILENCE_HEARTBEATS`] periods in a row.
    pub async fn heartbeats(
        mut self,
        every: Duration,
        mut build: impl FnMut() -> HeartbeatRequest,
        mut take: impl FnMut(&HeartbeatRequest, HeartbeatReply),
    ) -> Stopped {
        let mut silent_since: Option<Instant> = None;
        loop {
            tokio::time::sleep(every).await;
            let request = build();
            match self.heartbeat(request.clone()).await {
                Ok(reply) if reply.shutdown => return Stopped::Shutdown,
                Ok(reply) => {
                    silent_since = None;
                    take(&request, reply);
                }
                Err(status) => {
                    tracing::warn!("heartbeat failed: {}", status.message());
                    let since = *silent_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > every * LEARNER_SILENCE_HEARTBEATS {
                        tracing::warn!("the learner is gone: stopping");
                        return Stopped::Silent;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::learner_server::{Learner, LearnerServer};
    use crate::rpc::tests::loopback;
    use crate::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;
    use tonic::{Request, Response};

    /// Answers the first `answered` heartbeats (the last one with `shutdown` when
    /// `then_shutdown`), and fails every later one.
    struct FakeLearner {
        answered: u32,
        then_shutdown: bool,
        heartbeats: Arc<AtomicU32>,
    }

    type Answer<T> = Result<Response<T>, Status>;

    fn unused<T>() -> Answer<T> {
        Err(Status::unimplemented("not in this test"))
    }

    #[tonic::async_trait]
    impl Learner for FakeLearner {
        async fn register(&self, _: Request<RegisterRequest>) -> Answer<RegisterReply> {
            Ok(Response::new(RegisterReply {
                member_id: "m7".into(),
                session: "s7".into(),
                ..RegisterReply::default()
            }))
        }

        async fn heartbeat(&self, request: Request<HeartbeatRequest>) -> Answer<HeartbeatReply> {
            assert_eq!(request.get_ref().member_id, "m7");
            assert_eq!(crate::auth::session_of(&request), "s7");
            let n = self.heartbeats.fetch_add(1, Ordering::SeqCst) + 1;
            if n > self.answered {
                return Err(Status::unavailable("learner busy elsewhere"));
            }
            Ok(Response::new(HeartbeatReply {
                latest_version: u64::from(n),
                shutdown: self.then_shutdown && n == self.answered,
                ..HeartbeatReply::default()
            }))
        }

        async fn lease(&self, _: Request<LeaseRequest>) -> Answer<LeaseReply> {
            unused()
        }

        async fn submit_scored(&self, _: Request<ScoredGroup>) -> Answer<SubmitReply> {
            unused()
        }

        async fn release_leases(&self, _: Request<ReleaseRequest>) -> Answer<ReleaseReply> {
            unused()
        }

        type GetWeightsStream = tokio_stream::Empty<Result<WeightChunk, Status>>;

        async fn get_weights(&self, _: Request<WeightsRequest>) -> Answer<Self::GetWeightsStream> {
            unused()
        }

        async fn status(&self, _: Request<StatusRequest>) -> Answer<StatusReply> {
            unused()
        }

        async fn join_rank(&self, _: Request<JoinRankRequest>) -> Answer<JoinRankReply> {
            unused()
        }

        async fn get_shard(&self, _: Request<ShardRequest>) -> Answer<ShardReply> {
            unused()
        }
    }

    const EVERY: Duration = Duration::from_millis(20);

    /// Joins a fake learner and heart-beats until the loop ends; returns why, the
    /// heartbeats the learner saw, the versions of the replies taken, and how long the
    /// loop ran after the last answer.
    async fn run(answered: u32, then_shutdown: bool) -> (Stopped, u32, Vec<u64>, Duration) {
        let heartbeats = Arc::new(AtomicU32::new(0));
        let learner = FakeLearner {
            answered,
            then_shutdown,
            heartbeats: Arc::clone(&heartbeats),
        };
        let addr = loopback(LearnerServer::new(learner)).await;
        let (member, reply) = Member::join(&addr, "right", RegisterRequest::default())
            .await
            .unwrap();
        assert_eq!((member.id.as_str(), reply.member_id.as_str()), ("m7", "m7"));
        let mut taken = Vec::new();
        let mut last_answer = Instant::now();
        let stopped = member
            .heartbeats(EVERY, HeartbeatRequest::default, |_, reply| {
                last_answer = Instant::now();
                taken.push(reply.latest_version);
            })
            .await;
        let silence = last_answer.elapsed();
        (stopped, heartbeats.load(Ordering::SeqCst), taken, silence)
    }

    #[tokio::test]
    async fn a_silent_learner_ends_the_loop_after_the_stated_heartbeats() {
        let (stopped, seen, taken, silence) = run(3, false).await;
        assert_eq!(stopped, Stopped::Silent);
        assert_eq!(taken, [1, 2, 3]);
        // The first unanswered heartbeat starts the silence; it ends after the stated
        // number of periods (fewer heartbeats fit when the machine is slow).
        let failed = seen - 3;
        assert!(
            (LEARNER_SILENCE_HEARTBEATS / 2..=LEARNER_SILENCE_HEARTBEATS + 1).contains(&failed),
            "{failed} unanswered heartbeats"
        );
        assert!(
            silence > EVERY * LEARNER_SILENCE_HEARTBEATS,
            "gave up after {silence:?}"
        );
    }

    #[tokio::test]
    async fn shutdown_ends_the_loop_at_once() {
        let (stopped, seen, taken, _) = run(4, true).await;
        assert_eq!(
            (stopped, seen, taken),
            (Stopped::Shutdown, 4, vec![1, 2, 3])
        );
    }

    #[tokio::test]
    async fn a_refused_registration_names_the_learner() {
        let addr = loopback(LearnerServer::new(FakeLearner {
            answered: 0,
            then_shutdown: false,
            heartbeats: Arc::default(),
        }))
        .await;
        let err = Member::join(&addr, "wrong", RegisterRequest::default())
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("register with the learner at {addr}: missing or wrong job token")
        );
    }
}
