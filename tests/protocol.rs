//! The learner's gRPC surface against bad input: a real learner process on loopback,
//! a hand-written client sending what a broken or hostile member might. Every bad call is
//! refused with a message that names the problem, counted, and the job keeps running.

mod support;

use quill_proto::auth::attach_token;
use quill_proto::learner_client::LearnerClient;
use quill_proto::{
    LeaseRequest, PromptLease, RegisterRequest, Role, RolloutGroup, Sample, SampleScores,
    ScoredGroup, StatusRequest, WeightsRequest,
};
use serde_json::Value;
use std::time::{Duration, Instant};
use support::job::{grpc_channel, set, TestJob};
use tonic::Code;

fn group(lease: &PromptLease, version: u64) -> ScoredGroup {
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
        reward_worker: "test".into(),
    }
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

    let mut client = LearnerClient::with_interceptor(channel, attach_token("test-token-123"));
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

    let member = client
        .register(RegisterRequest {
            role: Role::Actor as i32,
            name: "test".into(),
            address: String::new(),
            relay_address: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .member_id;
    let lease = |mut client: LearnerClient<_>, member: String, version: u64| async move {
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
    let first = lease(client.clone(), member.clone(), 0).await;
    let (probe, vocab) = {
        let reply = client
            .register(RegisterRequest {
                role: Role::Actor as i32,
                name: "probe".into(),
                address: String::new(),
                relay_address: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        let config: Value = serde_json::from_str(&reply.model_config_json).unwrap();
        (reply.member_id, config["vocab_size"].as_i64().unwrap())
    };

    let mut cases: Vec<(&str, ScoredGroup, String)> = Vec::new();
    let mut g = group(&first, 0);
    g.rollout.as_mut().unwrap().lease_id = 987_654;
    cases.push((
        "unknown lease",
        g,
        "lease 987654 is unknown or has expired".into(),
    ));
    let mut g = group(&first, 0);
    g.rollout.as_mut().unwrap().samples[1].tokens[2] = vocab;
    cases.push((
        "token id",
        g,
        format!("token id {vocab} is outside the vocabulary"),
    ));
    let mut g = group(&first, 0);
    g.rollout.as_mut().unwrap().samples[0].logprobs.pop();
    cases.push(("log-prob length", g, "2 log-probs for 3 tokens".into()));
    let mut g = group(&first, 0);
    g.scores[1].length = f64::NAN;
    cases.push(("NaN reward", g, "non-finite reward".into()));
    let mut g = group(&first, 0);
    g.advantages[0] = f32::INFINITY;
    cases.push(("inf advantage", g, "non-finite advantage".into()));
    let mut g = group(&first, 0);
    for s in &mut g.rollout.as_mut().unwrap().samples {
        s.version_last = 7;
    }
    cases.push((
        "future version",
        g,
        "versions 0..7 but the newest is 0".into(),
    ));
    let mut g = group(&first, 0);
    g.rollout.as_mut().unwrap().samples.pop();
    cases.push(("group size", g, "1 samples, the group size is 2".into()));
    let mut g = group(&first, 0);
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
    let mut huge = group(&first, 0);
    huge.rollout.as_mut().unwrap().question = "x".repeat(quill_proto::rpc::SMALL_REQUEST_BYTES * 2);
    let err = client.submit_scored(huge).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(
        err.message().contains("message length too large"),
        "{err:?}"
    );

    // The good group is accepted once; a redelivery is a no-op, not a second count.
    let reply = client
        .submit_scored(group(&first, 0))
        .await
        .unwrap()
        .into_inner();
    assert!(reply.accepted && !reply.duplicate);
    let reply = client
        .submit_scored(group(&first, 0))
        .await
        .unwrap()
        .into_inner();
    assert!(!reply.accepted && reply.duplicate);

    // An actor still on version 0 takes a lease now, one step in (admission leaves room
    // for one group at its lag). The batch trained at version 1 keeps a slot for its group
    // until a submission under the lease is refused; then another actor's group moves the
    // policy to version 2, and the corrected version-0 group is too stale: the safety net
    // behind admission.
    let version_now = |mut client: LearnerClient<_>| async move {
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
    let stale = lease(client.clone(), member.clone(), 0).await;
    let second = lease(client.clone(), probe, 1).await;
    let mut broken = group(&stale, 0);
    broken.scores[0].total = f64::NAN;
    let err = client.submit_scored(broken).await.unwrap_err();
    assert!(err.message().contains("non-finite reward"), "{err:?}");
    assert!(
        client
            .submit_scored(group(&second, 1))
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
    let err = client.submit_scored(group(&stale, 0)).await.unwrap_err();
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
    assert_eq!(status["duplicate_groups"], 1);
    assert_eq!(status["accepted_groups"], 2);
    assert!(
        learner.child.try_wait().unwrap().is_none(),
        "the learner is still running"
    );
}
