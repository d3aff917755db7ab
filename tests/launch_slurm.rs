//! `quill launch slurm` without a cluster: `--dry-run` renders every parameter into the
//! batch script, and bad flags, a missing or invalid job file, and a missing or refusing
//! `sbatch` give errors that name the problem and write nothing.

mod support;

use std::process::Command;
use support::job::{quill_bin, set, TestJob};
use support::{stderr, stdout};

fn launch(job: &TestJob, extra: &[&str]) -> std::process::Output {
    Command::new(quill_bin())
        .args(["launch", "slurm", "--config"])
        .arg(&job.config)
        .args(extra)
        .output()
        .unwrap()
}

/// Runs `launch` expecting failure with `needle` in stderr, and no output directory.
fn refused(job: &TestJob, extra: &[&str], needle: &str) {
    let out = launch(job, extra);
    let err = stderr(&out);
    assert!(
        !out.status.success(),
        "{extra:?} was accepted:\n{}",
        stdout(&out)
    );
    assert!(err.contains(needle), "{extra:?}: {needle:?} not in:\n{err}");
    assert!(
        !job.out().exists(),
        "{extra:?} wrote {}",
        job.out().display()
    );
}

#[test]
fn dry_run_renders_the_parameters() {
    let job = TestJob::new(|_| {});
    let out = launch(
        &job,
        &[
            "--dry-run",
            "--learner-nodes",
            "3",
            "--gpus-per-learner-node",
            "4",
            "--actor-nodes",
            "5",
            "--gpus-per-actor-node",
            "2",
            "--reward-nodes",
            "2",
            "--partition",
            "gpu-a",
            "--time",
            "1-02:30:00",
            "--learner-port",
            "6100",
            "--reward-port",
            "6200",
            "--threads",
            "3",
            "--resume",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let script = stdout(&out);
    let directives: Vec<&str> = script
        .lines()
        .filter_map(|l| l.strip_prefix("#SBATCH "))
        .collect();
    let expected = [
        "--job-name=quill-default",
        &format!("--output='{}'/slurm-%j.out", job.out().display()),
        "--partition=gpu-a",
        "--time=1-02:30:00",
        "--nodes=3",
        "--ntasks-per-node=4",
        "--gpus-per-node=4",
        "hetjob",
        "--partition=gpu-a",
        "--time=1-02:30:00",
        "--nodes=5",
        "--ntasks-per-node=2",
        "--gpus-per-node=2",
        "hetjob",
        "--partition=gpu-a",
        "--time=1-02:30:00",
        "--nodes=2",
        "--ntasks-per-node=1",
    ];
    assert_eq!(directives, expected);
    for line in [
        "LEARNER_PORT=6100",
        "REWARD_PORT=6200",
        "THREADS=3",
        "RESUME=1",
        "GENERATE_TOKEN=1",
        &format!("QUILL='{}'", quill_bin()),
        &format!("CONFIG='{}'", job.config.display()),
        &format!("TOKEN_FILE='{}'", job.out().join("job.token").display()),
    ] {
        assert!(
            script.lines().any(|l| l == line),
            "no line {line:?} in\n{script}"
        );
    }
    assert!(!script.contains("{{"), "unfilled placeholder:\n{script}");
    let syntax = Command::new("bash")
        .args(["-n", "-c", &script])
        .output()
        .unwrap();
    assert!(syntax.status.success(), "bash -n: {}", stderr(&syntax));
    assert!(!job.out().exists(), "a dry run writes nothing");
}

#[test]
fn members_get_the_jobs_transport() {
    let script = |edit: fn(&mut toml::Table)| {
        let job = TestJob::new(edit);
        let out = launch(&job, &["--dry-run"]);
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out)
    };
    assert!(script(|_| {}).lines().any(|l| l == "TRANSPORT=()"));
    let plain = script(|t| set(t, "cluster", "allow_plaintext", true));
    assert!(
        plain.lines().any(|l| l == "TRANSPORT=(--allow-plaintext)"),
        "{plain}"
    );
    let tls = script(|t| {
        let mut tls = toml::Table::new();
        for (key, file) in [
            ("ca_cert", "/c/ca.pem"),
            ("cert", "/c/all.pem"),
            ("key", "/c/all.key"),
        ] {
            tls.insert(key.into(), file.into());
        }
        set(t, "cluster", "tls", tls);
    });
    assert!(
        tls.lines().any(|l| l
            == "TRANSPORT=(--tls-ca '/c/ca.pem' --tls-cert '/c/all.pem' --tls-key '/c/all.key')"),
        "{tls}"
    );
    assert!(tls.contains(r#""$QUILL" actor --learner "$learner" "${common[@]}" "${TRANSPORT[@]}""#));
}

#[test]
fn dry_run_defaults_leave_out_what_is_not_given() {
    let job = TestJob::new(|t| set(t, "job", "token_file", "/secrets/quill.token"));
    let out = launch(&job, &["--dry-run"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let script = stdout(&out);
    for absent in ["--partition", "--time", "--gpus-per-node"] {
        assert!(
            !script
                .lines()
                .any(|l| l.starts_with("#SBATCH") && l.contains(absent)),
            "{absent} without its flag:\n{script}"
        );
    }
    // A CPU job: one task per node; cluster.learner_addr's port 0 for the hub.
    assert_eq!(script.matches("#SBATCH --ntasks-per-node=1").count(), 3);
    for line in [
        "LEARNER_PORT=0",
        "GENERATE_TOKEN=0",
        "TOKEN_FILE='/secrets/quill.token'",
    ] {
        assert!(
            script.lines().any(|l| l == line),
            "no line {line:?} in\n{script}"
        );
    }
}

#[test]
fn bad_flags_are_refused_by_name() {
    let job = TestJob::new(|_| {});
    refused(
        &job,
        &["--actor-nodes", "0"],
        "--actor-nodes: must be at least 1",
    );
    refused(
        &job,
        &["--learner-nodes", "0"],
        "--learner-nodes: must be at least 1",
    );
    refused(
        &job,
        &["--reward-nodes", "0"],
        "--reward-nodes: must be at least 1",
    );
    refused(&job, &["--actor-nodes=-2"], "--actor-nodes");
    refused(
        &job,
        &["--time", "two hours"],
        "--time: \"two hours\" is not a SLURM time",
    );
    refused(&job, &["--time", "1-"], "--time");
    refused(&job, &["--partition", "gpu\n#SBATCH --x"], "--partition");
    refused(&job, &["--learner-port", "70000"], "--learner-port");
    refused(
        &job,
        &["--learner-nodes", "2"],
        "--learner-port: the learner ranks need a fixed hub port",
    );
    refused(&job, &["--nodes", "2"], "--nodes");
    let out = launch(&job, &["--sbatch", "/nonexistent/sbatch"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("--sbatch: /nonexistent/sbatch not found"),
        "{err}"
    );
    assert!(
        job.out().join("quill.sbatch").exists(),
        "the script is kept for a retry"
    );
}

#[test]
fn missing_or_invalid_job_files_are_refused() {
    let missing = Command::new(quill_bin())
        .args([
            "launch",
            "slurm",
            "--config",
            "/nonexistent/job.toml",
            "--dry-run",
        ])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(
        stderr(&missing).contains("/nonexistent/job.toml"),
        "{}",
        stderr(&missing)
    );
    let no_config = Command::new(quill_bin())
        .args(["launch", "slurm", "--dry-run"])
        .output()
        .unwrap();
    assert!(!no_config.status.success());
    assert!(
        stderr(&no_config).contains("--config"),
        "{}",
        stderr(&no_config)
    );
    let invalid = TestJob::new(|t| set(t, "sampling", "group_size", 1));
    refused(&invalid, &["--dry-run"], "sampling.group_size");
    let cuda = TestJob::new(|t| set(t, "model", "device", "cuda"));
    refused(
        &cuda,
        &["--gpus-per-learner-node", "0"],
        "--gpus-per-learner-node: model.device",
    );
}

#[test]
#[ignore = "slow tier: needs SLURM's sbatch"]
fn a_refusing_sbatch_reports_its_stderr() {
    let job = TestJob::new(|_| {});
    // The real sbatch with an empty SLURM configuration refuses at once.
    let conf = job.dir.path().join("slurm.conf");
    std::fs::write(&conf, "").unwrap();
    let out = Command::new(quill_bin())
        .args(["launch", "slurm", "--config"])
        .arg(&job.config)
        .env("SLURM_CONF", &conf)
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(
        err.contains("sbatch refused the job") && err.contains("ClusterName needs to be specified"),
        "{err}"
    );
    assert!(
        job.out().join("quill.sbatch").exists(),
        "the script is kept for a retry"
    );
}
