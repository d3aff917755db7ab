//! The data-parallel learner as real processes: `quill learner --rank R --world-size K`
//! ranks joined over gRPC and a TCP ring on loopback, with an actor and a reward worker.
//! (That K ranks take the same steps as one rank on the same global batches is checked
//! in-process with the same ring in `learner/src/grad_sync.rs`, and for the sharded
//! optimiser, gradients and weights in `learner/src/train/shard.rs`.)

mod support;

use serde_json::Value;
use std::time::{Duration, Instant};
use support::job::{set, wait_until, Proc, TestJob};

fn last_step(job: &TestJob) -> u64 {
    job.steps()
        .last()
        .and_then(|r| r.get("step").and_then(Value::as_u64))
        .unwrap_or(0)
}

/// A job for `world` learner ranks with a short collective timeout.
fn ranks_job(steps: u64, timeout: f64) -> TestJob {
    ranks_job_with(steps, timeout, |_| {})
}

/// [`ranks_job`] with more settings.
fn ranks_job_with(steps: u64, timeout: f64, more: impl Fn(&mut toml::Table)) -> TestJob {
    TestJob::new(|t| {
        set(t, "grpo", "steps", steps as i64);
        set(t, "grpo", "prompts_per_step", 3);
        set(t, "sampling", "max_new_tokens", 48);
        set(t, "checkpoint", "every_steps", 2);
        set(t, "parallel", "collective", "ring");
        set(t, "parallel", "timeout_seconds", timeout);
        set(t, "parallel", "check_every_steps", 1);
        more(t);
    })
}

/// Starts rank 0, ranks 1.., a reward worker and an actor; returns them with rank 0 first.
fn start_job(job: &TestJob, world: usize, resume: bool, tag: &str) -> (Vec<Proc>, Vec<Proc>) {
    let config = job.config.display().to_string();
    let world_arg = world.to_string();
    let mut args = vec![
        "learner",
        "--config",
        &config,
        "--threads",
        "1",
        "--world-size",
        &world_arg,
    ];
    if resume {
        args.push("--resume");
    }
    let _ = std::fs::remove_file(job.out().join("learner.addr"));
    let mut rank0 = job.start(&format!("rank0-{tag}"), &args);
    let addr = job.learner_addr(&mut rank0);
    let mut ranks = vec![rank0];
    for rank in 1..world {
        let r = rank.to_string();
        ranks.push(job.start(
            &format!("rank{rank}-{tag}"),
            &[
                "learner",
                "--config",
                &config,
                "--threads",
                "1",
                "--rank",
                &r,
                "--world-size",
                &world_arg,
                "--learner",
                &addr,
            ],
        ));
    }
    let members = vec![
        job.start(&format!("reward-{tag}"), &["reward", "--learner", &addr]),
        job.start(
            &format!("actor-{tag}"),
            &["actor", "--learner", &addr, "--threads", "1"],
        ),
    ];
    (ranks, members)
}

fn wait_for_step(job: &TestJob, step: u64, procs: &mut [Proc]) {
    let mut procs: Vec<&mut Proc> = procs.iter_mut().collect();
    wait_until(
        &format!("step {step}"),
        Duration::from_secs(600),
        &mut procs,
        || (last_step(job) >= step).then_some(()),
    );
}

