//! The weight relay tree with real processes: a learner, a reward worker and three actors
//! on loopback with `cluster.relay_fanout = 1` (a chain). The learner sends about one copy
//! of each version, the other actors get theirs from actors; killing the middle actor
//! sends its child to another source and the job goes on. An actor's relay refuses bad
//! requests with clear gRPC errors.

mod support;

use quill_proto::auth::attach_token;
use quill_proto::learner_client::LearnerClient;
use quill_proto::weight_relay_client::WeightRelayClient;
use quill_proto::{StatusRequest, WeightsRequest};
use serde_json::Value;
use std::process::Command;
use std::time::{Duration, Instant};
use support::job::{grpc_channel, quill_bin, set, Proc, TestJob};
use tonic::transport::Channel;
use tonic::Code;

const TOKEN: &str = "test-token-123";

fn start(job: &TestJob, role: &str, addr: &str, name: &str) -> Proc {
    let mut command = Command::new(quill_bin());
    command
        .args([role, "--learner", addr, "--name", name, "--token-file"])
        .arg(&job.token);
    if role == "actor" {
        command.args(["--threads", "1"]);
    }
    Proc::spawn(command, &job.dir.path().join(format!("{name}.log")))
}

/// The learner's log, written by `TestJob::start_learner` (for failure messages).
fn learner_log() -> String {
    LOG.get()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .map(|t| t.lines().rev().take(40).collect::<Vec<_>>().join("\n"))
        .unwrap_or_default()
}

static LOG: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

async fn status(channel: &Channel) -> Value {
    let mut client = LearnerClient::with_interceptor(channel.clone(), attach_token(TOKEN));
    let reply = client
        .status(StatusRequest {})
        .await
        .unwrap_or_else(|e| panic!("status: {e}; learner log:\n{}", learner_log()))
        .into_inner();
    serde_json::from_str(&reply.json).unwrap()
}

fn actors(doc: &Value) -> Vec<Value> {
    doc["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "ROLE_ACTOR")
        .cloned()
        .collect()
}

fn by_name<'a>(actors: &'a [Value], name: &str) -> Option<&'a Value> {
    actors.iter().find(|m| m["name"] == name)
}

fn metric(member: &Value, key: &str) -> f64 {
    member["metrics"][key].as_f64().unwrap_or(0.0)
}

