//! The learner's gRPC surface against bad input: a real learner process on loopback,
//! a hand-written client sending what a broken or hostile member might. Every bad call is
//! refused with a message that names the problem, counted, and the job keeps running.

mod support;

use quill_proto::auth::attach_token;
use quill_proto::learner_client::LearnerClient;
use quill_proto::rpc::{learner_client, learner_client_in_session, LearnerConn};
use quill_proto::{
    HeartbeatRequest, LeaseRequest, PromptLease, RegisterReply, RegisterRequest, ReleaseRequest,
    Role, RolloutGroup, Sample, SampleScores, ScoredGroup, ShardRequest, StatusRequest,
    WeightsRequest,
};
use serde_json::Value;
use std::time::{Duration, Instant};
use support::job::{grpc_channel, set, TestJob};
use tonic::Code;

fn group(lease: &PromptLease, version: u64, reward_worker: &str) -> ScoredGroup {
    let samples = (0..lease.group_size)
        .map(|i| Sample {
            tokens: vec![5 + i as i64, 6, 7],
            logprobs: vec![-1.0, -2.0, -0.5],
            finish_reason: "length".into(),
            version_first: version,
            version_last: version,
            text: "x".into(),
        })
        .collect::<Vec<_>>();
    let n = samples.len();
    ScoredGroup {
        rollout: Some(RolloutGroup {
            lease_id: lease.lease_id,
            prompt_id: lease.prompt_id,
            question: lease.question.clone(),
            prompt_tokens: lease.prompt_tokens.clone(),
            length_lo: lease.length_lo,
            length_hi: lease.length_hi,
            samples,
            actor_id: "test".into(),
            generate_seconds: 0.1,
            lease_key: lease.key,
        }),
        scores: (0..n)
            .map(|i| SampleScores {
                length: i as f64,
                total: i as f64,
                ..SampleScores::default()
            })
            .collect(),
        advantages: (0..n)
            .map(|i| if i % 2 == 0 { 1.0 } else { -1.0 })
            .collect(),
        reward_seconds: 0.0,
        reward_worker: reward_worker.into(),
    }
}

const TOKEN: &str = "test-token-123";

