//! Members die and stall while a 60-step job (2 prompts a step) runs: a reward worker and an actor are
//! killed with SIGKILL five times each (and started again), and the other actor is
//! stopped with SIGSTOP for twice the eviction time three times. The job still ends by
//! itself, every prompt is trained exactly once, and no lease is left open.

mod support;

use quill_proto::rpc::{learner_client, learner_client_in_session};
use quill_proto::{HeartbeatRequest, LeaseRequest, RegisterRequest, Role};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::job::{grpc_channel, set, wait_until, Proc, TestJob};

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

/// Whether a checkpoint folder's name is a finished checkpoint's (`step-NNNNNNNN`).
fn finished(name: &str) -> bool {
    name.strip_prefix("step-")
        .is_some_and(|digits| digits.len() == 8 && digits.bytes().all(|b| b.is_ascii_digit()))
}

/// The checkpoint directories of `job` (`step-NNNNNNNN`) and anything else left beside them.
fn checkpoint_entries(job: &TestJob) -> Vec<String> {
    entries_in(&job.out().join("checkpoints"))
}

/// The names in a checkpoint folder, sorted.
fn entries_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|dir| {
            dir.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The prompts a checkpoint holds as not yet trained (leased, queued or ingested).
fn outstanding(job: &TestJob, entry: &str) -> Option<usize> {
    let path = job
        .out()
        .join("checkpoints")
        .join(entry)
        .join("trainer_state.json");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    Some(state["extra"]["outstanding"].as_array()?.len())
}

/// Every file of every finished checkpoint in `checkpoints` with its bytes, to show that a
/// failed write left them alone.
fn checkpoint_bytes(checkpoints: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    for entry in entries_in(checkpoints).into_iter().filter(|e| finished(e)) {
        let dir = checkpoints.join(&entry);
        for file in std::fs::read_dir(&dir).unwrap().flatten() {
            let name = format!("{entry}/{}", file.file_name().to_string_lossy());
            files.push((name, std::fs::read(file.path()).unwrap()));
        }
    }
    files.sort();
    files
}

/// The prompt ids trained over several launches of one job, counting for each step only
/// its last record (steps after the checkpoint a launch resumed from are trained again).
fn prompts_of_surviving_steps(job: &TestJob) -> Vec<u64> {
    let mut by_step = std::collections::BTreeMap::new();
    for record in job.steps() {
        by_step.insert(
            record["step"].as_u64().unwrap(),
            record["prompt_ids"].clone(),
        );
    }
    let mut ids: Vec<u64> = by_step
        .values()
        .flat_map(|ids| ids.as_array().unwrap().clone())
        .map(|v| v.as_u64().unwrap())
        .collect();
    ids.sort_unstable();
    ids
}

#[test]
#[ignore = "slow tier: a job whose learner is killed, then runs out of disk, then resumes (minutes)"]
fn a_killed_learner_and_a_failed_checkpoint_lose_no_prompt() {
    const PROMPTS: u64 = 40;
    let job = TestJob::new(|t| {
        set(t, "grpo", "steps", 1000);
        set(t, "grpo", "prompts_per_step", 2);
        set(t, "grpo", "max_staleness", 4);
        set(t, "grpo", "drop_zero_advantage_groups", false);
        set(t, "sampling", "max_new_tokens", 32);
        set(t, "data", "epochs", 1);
        set(t, "checkpoint", "every_steps", 3);
        set(t, "checkpoint", "keep", 10);
    });
    let lines: Vec<String> = (0..PROMPTS)
        .map(|i| format!(r#"{{"question": "Write about topic {i}.", "length": 20}}"#))
        .collect();
    job.use_prompts(&lines);
    let members = |learner: &mut Proc, tag: &str| {
        let addr = job.learner_addr(learner);
        let _ = std::fs::remove_file(job.out().join("learner.addr"));
        vec![
            job.start(&format!("reward-{tag}"), &["reward", "--learner", &addr]),
            job.start(
                &format!("actor-a-{tag}"),
                &["actor", "--learner", &addr, "--threads", "1"],
            ),
            job.start(
                &format!("actor-b-{tag}"),
                &["actor", "--learner", &addr, "--threads", "1"],
            ),
        ]
    };

    // 1. SIGKILL the learner as soon as a checkpoint holds prompts that were handed out or
    // queued but not trained (more than a step's worth).
    let mut learner = job.start_learner(&[]);
    let first_members = members(&mut learner, "1");
    let killed_at = wait_until(
        "a checkpoint with a full queue",
        Duration::from_secs(300),
        &mut [&mut learner],
        || {
            checkpoint_entries(&job)
                .into_iter()
                .filter(|e| finished(e))
                .find(|e| outstanding(&job, e).is_some_and(|n| n > 2))
        },
    );
    learner.child.kill().unwrap();
    let _ = learner.child.wait();
    drop(first_members);
    println!("killed after {killed_at}");

    // 2. Resumed onto a full disk: the learner stops naming the file and the cause, and
    // the earlier checkpoints are untouched, with no scratch folder left beside them.
    let checkpoints = job.out().join("checkpoints");
    let before = checkpoint_bytes(&checkpoints);
    let entries_before = entries_in(&checkpoints);
    let disk = FullDisk::new(&job);
    let mut learner = Proc::spawn(disk.command(&job), &job.dir.path().join("learner-full.log"));
    let second_members = members(&mut learner, "2");
    let status = learner.wait(Duration::from_secs(300));
    let log = learner.log();
    println!("full disk: {}", disk.kind());
    assert!(!status.success(), "{log}");
    assert!(
        log.contains(disk.cause()) && log.contains("checkpoints/"),
        "the error names the file and the cause: {log}"
    );
    drop(second_members);
    let after = disk.checkpoints_after(&job);
    assert_eq!(
        checkpoint_bytes(&after),
        before,
        "the failed write left every earlier checkpoint as it was"
    );
    let left = entries_in(&after);
    assert!(
        left.iter().all(|e| entries_before.contains(e)),
        "the failed write left no scratch folder: {left:?} (before: {entries_before:?})"
    );

    // 3. Resumed again, it trains to the end of the epoch: every prompt exactly once.
    let mut learner = job.start_learner(&["--resume"]);
    let _last_members = members(&mut learner, "3");
    let status = learner.wait(Duration::from_secs(600));
    assert!(status.success(), "{}", learner.log());
    assert!(learner.log().contains("resumed"), "{}", learner.log());
    assert!(
        checkpoint_entries(&job).iter().all(|e| finished(e)),
        "scratch folders of the killed learner were cleared: {:?}",
        checkpoint_entries(&job)
    );
    assert_eq!(
        prompts_of_surviving_steps(&job),
        (0..PROMPTS).collect::<Vec<_>>(),
        "every prompt trained exactly once over the three launches"
    );
    job.no_process_left();
}

/// A learner run whose checkpoint folder has too little room for one more checkpoint:
/// a tmpfs mounted over it in a user and mount namespace of the learner's own (`ENOSPC`,
/// a real full disk) where this machine allows one, else a file-size limit below the size
/// of a checkpoint's model file (`EFBIG`, the same failed `write` calls).
enum FullDisk {
    /// A tmpfs holding a copy of the checkpoints and half a model file of free room; it is
    /// copied to `after` when the learner has exited.
    Tmpfs { size: u64, after: PathBuf },
    /// `ulimit -f` below a model file.
    FileSizeLimit,
}

impl FullDisk {
    fn new(job: &TestJob) -> Self {
        let probe = job.dir.path().join("mount-probe");
        std::fs::create_dir_all(&probe).unwrap();
        let tmpfs = Command::new("unshare")
            .args(["--user", "--map-root-user", "--mount", "sh", "-c"])
            .arg(r#"mount -t tmpfs -o size=64k tmpfs "$0""#)
            .arg(&probe)
            .output()
            .is_ok_and(|out| out.status.success());
        if !tmpfs {
            return FullDisk::FileSizeLimit;
        }
        let checkpoints = job.out().join("checkpoints");
        let mut used = 0;
        let mut model = 0;
        for entry in entries_in(&checkpoints) {
            for file in std::fs::read_dir(checkpoints.join(&entry))
                .unwrap()
                .flatten()
            {
                let len = file.metadata().unwrap().len();
                used += len.div_ceil(4096) * 4096 + 4096;
                if file.file_name() == "model.safetensors" {
                    model = len;
                }
            }
            used += 4096;
        }
        assert!(model > 0, "a finished checkpoint has a model file");
        FullDisk::Tmpfs {
            size: (used + model / 2).div_ceil(4096) * 4096,
            after: job.dir.path().join("checkpoints-after"),
        }
    }

    /// What the test names in its output.
    fn kind(&self) -> &'static str {
        match self {
            FullDisk::Tmpfs { .. } => "a tmpfs with room for less than a checkpoint (ENOSPC)",
            FullDisk::FileSizeLimit => {
                "no tmpfs in a user namespace here: a file-size limit below a model file (EFBIG)"
            }
        }
    }

    /// The error text of the failed write.
    fn cause(&self) -> &'static str {
        match self {
            FullDisk::Tmpfs { .. } => "No space left on device",
            FullDisk::FileSizeLimit => "File too large",
        }
    }

    /// `quill learner --resume` of `job` on the full disk.
    fn command(&self, job: &TestJob) -> Command {
        let checkpoints = job.out().join("checkpoints");
        let mut command = match self {
            FullDisk::Tmpfs { size, after } => {
                let mut command = Command::new("unshare");
                command
                    .args(["--user", "--map-root-user", "--mount", "sh", "-c"])
                    .arg(
                        r#"ckpt="$0"; keep="$1.keep"; after="$1"; size="$2"; shift 2
cp -a "$ckpt" "$keep" && mount -t tmpfs -o size="$size" tmpfs "$ckpt" && cp -a "$keep"/. "$ckpt"/ || exit 97
"$@"; rc=$?
cp -a "$ckpt" "$after" || exit 98
exit $rc"#,
                    )
                    .arg(&checkpoints)
                    .arg(after)
                    .arg(size.to_string());
                command
            }
            FullDisk::FileSizeLimit => {
                let mut command = Command::new("sh");
                command.args(["-c", r#"ulimit -f 2048; trap "" XFSZ; exec "$0" "$@""#]);
                command
            }
        };
        command
            .arg(support::job::quill_bin())
            .args(["learner", "--config"])
            .arg(&job.config)
            .arg("--token-file")
            .arg(&job.token)
            .args(["--threads", "1", "--resume"]);
        command
    }

    /// Where the checkpoints are as the learner left them.
    fn checkpoints_after(&self, job: &TestJob) -> PathBuf {
        match self {
            FullDisk::Tmpfs { after, .. } => after.clone(),
            FullDisk::FileSizeLimit => job.out().join("checkpoints"),
        }
    }
}

/// A client that registers as an actor, leases prompts, names them in every heartbeat so
/// they are renewed, and never delivers a group. Returns the status that refused it more
/// leases (`None` if `stop` came first).
async fn hoard(addr: String, stop: Arc<AtomicBool>) -> Option<tonic::Status> {
    let channel = grpc_channel(&addr).await;
    let joined = learner_client(channel.clone(), "test-token-123")
        .register(RegisterRequest {
            role: Role::Actor as i32,
            name: "hoarder".into(),
            address: String::new(),
            relay_address: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut client = learner_client_in_session(channel, "test-token-123", &joined.session);
    let mut held: Vec<u64> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let beat = client
            .heartbeat(HeartbeatRequest {
                member_id: joined.member_id.clone(),
                held_leases: held.clone(),
                ..HeartbeatRequest::default()
            })
            .await
            .ok()?
            .into_inner();
        held.retain(|id| !beat.lost_leases.contains(id));
        let leased = client
            .lease(LeaseRequest {
                member_id: joined.member_id.clone(),
                max_groups: 8,
                version: beat.latest_version,
            })
            .await;
        match leased {
            Ok(reply) => held.extend(reply.into_inner().leases.iter().map(|l| l.lease_id)),
            Err(status) if status.code() == tonic::Code::FailedPrecondition => return Some(status),
            Err(_) => return None,
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    None
}

#[test]
#[ignore = "slow tier: a training job beside a broken actor and a hoarding client (a minute)"]
fn a_broken_engine_and_a_hoarder_leave_every_prompt_to_the_healthy_actors() {
    const PROMPTS: u64 = 24;
    let job = TestJob::new(|t| {
        set(t, "grpo", "steps", 1000);
        set(t, "grpo", "prompts_per_step", 2);
        set(t, "grpo", "max_staleness", 2);
        set(t, "grpo", "drop_zero_advantage_groups", false);
        set(t, "sampling", "max_new_tokens", 32);
        set(t, "data", "epochs", 1);
        set(t, "cluster", "lease_seconds", 2);
        set(t, "cluster", "max_lease_seconds", 4);
    });
    let lines: Vec<String> = (0..PROMPTS)
        .map(|i| format!(r#"{{"question": "Write about topic {i}.", "length": 20}}"#))
        .collect();
    job.use_prompts(&lines);
    let mut learner = job.start_learner(&[]);
    let addr = job.learner_addr(&mut learner);
    let actor = |name: &str| {
        let mut command = std::process::Command::new(support::job::quill_bin());
        command
            .args([
                "actor",
                "--learner",
                &addr,
                "--threads",
                "1",
                "--name",
                name,
            ])
            .arg("--token-file")
            .arg(&job.token);
        command
    };
    let _reward = job.start("reward", &["reward", "--learner", &addr]);
    let mut broken = actor("broken");
    broken.env(quill_actor::engine::fault::FAILS_AFTER_VAR, "1");
    let mut broken = Proc::spawn(broken, &job.dir.path().join("actor-broken.log"));
    let stop = Arc::new(AtomicBool::new(false));
    let hoarder = {
        let (addr, stop) = (addr.clone(), Arc::clone(&stop));
        std::thread::spawn(move || {
            tokio::runtime::Runtime::new()
                .unwrap()
                .block_on(hoard(addr, stop))
        })
    };
    let _healthy: Vec<Proc> = ["healthy-a", "healthy-b"]
        .iter()
        .map(|name| Proc::spawn(actor(name), &job.dir.path().join(format!("{name}.log"))))
        .collect();

    let status = learner.wait(Duration::from_secs(600));
    stop.store(true, Ordering::SeqCst);
    let log = learner.log();
    assert!(status.success(), "{log}");
    assert_eq!(
        job.trained_prompt_ids(),
        (0..PROMPTS).collect::<Vec<_>>(),
        "every prompt trained exactly once"
    );
    assert!(
        log.contains("leases released"),
        "the broken actor gave its leases back: {log}"
    );
    assert!(log.contains("job over: 0 leases open"), "{log}");

    let broken_status = broken.wait(Duration::from_secs(60));
    let broken_log = broken.log();
    assert!(!broken_status.success(), "{broken_log}");
    assert!(
        broken_log.contains("generations in a row failed") && broken_log.contains("injected fault"),
        "the broken actor stops naming its engine's failure: {broken_log}"
    );
    let refused = hoarder
        .join()
        .unwrap()
        .expect("the hoarder is refused more leases before the job ends");
    assert!(
        refused.message().contains("without delivering"),
        "{}",
        refused.message()
    );
}