/// Polls the status until `done` holds, failing with the last status after `limit`.
async fn wait_for(channel: &Channel, limit: Duration, done: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    loop {
        let doc = status(channel).await;
        if done(&doc) {
            return doc;
        }
        assert!(started.elapsed() < limit, "timed out; last status: {doc:#}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The version a relay's NOT_FOUND answer says it holds ("holding 7, receiving none").
fn held_version(message: &str) -> Option<u64> {
    let rest = message.split("holding ").nth(1)?;
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Every actor in `names` runs version `v` or newer, synced from some source.
fn all_at(doc: &Value, names: &[&str], v: u64) -> bool {
    let list = actors(doc);
    names.iter().all(|n| {
        by_name(&list, n)
            .is_some_and(|m| m["version"].as_u64().unwrap_or(0) >= v && m["weight_source"] != "")
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_learner_sends_one_copy_and_a_dead_relay_is_routed_around() {
    let job = TestJob::new(|t| {
        set(t, "cluster", "relay_fanout", 1);
        set(t, "cluster", "weight_chunk_bytes", 65536);
        // Steps of a few seconds, longer than a heartbeat (0.5 s), as in real jobs.
        set(t, "sampling", "group_size", 4);
        set(t, "sampling", "max_new_tokens", 64);
        set(t, "grpo", "prompts_per_step", 2);
        set(t, "grpo", "max_staleness", 4);
        set(t, "grpo", "steps", 1000);
        set(t, "grpo", "drop_zero_advantage_groups", false);
        set(t, "cluster", "leases_per_actor", 1);
        set(t, "cluster", "actor_batch", 4);
    });
    let mut learner = job.start_learner(&[]);
    LOG.set(job.dir.path().join("learner.log")).unwrap();
    let addr = job.learner_addr(&mut learner);
    let channel = grpc_channel(&addr).await;
    let _reward = start(&job, "reward", &addr, "reward-0");
    let names = ["actor-a", "actor-b", "actor-c"];
    let mut procs = Vec::new();
    for name in names {
        procs.push(start(&job, "actor", &addr, name));
        // Join in a known order: each actor is in the tree before the next registers.
        wait_for(&channel, Duration::from_secs(120), |d| {
            by_name(&actors(d), name).is_some()
        })
        .await;
    }

    // Three new versions reach every actor.
    let doc = wait_for(&channel, Duration::from_secs(300), |d| {
        let v = d["version"].as_u64().unwrap_or(0);
        v >= 3 && all_at(d, &names, 3)
    })
    .await;
    let list = actors(&doc);
    let id = |name: &str| {
        by_name(&list, name).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let source = |name: &str| {
        by_name(&list, name).unwrap()["weight_source"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let logs: String = procs.iter().map(|p| p.log()).collect();
    assert_eq!(source("actor-a"), "learner", "{doc:#}\n{logs}");
    assert_eq!(source("actor-b"), id("actor-a"), "{logs}");
    assert_eq!(source("actor-c"), id("actor-b"), "{doc:#}");
    assert!(metric(by_name(&list, "actor-a").unwrap(), "relay_bytes_served") > 0.0);
    assert!(metric(by_name(&list, "actor-b").unwrap(), "relay_bytes_served") > 0.0);
    assert_eq!(
        metric(
            by_name(&list, "actor-c").unwrap(),
            "weight_bytes_from_learner"
        ),
        0.0
    );
    let blob = doc["weights"]["blob_bytes"].as_f64().unwrap();
    let served = doc["weights"]["served_bytes_by_version"]
        .as_object()
        .unwrap();
    let copies: f64 = served.values().map(|b| b.as_f64().unwrap()).sum::<f64>() / blob;
    assert!(
        copies <= 1.5 * served.len() as f64,
        "the learner sent {copies:.2} copies for {} versions: {doc:#}",
        served.len()
    );
    let relayed: f64 = list
        .iter()
        .map(|m| metric(m, "weight_bytes_from_relays"))
        .sum();
    assert!(relayed >= 2.0 * blob, "{doc:#}");

    // The actors' relays refuse bad requests clearly.
    let relay_addr = by_name(&list, "actor-a").unwrap()["relay_address"]
        .as_str()
        .unwrap()
        .to_owned();
    let relay_channel = grpc_channel(&relay_addr).await;
    let mut anonymous = WeightRelayClient::new(relay_channel.clone());
    let err = anonymous
        .get_weights(WeightsRequest {
            version: 1,
            offset: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let mut relay = WeightRelayClient::with_interceptor(relay_channel, attach_token(TOKEN));
    let err = relay
        .get_weights(WeightsRequest {
            version: 999,
            offset: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        err.message().contains("version 999 is not held"),
        "{}",
        err.message()
    );
    // The held version moves on with training: ask the relay what it holds (its answer to
    // version 0 says), then ask for that version past its end, until one lands in between.
    let mut err = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    while err.is_none() && Instant::now() < deadline {
        let which = relay
            .get_weights(WeightsRequest {
                version: 0,
                offset: 0,
            })
            .await
            .unwrap_err();
        let Some(held) = held_version(which.message()) else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let past = relay
            .get_weights(WeightsRequest {
                version: held,
                offset: 1 << 40,
            })
            .await;
        let e = match past {
            Err(e) => e,
            Ok(stream) => stream.into_inner().message().await.unwrap_err(),
        };
        if e.code() != Code::NotFound {
            err = Some(e);
        }
    }
    let err = err.expect("the relay always answered NOT_FOUND");
    assert_eq!(err.code(), Code::OutOfRange, "{}", err.message());
    assert!(err.message().contains("past the end"), "{}", err.message());

    // Kill the middle of the chain: actor-c fetches from another source, the job goes on.
    let killed = id("actor-b");
    drop(procs.remove(1));
    let v_kill = status(&channel).await["version"].as_u64().unwrap();
    let doc = wait_for(&channel, Duration::from_secs(300), |d| {
        all_at(d, &["actor-a", "actor-c"], v_kill + 2)
    })
    .await;
    let list = actors(&doc);
    let c = by_name(&list, "actor-c").unwrap();
    assert_ne!(c["weight_source"], killed.as_str(), "{doc:#}");
    assert!(by_name(&list, "actor-b").is_none() || doc["version"].as_u64() > Some(v_kill));
    for p in &mut procs {
        assert!(p.child.try_wait().unwrap().is_none(), "{}", p.log());
    }
}
