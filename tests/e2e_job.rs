//! Whole jobs as a user runs them: `quill launch local` starting a learner, an actor and a
//! reward worker as separate processes talking gRPC on loopback.

mod support;

use serde_json::{Map, Value};
use std::process::Command;
use std::time::Duration;
use support::job::{processes_mentioning, quill_bin, set, Proc, TestJob};

fn launch(job: &TestJob, extra: &[&str]) -> Proc {
    let mut command = Command::new(quill_bin());
    command
        .args(["launch", "local", "--config"])
        .arg(&job.config)
        .args(["--threads", "1"])
        .args(extra);
    Proc::spawn(
        command,
        &job.dir.path().join(format!("launch{}.log", extra.len())),
    )
}

fn field(record: &Map<String, Value>, key: &str) -> f64 {
    record
        .get(key)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("no {key} in {record:?}"))
}

#[test]
#[ignore = "slow tier: trains the default job to the end (minutes)"]
fn the_default_job_learns() {
    let job = TestJob::new(|_| {});
    let mut launcher = launch(&job, &[]);
    let status = launcher.wait(Duration::from_secs(1500));
    let log = launcher.log();
    assert!(status.success(), "{log}");
    job.no_process_left();
    assert!(
        log.contains("groups/s") && log.contains("tok/s"),
        "throughput lines are printed"
    );
    let steps = job.steps();
    let total = steps.len();
    assert!(total >= 30, "{total} steps recorded");
    let window = 8;
    let mean = |records: &[Map<String, Value>], key: &str| {
        records.iter().map(|r| field(r, key)).sum::<f64>() / records.len() as f64
    };
    let first = mean(&steps[..window], "reward_mean");
    let last = mean(&steps[total - window..], "reward_mean");
    assert!(last > first + 0.2, "mean reward {first:.3} -> {last:.3}");
    let first_in = mean(&steps[..window], "in_range_share");
    let last_in = mean(&steps[total - window..], "in_range_share");
    assert!(
        last_in > first_in,
        "in-range share {first_in:.3} -> {last_in:.3}"
    );
    let stale = field(&steps[total - 1], "stale_share");
    assert!(
        stale <= 0.02,
        "{stale:.3} of the groups were refused as stale"
    );
    let last_checkpoint = job.out().join(format!("checkpoints/step-{total:08}"));
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "optimizer.safetensors",
        "trainer_state.json",
    ] {
        assert!(
            last_checkpoint.join(file).exists(),
            "{file} missing from {}",
            last_checkpoint.display()
        );
    }
}

