//! Job files and processes for end-to-end tests: every job gets its own directory, a
//! loopback address on a free port, and a token file; processes are killed when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The quill binary under test.
pub fn quill_bin() -> &'static str {
    env!("CARGO_BIN_EXE_quill")
}

/// A job directory with `job.toml` (the default job with `overrides` applied) and a token.
pub struct TestJob {
    /// Keeps the directory alive.
    pub dir: tempfile::TempDir,
    /// The job file.
    pub config: PathBuf,
    /// The token file.
    pub token: PathBuf,
}

impl TestJob {
    /// The default job, written to a fresh directory with `edit` applied to its TOML text.
    pub fn new(edit: impl FnOnce(&mut toml::Table)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let text =
            std::fs::read_to_string(super::repo_root().join("configs/default.toml")).unwrap();
        let mut table: toml::Table = text.parse().unwrap();
        set(
            &mut table,
            "job",
            "output_dir",
            dir.path().join("out").display().to_string(),
        );
        set(&mut table, "cluster", "learner_addr", "127.0.0.1:0");
        set(&mut table, "cluster", "heartbeat_seconds", 0.5);
        set(&mut table, "metrics", "log_every_seconds", 1.0);
        edit(&mut table);
        let config = dir.path().join("job.toml");
        std::fs::write(&config, toml::to_string(&table).unwrap()).unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "test-token-123").unwrap();
        TestJob { dir, config, token }
    }

    /// Writes `lines` (JSON objects) to `prompts.jsonl` in the job's directory and makes
    /// it the job's `data.path`.
    pub fn use_prompts(&self, lines: &[String]) {
        let prompts = self.dir.path().join("prompts.jsonl");
        std::fs::write(&prompts, lines.join("\n")).unwrap();
        let mut table: toml::Table = std::fs::read_to_string(&self.config)
            .unwrap()
            .parse()
            .unwrap();
        set(&mut table, "data", "path", prompts.display().to_string());
        std::fs::write(&self.config, toml::to_string(&table).unwrap()).unwrap();
    }

    /// The job's output directory.
    pub fn out(&self) -> PathBuf {
        self.dir.path().join("out")
    }

    /// The job's step records from its metrics file, in order (none before the first step).
    pub fn steps(&self) -> Vec<serde_json::Map<String, serde_json::Value>> {
        quill_telemetry::read_records(&self.out().join("metrics.jsonl"))
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r.get("kind").and_then(serde_json::Value::as_str) == Some("step"))
            .collect()
    }

    /// The prompt ids of every trained group, over all steps, sorted (a prompt trained
    /// twice appears twice).
    pub fn trained_prompt_ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self
            .steps()
            .iter()
            .flat_map(|r| r["prompt_ids"].as_array().unwrap().clone())
            .map(|v| v.as_u64().unwrap())
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Waits up to 10 s until no process mentions the job's directory any more.
    pub fn no_process_left(&self) {
        let needle = self.dir.path().display().to_string();
        wait_until("no process left", Duration::from_secs(10), &mut [], || {
            processes_mentioning(&needle).is_empty().then_some(())
        });
    }

    /// Starts `quill learner` for this job.
    pub fn start_learner(&self, extra: &[&str]) -> Proc {
        let mut command = Command::new(quill_bin());
        command
            .args(["learner", "--config"])
            .arg(&self.config)
            .arg("--token-file")
            .arg(&self.token)
            .args(["--threads", "1"])
            .args(extra);
        Proc::spawn(command, &self.dir.path().join("learner.log"))
    }

    /// Starts `quill ARGS... --token-file TOKEN` for this job, its output in `LOG.log`.
    pub fn start(&self, log: &str, args: &[&str]) -> Proc {
        let mut command = Command::new(quill_bin());
        command.args(args).arg("--token-file").arg(&self.token);
        Proc::spawn(command, &self.dir.path().join(format!("{log}.log")))
    }

    /// Waits for the learner's bound address.
    pub fn learner_addr(&self, learner: &mut Proc) -> String {
        let file = self.out().join("learner.addr");
        wait_until(
            "the learner's address",
            Duration::from_secs(120),
            &mut [learner],
            || {
                let text = std::fs::read_to_string(&file).ok()?;
                let addr = text.trim();
                (!addr.is_empty()).then(|| addr.to_owned())
            },
        )
    }

    /// Waits until the job has written `n` step records; every process in `procs` must
    /// stay alive meanwhile.
    pub fn wait_for_steps(&self, n: usize, limit: Duration, procs: &mut [&mut Proc]) {
        wait_until(&format!("step {n}"), limit, procs, || {
            (self.steps().len() >= n).then_some(())
        });
    }
}

