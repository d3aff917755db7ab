//! Actors join and leave a running job at will: one started mid-run gets the current
//! weights and contributes; one killed mid-run loses no prompt (its leases are issued
//! again), and every prompt of the data is trained exactly once. There are enough prompts
//! that the killed actor still holds leases: the job cannot end until they are re-issued.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;
use support::job::{set, wait_until, TestJob};

const PROMPTS: u64 = 48;

/// Groups trained so far per actor member id.
fn groups_by_actor(job: &TestJob) -> BTreeMap<String, u64> {
    let mut total = BTreeMap::new();
    for record in job.steps() {
        for (actor, n) in record["groups_by_actor"].as_object().unwrap() {
            *total.entry(actor.clone()).or_default() += n.as_u64().unwrap();
        }
    }
    total
}

#[test]
fn an_actor_joins_mid_run_and_a_killed_one_loses_no_prompt() {
    let job = TestJob::new(|t| {
        set(t, "grpo", "steps", 1000);
        set(t, "grpo", "prompts_per_step", 2);
        set(t, "grpo", "max_staleness", 1000);
        set(t, "grpo", "drop_zero_advantage_groups", false);
        set(t, "sampling", "max_new_tokens", 40);
        set(t, "data", "epochs", 1);
    });
    let lines: Vec<String> = (0..PROMPTS)
        .map(|i| format!(r#"{{"question": "Write about topic {i}.", "length": 30}}"#))
        .collect();
    job.use_prompts(&lines);

    let mut learner = job.start_learner(&[]);
    let addr = job.learner_addr(&mut learner);
    let _reward = job.start("reward", &["reward", "--learner", &addr]);
    let actor = |log: &str, name: &str| {
        let args = [
            "actor",
            "--learner",
            &addr,
            "--threads",
            "1",
            "--name",
            name,
        ];
        job.start(log, &args)
    };
    let mut first = actor("actor-a", "first");
    job.wait_for_steps(1, Duration::from_secs(300), &mut [&mut learner]);
    let first_id = groups_by_actor(&job).into_keys().next().unwrap();
    // A second actor joins the running job and contributes.
    let _second = actor("actor-b", "second");
    wait_until(
        "groups from the second actor",
        Duration::from_secs(600),
        &mut [&mut learner],
        || (groups_by_actor(&job).len() >= 2).then_some(()),
    );
    assert!(
        job.dir.path().join("actor-b.log").exists()
            && std::fs::read_to_string(job.dir.path().join("actor-b.log"))
                .unwrap()
                .contains("actor joined"),
    );
    // The first actor dies holding leases; the job goes on and ends with the data.
    first.child.kill().unwrap();
    let status = learner.wait(Duration::from_secs(900));
    assert!(status.success(), "{}", learner.log());
    let log = learner.log();
    assert!(log.contains("no more prompts"), "{log}");
    assert!(log.contains("its leases go back in line"), "{log}");

    let trained = job.trained_prompt_ids();
    assert_eq!(
        trained,
        (0..PROMPTS).collect::<Vec<_>>(),
        "every prompt trained exactly once"
    );
    let by_actor = groups_by_actor(&job);
    assert_eq!(by_actor.len(), 2, "{by_actor:?}");
    assert!(by_actor[&first_id] >= 1, "{by_actor:?}");
    assert_eq!(by_actor.values().sum::<u64>(), PROMPTS);
}