/// Registers a member of `role` over `channel`; returns its reply and a client that
/// carries its session secret.
async fn join(
    channel: &tonic::transport::Channel,
    role: Role,
    name: &str,
) -> (RegisterReply, LearnerConn) {
    let address = if role == Role::Reward {
        "127.0.0.1:1"
    } else {
        ""
    };
    let reply = learner_client(channel.clone(), TOKEN)
        .register(RegisterRequest {
            role: role as i32,
            name: name.into(),
            address: address.into(),
            relay_address: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let client = learner_client_in_session(channel.clone(), TOKEN, &reply.session);
    (reply, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_protocol_input_is_refused_counted_and_survived() {
    let job = TestJob::new(|t| {
        set(t, "sampling", "group_size", 2);
        set(t, "grpo", "prompts_per_step", 1);
        set(t, "grpo", "max_staleness", 1);
        set(t, "grpo", "steps", 1000);
    });
    let mut learner = job.start_learner(&[]);
    let addr = job.learner_addr(&mut learner);
    let channel = grpc_channel(&addr).await;

    let mut anonymous = LearnerClient::new(channel.clone());
    let refused = anonymous.status(StatusRequest {}).await.unwrap_err();
    assert_eq!(
        refused.code(),
        Code::Unauthenticated,
        "calls without the token are refused"
    );
    let mut wrong = LearnerClient::with_interceptor(channel.clone(), attach_token("not-the-token"));
    assert_eq!(
        wrong.status(StatusRequest {}).await.unwrap_err().code(),
        Code::Unauthenticated
    );

    let mut client = learner_client(channel.clone(), TOKEN);
    let err = client
        .lease(LeaseRequest {
            member_id: "actor-99".into(),
            max_groups: 1,
            version: 0,
        })
        .await
        .unwrap_err();
    assert!(
        err.message().contains("unknown member `actor-99`"),
        "{}",
        err.message()
    );
    let err = client
        .register(RegisterRequest {
            role: 0,
            name: "x".into(),
            address: String::new(),
            relay_address: String::new(),
        })
        .await
        .unwrap_err();
    assert!(
        err.message().contains("role must be actor or reward"),
        "{}",
        err.message()
    );

    let (actor, mut actor_client) = join(&channel, Role::Actor, "test").await;
    let member = actor.member_id.clone();
    let (reward, mut client) = join(&channel, Role::Reward, "scorer").await;
    let scorer = reward.member_id.clone();
    let lease = |mut client: LearnerConn, member: String, version: u64| async move {
        let reply = client
            .lease(LeaseRequest {
                member_id: member,
                max_groups: 1,
                version,
            })
            .await
            .unwrap();
        reply.into_inner().leases.remove(0)
    };
    let first = lease(actor_client.clone(), member.clone(), 0).await;
    let (probe, probe_client, vocab) = {
        let (reply, probe_client) = join(&channel, Role::Actor, "probe").await;
        let config: Value = serde_json::from_str(&reply.model_config_json).unwrap();
        (
            reply.member_id,
            probe_client,
            config["vocab_size"].as_i64().unwrap(),
        )
    };

    // Credentials: a member acts only as itself, in its role, and only the lease's holder
    // answers a lease; a rank's shard goes only to that rank.
    let beat = |member_id: &str| HeartbeatRequest {
        member_id: member_id.into(),
        ..HeartbeatRequest::default()
    };
    actor_client.heartbeat(beat(&member)).await.unwrap();
    let err = actor_client.heartbeat(beat(&probe)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("wrong session secret"), "{err:?}");
    let err = client.heartbeat(beat(&member)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let err = learner_client(channel.clone(), TOKEN)
        .heartbeat(beat(&member))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "no session: {err:?}");
    let err = client
        .lease(LeaseRequest {
            member_id: scorer.clone(),
            max_groups: 64,
            version: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("only actors"), "{err:?}");
    let err = actor_client
        .submit_scored(group(&first, 0, &member))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let mut forged = group(&first, 0, &scorer);
    forged.rollout.as_mut().unwrap().lease_key ^= 1;
    let err = client.submit_scored(forged).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("lease's key"), "{err:?}");
    // Leases: the holder renews them with its heartbeats (one it does not hold is named
    // lost) and gives back those it cannot answer; only actors give leases back.
    let reply = actor_client
        .heartbeat(HeartbeatRequest {
            held_leases: vec![first.lease_id, 424_242],
            ..beat(&member)
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.lost_leases, [424_242]);
    assert!(reply.lease_deadline_unix_ms > first.deadline_unix_ms);
    let given_back = lease(probe_client.clone(), probe.clone(), 0).await;
    let release = |ids: Vec<u64>, who: String| ReleaseRequest {
        member_id: who,
        lease_ids: ids,
        reason: "test".into(),
    };
    let mut releaser = probe_client.clone();
    let ids = vec![given_back.lease_id, first.lease_id];
    let reply = releaser
        .release_leases(release(ids.clone(), probe.clone()))
        .await;
    assert_eq!(
        reply.unwrap().into_inner().released,
        1,
        "only its own lease"
    );
    let reply = releaser.release_leases(release(ids, probe.clone())).await;
    assert_eq!(reply.unwrap().into_inner().released, 0);
    let err = client
        .release_leases(release(vec![first.lease_id], scorer.clone()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = client
        .get_shard(ShardRequest {
            rank: 1,
            step: 1,
            metrics: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let mut cases: Vec<(&str, ScoredGroup, String)> = Vec::new();
    let mut g = group(&first, 0, &scorer);
    g.rollout.as_mut().unwrap().lease_id = 987_654;
    cases.push((
        "unknown lease",
        g,
        "lease 987654 is unknown or has expired".into(),
    ));
    let mut g = group(&first, 0, &scorer);
    g.rollout.as_mut().unwrap().samples[1].tokens[2] = vocab;
    cases.push((
        "token id",
        g,
        format!("token id {vocab} is outside the vocabulary"),
    ));
    let mut g = group(&first, 0, &scorer);
    g.rollout.as_mut().unwrap().samples[0].logprobs.pop();
    cases.push(("log-prob length", g, "2 log-probs for 3 tokens".into()));
    let mut g = group(&first, 0, &scorer);
    g.scores[1].length = f64::NAN;
    cases.push(("NaN reward", g, "non-finite reward".into()));
    let mut g = group(&first, 0, &scorer);
    g.advantages[0] = f32::INFINITY;
    cases.push(("inf advantage", g, "non-finite advantage".into()));
    let mut g = group(&first, 0, &scorer);
    for s in &mut g.rollout.as_mut().unwrap().samples {
        s.version_last = 7;
    }
    cases.push((
        "future version",
        g,
        "versions 0..7 but the newest is 0".into(),
    ));
    let mut g = group(&first, 0, &scorer);
    g.rollout.as_mut().unwrap().samples.pop();
    cases.push(("group size", g, "1 samples, the group size is 2".into()));
    let mut g = group(&first, 0, &scorer);
    g.rollout.as_mut().unwrap().prompt_tokens.push(1);
    cases.push(("altered prompt", g, "prompt tokens differ".into()));
    for (what, bad, message) in cases {
        let err = client.submit_scored(bad).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{what}");
        assert!(
            err.message().contains(&message),
            "{what}: {}",
            err.message()
        );
    }

    // A request past the job's limit is refused from its length prefix.
    let mut huge = group(&first, 0, &scorer);
    huge.rollout.as_mut().unwrap().question = "x".repeat(quill_proto::rpc::SMALL_REQUEST_BYTES * 2);
    let err = client.submit_scored(huge).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(
        err.message().contains("message length too large"),
        "{err:?}"
    );

    // The good group is accepted once; a redelivery is a no-op, not a second count.
    let reply = client
        .submit_scored(group(&first, 0, &scorer))
        .await
        .unwrap()
        .into_inner();
    assert!(reply.accepted && !reply.duplicate);
    let reply = client
        .submit_scored(group(&first, 0, &scorer))
        .await
        .unwrap()
        .into_inner();
    assert!(!reply.accepted && reply.duplicate);

    // An actor still on version 0 takes a lease now, one step in (admission leaves room
    // for one group at its lag). The batch trained at version 1 keeps a slot for its group
    // until a submission under the lease is refused; then another actor's group moves the
    // policy to version 2, and the corrected version-0 group is too stale: the safety net
    // behind admission.
    let version_now = |mut client: LearnerConn| async move {
        let status = client.status(StatusRequest {}).await.unwrap().into_inner();
        serde_json::from_str::<Value>(&status.json).unwrap()
    };
    let started = Instant::now();
    while version_now(client.clone()).await["version"].as_u64() < Some(1) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the learner did not train"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stale = lease(actor_client.clone(), member.clone(), 0).await;
    let second = lease(probe_client.clone(), probe, 1).await;
    let mut broken = group(&stale, 0, &scorer);
    broken.scores[0].total = f64::NAN;
    let err = client.submit_scored(broken).await.unwrap_err();
    assert!(err.message().contains("non-finite reward"), "{err:?}");
    assert!(
        client
            .submit_scored(group(&second, 1, &scorer))
            .await
            .unwrap()
            .into_inner()
            .accepted
    );
    while version_now(client.clone()).await["version"].as_u64() < Some(2) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the learner did not train"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let err = client
        .submit_scored(group(&stale, 0, &scorer))
        .await
        .unwrap_err();
    assert!(
        err.message().contains("2 behind (max_staleness 1)"),
        "{}",
        err.message()
    );

    let err = client
        .get_weights(WeightsRequest {
            version: 0,
            offset: 5,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());

    let status = version_now(client.clone()).await;
    let rejected = &status["rejected"];
    assert_eq!(rejected["unknown_lease"], 1, "{status}");
    assert_eq!(rejected["token_out_of_vocab"], 1);
    assert_eq!(
        rejected["bad_logprob"].as_u64().unwrap_or(0) + rejected["malformed"].as_u64().unwrap(),
        3
    );
    assert_eq!(rejected["nan_reward"], 3);
    assert_eq!(rejected["future_version"], 1);
    assert_eq!(rejected["too_stale"], 1);
    assert_eq!(rejected["wrong_lease_key"], 1);
    assert_eq!(status["duplicate_groups"], 1);
    let refused = &status["refused_calls"];
    // Three heartbeats under another id or none, and a shard asked for without a rank's.
    assert_eq!(refused["wrong_session"], 4, "{status}");
    assert_eq!(refused["outside_role"], 3, "{status}");
    assert_eq!(status["leases_released"], 1, "{status}");
    assert_eq!(refused["wrong_token"], 2, "{status}");
    assert_eq!(status["accepted_groups"], 2);
    assert!(
        learner.child.try_wait().unwrap().is_none(),
        "the learner is still running"
    );
}