/// Polls `check` every 100 ms until it gives a value. The test fails naming `what` when
/// `limit` passes, or when one of `procs` exits first (with that process's log).
pub fn wait_until<T>(
    what: &str,
    limit: Duration,
    procs: &mut [&mut Proc],
    check: impl FnMut() -> Option<T>,
) -> T {
    wait_until_every(Duration::from_millis(100), what, limit, procs, check)
}

/// [`wait_until`], polling every `period` (for checks that cost a process start).
pub fn wait_until_every<T>(
    period: Duration,
    what: &str,
    limit: Duration,
    procs: &mut [&mut Proc],
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        if let Some(exited) = procs
            .iter_mut()
            .position(|p| p.child.try_wait().unwrap().is_some())
        {
            let others = logs(
                procs
                    .iter()
                    .enumerate()
                    .filter(|&(i, _)| i != exited)
                    .map(|(_, p)| &**p),
            );
            panic!(
                "a process exited while waiting for {what}:\n{}\nthe others' logs:\n{others}",
                procs[exited].log()
            );
        }
        if started.elapsed() >= limit {
            let logs = logs(procs.iter().map(|p| &**p));
            panic!("no {what} after {limit:?}:\n{logs}");
        }
        std::thread::sleep(period);
    }
}

/// The logs of `procs`, each under its file's path.
fn logs<'a>(procs: impl Iterator<Item = &'a Proc>) -> String {
    procs
        .map(|p| format!("--- {}\n{}", p.log.display(), p.log()))
        .collect()
}

/// A gRPC channel to `HOST:PORT` on loopback.
pub async fn grpc_channel(addr: &str) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// Sets `section.key = value` in a job table.
pub fn set(table: &mut toml::Table, section: &str, key: &str, value: impl Into<toml::Value>) {
    table
        .entry(section.to_owned())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
        .unwrap()
        .insert(key.into(), value.into());
}

/// A child process whose output goes to a log file; killed on drop.
pub struct Proc {
    /// The process.
    pub child: Child,
    /// Where its output goes.
    pub log: PathBuf,
}

impl Proc {
    /// Starts `command` with stdout and stderr in `log`.
    pub fn spawn(mut command: Command, log: &Path) -> Self {
        let file = std::fs::File::create(log).unwrap();
        command
            .stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::from(file))
            .stdin(Stdio::null());
        Proc {
            child: command.spawn().unwrap(),
            log: log.to_owned(),
        }
    }

    /// What it printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for it to exit, up to `limit`.
    pub fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                started.elapsed() < limit,
                "still running after {limit:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The address a process logged it serves Prometheus `/metrics` at (waits up to 120 s).
pub fn metrics_addr(proc: &mut Proc) -> String {
    let log = proc.log.clone();
    wait_until(
        "metrics address in the log",
        Duration::from_secs(120),
        &mut [proc],
        || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let rest = text.split("Prometheus metrics at http://").nth(1)?;
            Some(rest.split('/').next().unwrap().to_owned())
        },
    )
}

/// Pids of live processes whose command line mentions `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let status = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let zombie = status.split_whitespace().nth(2) == Some("Z");
        if !zombie && String::from_utf8_lossy(&cmdline).contains(needle) {
            pids.push(pid);
        }
    }
    pids
}
