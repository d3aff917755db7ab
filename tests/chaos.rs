//! Members die and stall while a 60-step job (2 prompts a step) runs: a reward worker and an actor are
//! killed with SIGKILL five times each (and started again), and the other actor is
//! stopped with SIGSTOP for twice the eviction time three times. The job still ends by
//! itself, every prompt is trained exactly once, and no lease is left open.

mod support;

use std::time::{Duration, Instant};
use support::job::{set, wait_until, Proc, TestJob};

const PROMPTS: u64 = 120;
const HEARTBEAT_SECONDS: f64 = 0.5;

/// Sends `signal` to a member process.
fn signal(proc: &Proc, signal: i32) {
    let pid = proc.child.id() as i32;
    // SAFETY: kill(2) on a child process this test started and has not reaped.
    assert_eq!(
        unsafe { libc::kill(pid, signal) },
        0,
        "kill({pid}, {signal})"
    );
}

#[test]
#[ignore = "slow tier: a training job whose members are killed and stopped (minutes)"]
fn killed_and_stalled_members_lose_no_prompt_and_train_none_twice() {
    let job = TestJob::new(|t| {
        set(t, "grpo", "steps", 1000);
        set(t, "grpo", "prompts_per_step", 2);
        set(t, "grpo", "max_staleness", 1000);
        set(t, "grpo", "drop_zero_advantage_groups", false);
        set(t, "sampling", "max_new_tokens", 48);
        set(t, "data", "epochs", 1);
        set(t, "cluster", "heartbeat_seconds", HEARTBEAT_SECONDS);
        set(t, "cluster", "lease_seconds", 20);
        set(t, "cluster", "rpc_timeout_seconds", 5.0);
    });
    let lines: Vec<String> = (0..PROMPTS)
        .map(|i| format!(r#"{{"question": "Write about topic {i}.", "length": 20}}"#))
        .collect();
    job.use_prompts(&lines);

    let mut learner = job.start_learner(&[]);
    let addr = job.learner_addr(&mut learner);
    let reward = |log: &str| job.start(log, &["reward", "--learner", &addr]);
    let actor = |log: &str| {
        job.start(
            log,
            &["actor", "--learner", &addr, "--threads", "1", "--name", log],
        )
    };
    let _steady_reward = reward("reward-steady");
    let steady_actor = actor("actor-steady");
    let mut doomed_reward = reward("reward-doomed-0");
    let mut doomed_actor = actor("actor-doomed-0");

    let steps = |job: &TestJob| job.steps().len();
    for round in 1..=5 {
        let before = steps(&job);
        wait_until(
            "a step between kills",
            Duration::from_secs(300),
            &mut [&mut learner],
            || (steps(&job) > before).then_some(()),
        );
        doomed_reward.child.kill().unwrap();
        doomed_actor.child.kill().unwrap();
        let _ = doomed_reward.child.wait();
        let _ = doomed_actor.child.wait();
        doomed_reward = reward(&format!("reward-doomed-{round}"));
        doomed_actor = actor(&format!("actor-doomed-{round}"));
        if (2..=4).contains(&round) {
            let evicted_after = HEARTBEAT_SECONDS * 5.0;
            signal(&steady_actor, libc::SIGSTOP);
            std::thread::sleep(Duration::from_secs_f64(evicted_after * 2.0));
            signal(&steady_actor, libc::SIGCONT);
        }
    }
    assert!(
        learner.child.try_wait().unwrap().is_none(),
        "every fault happened while the job ran"
    );

    let started = Instant::now();
    let status = learner.wait(Duration::from_secs(900));
    assert!(status.success(), "{}", learner.log());
    let log = learner.log();
    assert!(log.contains("its leases go back in line"), "{log}");
    assert!(log.contains("is back"), "a stopped actor came back: {log}");
    println!("the job ended {:?} after the last fault", started.elapsed());

    let trained = job.trained_prompt_ids();
    assert_eq!(
        trained,
        (0..PROMPTS).collect::<Vec<_>>(),
        "every prompt trained exactly once"
    );
    assert!(log.contains("job over: 0 leases open"), "{log}");
}