/// A job limited by epochs whose prompts do not fill the last batch (five prompts, two a
/// step) trains what is left and ends by itself, every prompt trained once.
#[test]
fn an_epoch_limited_job_with_a_partly_filled_last_batch_ends() {
    let job = TestJob::new(|t| {
        set(t, "grpo", "steps", 1000);
        set(t, "grpo", "prompts_per_step", 2);
        set(t, "grpo", "drop_zero_advantage_groups", false);
        set(t, "sampling", "max_new_tokens", 16);
        set(t, "data", "epochs", 1);
    });
    let lines: Vec<String> = ["sea", "moon", "city", "rain", "bread"]
        .iter()
        .map(|topic| format!(r#"{{"question": "Write about 20 words on the {topic}."}}"#))
        .collect();
    job.use_prompts(&lines);
    let mut launcher = launch(&job, &[]);
    let status = launcher.wait(Duration::from_secs(300));
    assert!(status.success(), "{}", launcher.log());
    job.no_process_left();
    let steps = job.steps();
    let groups: Vec<usize> = steps
        .iter()
        .map(|r| r["prompt_ids"].as_array().unwrap().len())
        .collect();
    assert_eq!(groups, vec![2, 2, 1], "the last batch is the partial one");
    let trained: std::collections::BTreeSet<u64> = steps
        .iter()
        .flat_map(|r| r["prompt_ids"].as_array().unwrap().clone())
        .map(|id| id.as_u64().unwrap())
        .collect();
    assert_eq!(trained.len(), 5, "every prompt trained once: {trained:?}");
    assert_eq!(field(&steps[2], "generated_groups_total"), 5.0);
}

/// Two actors share the pipeline under staleness-aware admission: nothing they generate
/// is refused as too stale, both contribute, and every prompt is trained exactly once
/// per epoch.
#[test]
fn two_actors_generate_nothing_too_stale_and_train_every_prompt_once_per_epoch() {
    let job = TestJob::new(|t| {
        set(t, "grpo", "steps", 1000);
        set(t, "grpo", "prompts_per_step", 2);
        set(t, "grpo", "max_staleness", 1);
        set(t, "grpo", "drop_zero_advantage_groups", false);
        set(t, "sampling", "max_new_tokens", 24);
        set(t, "data", "epochs", 2);
        set(t, "cluster", "leases_per_actor", 2);
    });
    let mut launcher = launch(&job, &["--actors", "2"]);
    let status = launcher.wait(Duration::from_secs(900));
    assert!(status.success(), "{}", launcher.log());
    job.no_process_left();
    let steps = job.steps();
    let last = steps.last().expect("steps were recorded");
    let generated = field(last, "generated_groups_total");
    let trained = field(last, "trained_groups_total");
    assert_eq!(
        generated, trained,
        "every generated group was trained: {last:?}"
    );
    assert_eq!(field(last, "stale_share"), 0.0, "{last:?}");
    assert_eq!(field(last, "discarded_token_share"), 0.0, "{last:?}");
    let mut per_prompt = std::collections::BTreeMap::<u64, u64>::new();
    let mut actors = std::collections::BTreeSet::new();
    for record in &steps {
        for id in record["prompt_ids"].as_array().unwrap() {
            *per_prompt.entry(id.as_u64().unwrap()).or_default() += 1;
        }
        actors.extend(
            record["groups_by_actor"]
                .as_object()
                .unwrap()
                .keys()
                .cloned(),
        );
    }
    assert_eq!(per_prompt.len(), 24, "every default prompt: {per_prompt:?}");
    assert!(
        per_prompt.values().all(|&n| n == 2),
        "each prompt once per epoch: {per_prompt:?}"
    );
    assert_eq!(actors.len(), 2, "both actors contributed: {actors:?}");
}

fn state(job: &TestJob, step: u64) -> Value {
    let path = job
        .out()
        .join(format!("checkpoints/step-{step:08}/trainer_state.json"));
    serde_json::from_str(
        &std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap()
}

/// The learner process of `job` (`quill learner …`, started by the launcher).
fn learner_pid(job: &TestJob) -> u32 {
    let needle = job.dir.path().display().to_string();
    processes_mentioning(&needle)
        .into_iter()
        .find(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            cmdline.split(|&b| b == 0).nth(1) == Some(b"learner".as_slice())
        })
        .expect("the learner runs")
}

#[test]
#[ignore = "slow tier: trains a job, stops it with SIGTERM and resumes it (two launches)"]
fn sigterm_checkpoints_and_resume_continues_version_data_cursor_and_optimizer() {
    let job = TestJob::new(|t| {
        set(t, "grpo", "steps", 1000);
        set(t, "checkpoint", "every_steps", 1000);
        set(t, "grpo", "prompts_per_step", 2);
    });
    let mut first = launch(&job, &[]);
    job.wait_for_steps(3, Duration::from_secs(300), &mut [&mut first]);
    // SAFETY: signalling a process of this test's job.
    unsafe {
        libc::kill(learner_pid(&job) as i32, libc::SIGTERM);
    }
    assert!(
        first.wait(Duration::from_secs(120)).success(),
        "{}",
        first.log()
    );
    assert!(
        first.log().contains("asked to stop (SIGTERM or SIGINT)"),
        "{}",
        first.log()
    );
    let stopped = job.steps().len() as u64;
    let at_stop = state(&job, stopped);
    assert_eq!(
        (at_stop["step"].as_u64(), at_stop["version"].as_u64()),
        (Some(stopped), Some(stopped)),
        "the final checkpoint is the last step: {at_stop}"
    );
    let cursor_at_stop = at_stop["extra"]["cursor"]["position"].as_u64().unwrap();

    let end = stopped + 2;
    let text = std::fs::read_to_string(&job.config)
        .unwrap()
        .replace("steps = 1000", &format!("steps = {end}"));
    std::fs::write(&job.config, text).unwrap();
    let mut second = launch(&job, &["--resume"]);
    assert!(
        second.wait(Duration::from_secs(600)).success(),
        "{}",
        second.log()
    );
    assert!(second.log().contains("resumed"), "{}", second.log());
    let at_end = state(&job, end);
    assert_eq!(
        (at_end["step"].as_u64(), at_end["version"].as_u64()),
        (Some(end), Some(end)),
        "{at_end}"
    );
    let cursor_at_end = at_end["extra"]["cursor"]["position"].as_u64().unwrap();
    let epoch_at_end = at_end["extra"]["cursor"]["epoch"].as_u64().unwrap();
    assert!(
        epoch_at_end > 0 || cursor_at_end > cursor_at_stop,
        "the data cursor moved on from {cursor_at_stop}: {at_end}"
    );
    let recorded: Vec<u64> = job
        .steps()
        .iter()
        .map(|r| field(r, "step") as u64)
        .collect();
    assert_eq!(
        recorded,
        (1..=end).collect::<Vec<_>>(),
        "the resumed run continues the step count"
    );
    let optimizer = job
        .out()
        .join(format!("checkpoints/step-{end:08}/optimizer.safetensors"));
    let bytes = std::fs::read(optimizer).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let step = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("step").cloned());
    assert_eq!(
        step.as_deref(),
        Some(end.to_string().as_str()),
        "AdamW's step count continued"
    );
    job.no_process_left();
}

#[test]
#[ignore = "slow tier: waits for a training step of a launched job (~1 min)"]
fn interrupting_the_launcher_stops_every_process() {
    let job = TestJob::new(|t| set(t, "grpo", "steps", 1000));
    let mut launcher = launch(&job, &[]);
    job.wait_for_steps(1, Duration::from_secs(300), &mut [&mut launcher]);
    let needle = job.dir.path().display().to_string();
    assert!(
        processes_mentioning(&needle).len() >= 3,
        "learner, actor and reward worker run"
    );
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(launcher.child.id() as i32, libc::SIGINT);
    }
    let status = launcher.wait(Duration::from_secs(30));
    assert!(!status.success());
    assert!(
        launcher
            .log()
            .contains("interrupted: stopping every process"),
        "{}",
        launcher.log()
    );
    job.no_process_left();
}

#[test]
fn bad_job_files_fail_at_start_naming_the_field() {
    let job = TestJob::new(|t| set(t, "grpo", "eps_low", 1.5));
    let out = Command::new(quill_bin())
        .args(["launch", "local", "--config"])
        .arg(&job.config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("grpo.eps_low: must be in [0, 1), got 1.5"),
        "{err}"
    );
    let job = TestJob::new(|t| set(t, "optimizer", "learning_rate", 0.1));
    let out = Command::new(quill_bin())
        .args(["learner", "--config"])
        .arg(&job.config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("optimizer.learning_rate: unknown field"),
        "{err}"
    );
    let out = Command::new(quill_bin())
        .args(["actor", "--learner", "127.0.0.1:1"])
        .env_remove("QUILL_TOKEN")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no job token"),
        "actors need the token"
    );
}