#[test]
#[ignore = "slow tier: trains a job with two learner ranks (minutes)"]
fn two_learner_ranks_train_in_lockstep() {
    let job = ranks_job(4, 60.0);
    let mut command = std::process::Command::new(support::job::quill_bin());
    command
        .args([
            "launch",
            "local",
            "--learner-ranks",
            "2",
            "--threads",
            "1",
            "--config",
        ])
        .arg(&job.config);
    let mut launcher = Proc::spawn(command, &job.dir.path().join("launch.log"));
    // `quill status` lists both ranks with their own step metrics once rank 1 reported.
    let addr = job.learner_addr(&mut launcher);
    let token = job.out().join("job.token").display().to_string();
    let mut seen = None;
    while seen.is_none() && launcher.child.try_wait().unwrap().is_none() {
        let out = std::process::Command::new(support::job::quill_bin())
            .args([
                "status",
                "--learner",
                addr.trim(),
                "--token-file",
                &token,
                "--json",
            ])
            .output()
            .unwrap();
        if let Ok(doc) = serde_json::from_slice::<Value>(&out.stdout) {
            let ranks = doc["ranks"].as_array().cloned().unwrap_or_default();
            if ranks.len() == 2 {
                seen = Some(ranks);
            }
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let seen = seen.expect("quill status never listed 2 ranks");
    assert_eq!(seen[1]["rank"], 1, "{seen:?}");
    assert!(seen[1]["tokens_per_s"].as_f64().unwrap() > 0.0, "{seen:?}");
    assert!(seen[1]["step_seconds"].as_f64().unwrap() > 0.0, "{seen:?}");
    let status = launcher.wait(Duration::from_secs(900));
    let log = launcher.log();
    assert!(status.success(), "{log}");
    assert!(log.contains("rank 0 finished training"), "{log}");
    let records = job.steps();
    assert_eq!(records.len(), 4);
    for r in &records {
        assert_eq!(r["learner_ranks"], 2, "{r:?}");
        let spread = r["rank_weight_spread"].as_f64().unwrap();
        assert!(spread <= 1e-6, "ranks drifted apart: {r:?}");
        assert!(r["grad_norm"].as_f64().unwrap().is_finite());
    }
    assert_eq!(records[3]["version"], 4);
}

#[test]
#[ignore = "slow tier: trains a job with two learner ranks (minutes)"]
fn a_stopped_or_dead_learner_rank_stops_the_others_and_the_job_resumes() {
    let timeout = 8.0;
    let job = ranks_job(8, timeout);
    // Rank 1 stops (SIGSTOP: alive, silent): rank 0 fails with an error naming it, within
    // the timeout.
    let (mut ranks, mut members) = start_job(&job, 2, false, "a");
    wait_for_step(&job, 3, &mut ranks);
    // SAFETY: kill(2) on a child process this test started and has not reaped.
    assert_eq!(
        unsafe { libc::kill(ranks[1].child.id() as i32, libc::SIGSTOP) },
        0
    );
    let stopped = Instant::now();
    let status = ranks[0].wait(Duration::from_secs_f64(timeout + 60.0));
    let log = ranks[0].log();
    assert!(!status.success(), "{log}");
    assert!(log.contains("learner rank 1"), "{log}");
    assert!(
        stopped.elapsed() < Duration::from_secs_f64(timeout + 30.0),
        "rank 0 took {:?} to stop: {log}",
        stopped.elapsed()
    );
    drop(members.drain(..));
    drop(ranks.drain(..));
    let reached = last_step(&job);
    assert!(job.out().join("checkpoints").exists());

    // Resumed; then rank 0 dies: rank 1 fails with an error naming rank 0.
    let (mut ranks, mut members) = start_job(&job, 2, true, "b");
    wait_for_step(&job, reached + 1, &mut ranks);
    ranks[0].child.kill().unwrap();
    let status = ranks[1].wait(Duration::from_secs_f64(timeout + 60.0));
    let log = ranks[1].log();
    assert!(!status.success(), "{log}");
    assert!(log.contains("rank 0"), "{log}");
    drop(members.drain(..));

    // Resumed again, it trains to the end.
    let (mut ranks, _members) = start_job(&job, 2, true, "c");
    for rank in ranks.iter_mut() {
        let status = rank.wait(Duration::from_secs(900));
        assert!(status.success(), "{}", rank.log());
    }
    assert!(ranks[0].log().contains("resumed"), "{}", ranks[0].log());
    assert_eq!(last_step(&job), 8);
}

#[test]
#[ignore = "slow tier: trains and resumes a sharded job with two learner ranks (minutes)"]
fn sharded_ranks_resume_and_checkpoint_a_model_transformers_loads() {
    // Long enough for rank 1 to load and join on a busy machine.
    let timeout = 30.0;
    let steps = 6;
    // ZeRO-3: every rank takes part in gathering the layers' weights for each
    // publication and checkpoint (ZeRO-1/2's in-process resume is in train::checkpoint).
    let job = ranks_job_with(steps, timeout, |t| set(t, "grpo", "sharding", "zero3"));
    let (mut ranks, mut members) = start_job(&job, 2, false, "a");
    wait_for_step(&job, 3, &mut ranks);
    ranks[1].child.kill().unwrap();
    let status = ranks[0].wait(Duration::from_secs_f64(timeout + 60.0));
    assert!(!status.success(), "{}", ranks[0].log());
    drop(members.drain(..));

    let (mut ranks, _members) = start_job(&job, 2, true, "b");
    for rank in ranks.iter_mut() {
        let status = rank.wait(Duration::from_secs(900));
        assert!(status.success(), "{}", rank.log());
    }
    assert!(ranks[0].log().contains("resumed"), "{}", ranks[0].log());
    assert_eq!(last_step(&job), steps);
    let root = job.out().join("checkpoints");
    let last = root.join(format!("step-{steps:08}"));
    assert!(last.join("sharding.json").exists() && !last.join("optimizer.safetensors").exists());
    for rank in 0..2 {
        let shard = root
            .join(format!("step-{steps:08}.shards"))
            .join(format!("rank-{rank:05}-of-00002.safetensors"));
        assert!(shard.is_file(), "{} is missing", shard.display());
    }

    // The full model in the checkpoint: transformers computes quill's logits from it.
    let model = quill_model::Qwen2::load(&last, tch::Device::Cpu, tch::Kind::Float).unwrap();
    let rows: Vec<Vec<i64>> = vec![(1..20).collect(), (40..59).collect()];
    let input_json = job.dir.path().join("input.json");
    std::fs::write(&input_json, serde_json::to_string(&rows).unwrap()).unwrap();
    let out = job.dir.path().join("logits.safetensors");
    support::run_reference(&[
        "logits".as_ref(),
        last.as_os_str(),
        input_json.as_os_str(),
        out.as_os_str(),
    ]);
    let theirs = tch::Tensor::read_safetensors(&out).unwrap().remove(0).1;
    let input = tch::Tensor::from_slice2(&rows);
    let ours = tch::no_grad(|| model.logits(&input));
    let diff = support::max_abs_diff(&ours, &theirs);
    // The same f32 model in two implementations (the model parity tests' bound).
    assert!(diff <= 1e-4, "transformers differs from quill by {diff}");
}

#[test]
fn bad_rank_flags_are_refused() {
    let job = ranks_job(2, 10.0);
    let config = job.config.display().to_string();
    let run = |args: &[&str]| {
        let mut full = vec!["learner", "--config", &config];
        full.extend_from_slice(args);
        let mut p = job.start("bad", &full);
        let status = p.wait(Duration::from_secs(60));
        assert!(!status.success());
        p.log()
    };
    assert!(
        run(&["--rank", "2", "--world-size", "2"]).contains("--rank 2 is outside --world-size 2")
    );
    assert!(run(&["--rank", "1", "--world-size", "2"]).contains("needs --learner"));
    assert!(run(&["--world-size", "0"]).contains("--world-size must be at least 1"));
    // A rank whose world size differs from rank 0's is refused by rank 0.
    let mut rank0 = job.start(
        "rank0",
        &[
            "learner",
            "--config",
            &config,
            "--world-size",
            "2",
            "--threads",
            "1",
        ],
    );
    let addr = job.learner_addr(&mut rank0);
    let log = run(&["--rank", "1", "--world-size", "3", "--learner", &addr]);
    assert!(log.contains("--world-size 3, rank 0 with 2"), "{log}");
    let log = run(&[
        "--rank",
        "1",
        "--world-size",
        "2",
        "--learner",
        "127.0.0.1:9",
    ]);
    assert!(log.contains("rank 0 at 127.0.0.1:9"), "{log}");
}
