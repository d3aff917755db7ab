//! `quill launch local`: a whole job on this machine, as separate processes on loopback.

use crate::launch::supervisor::{stop_all, wait_all, Process};
use anyhow::{bail, Context};
use quill_config::job::JobConfig;
use quill_learner::process::run::address_file;
use quill_learner::process::stop;
use rand::RngCore;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Flags of `quill launch local`.
#[derive(clap::Args, Debug)]
pub struct LocalArgs {
    /// The job file (TOML).
    #[arg(long)]
    pub config: PathBuf,
    /// Number of actors (default: cluster.actors).
    #[arg(long)]
    pub actors: Option<usize>,
    /// Number of reward workers (default: cluster.reward_workers).
    #[arg(long)]
    pub reward_workers: Option<usize>,
    /// Number of data-parallel learner ranks (rank 0 is the hub; see [parallel]).
    #[arg(long, default_value_t = 1)]
    pub learner_ranks: usize,
    /// Write checkpoints, metrics and the token here instead of `job.output_dir`.
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// Continue from the latest checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// CPU threads libtorch may use in each process (0 keeps libtorch's default).
    #[arg(long, default_value_t = 0)]
    pub threads: i32,
}

fn token_file(job: &JobConfig) -> anyhow::Result<PathBuf> {
    if let Some(path) = &job.job.token_file {
        return Ok(path.clone());
    }
    let path = job.job.output_dir.join("job.token");
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(&path, token).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(path)
}

fn quill(args: &[&str], threads: i32) -> anyhow::Result<Command> {
    let mut command = Command::new(std::env::current_exe().context("locating the quill binary")?);
    command.args(args);
    if threads > 0 {
        command.args(["--threads", &threads.to_string()]);
    }
    Ok(command)
}

fn wait_for_address(path: &Path, learner: &mut Process) -> anyhow::Result<String> {
    let started = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            if !text.trim().is_empty() {
                return Ok(text.trim().to_owned());
            }
        }
        if let Some(status) = learner.poll() {
            bail!("the learner exited during start-up ({status})");
        }
        if stop::requested() {
            bail!("interrupted");
        }
        if started.elapsed() > Duration::from_secs(300) {
            bail!("the learner did not start listening within 300 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The TLS flags every member gets: the job's own `[cluster.tls]` files (all processes
/// run on this host), or none.
fn member_transport(job: &JobConfig) -> anyhow::Result<Vec<String>> {
    let Some(tls) = &job.cluster.tls else {
        return Ok(Vec::new());
    };
    let mut flags = Vec::new();
    for (flag, path, field) in [
        ("--tls-ca", &tls.ca_cert, "cluster.tls.ca_cert"),
        ("--tls-cert", &tls.cert, "cluster.tls.cert"),
        ("--tls-key", &tls.key, "cluster.tls.key"),
    ] {
        let path = std::path::absolute(path).with_context(|| format!("{field}: resolving"))?;
        let path = path
            .to_str()
            .with_context(|| format!("{field}: path is not UTF-8"))?;
        flags.extend([flag.to_owned(), path.to_owned()]);
    }
    Ok(flags)
}

pub fn run(args: LocalArgs) -> anyhow::Result<()> {
    let mut job = JobConfig::from_file(&args.config)?;
    if let Some(dir) = &args.output_dir {
        job.job.output_dir = dir.clone();
    }
    let actors = args.actors.unwrap_or(job.cluster.actors);
    let rewards = args.reward_workers.unwrap_or(job.cluster.reward_workers);
    if actors == 0 || rewards == 0 {
        bail!("a local job needs at least one actor and one reward worker");
    }
    if args.learner_ranks == 0 {
        bail!("--learner-ranks must be at least 1");
    }
    std::fs::create_dir_all(&job.job.output_dir)
        .with_context(|| format!("creating {}", job.job.output_dir.display()))?;
    let token = token_file(&job)?;
    let token = token.to_str().context("token file path is not UTF-8")?;
    let addr_file = address_file(&job);
    let _ = std::fs::remove_file(&addr_file);
    stop::catch_signals();
    let config = args.config.to_str().context("config path is not UTF-8")?;
    let output_dir = job
        .job
        .output_dir
        .to_str()
        .context("output directory is not UTF-8")?;
    let world = args.learner_ranks.to_string();
    // Every rank's command line; rank 0 adds --resume, ranks > 0 their rank and rank 0.
    let rank_args = [
        "learner",
        "--config",
        config,
        "--token-file",
        token,
        "--output-dir",
        output_dir,
        "--world-size",
        &world,
    ];
    let mut learner_args = rank_args.to_vec();
    if args.resume {
        learner_args.push("--resume");
    }
    let mut processes = vec![Process::spawn(
        "learner",
        quill(&learner_args, args.threads)?,
    )?];
    let address = match wait_for_address(&addr_file, &mut processes[0]) {
        Ok(address) => address,
        Err(e) => {
            stop_all(&mut processes, Duration::from_secs(5));
            return Err(e);
        }
    };
    println!("[launcher] learner at {address}; starting {rewards} reward worker(s) and {actors} actor(s)");
    for rank in 1..args.learner_ranks {
        let rank = rank.to_string();
        let mut argv = rank_args.to_vec();
        argv.extend(["--rank", &rank, "--learner", &address]);
        processes.push(Process::spawn(
            &format!("learner-{rank}"),
            quill(&argv, args.threads)?,
        )?);
    }
    let transport = member_transport(&job)?;
    // Reward workers first, so that actors find one at their first heartbeat.
    for (role, count, threads) in [("reward", rewards, 0), ("actor", actors, args.threads)] {
        for i in 0..count {
            let name = format!("{role}-{i}");
            let mut argv = vec![
                role,
                "--learner",
                &address,
                "--token-file",
                token,
                "--name",
                &name,
            ];
            argv.extend(transport.iter().map(String::as_str));
            processes.push(Process::spawn(&name, quill(&argv, threads)?)?);
        }
    }
    let mut reported = vec![false; processes.len()];
    let learner_status = loop {
        if stop::requested() {
            println!("[launcher] interrupted: stopping every process");
            stop_all(&mut processes, Duration::from_secs(10));
            bail!("interrupted");
        }
        if let Some(status) = processes[0].poll() {
            break status;
        }
        for (p, seen) in processes.iter_mut().zip(reported.iter_mut()).skip(1) {
            if !*seen && p.poll().is_some_and(|s| !s.success()) {
                *seen = true;
                eprintln!(
                    "[launcher] {} (pid {}) failed; the job goes on without it",
                    p.name,
                    p.id()
                );
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let heartbeat = Duration::from_secs_f64(job.cluster.heartbeat_seconds);
    if !wait_all(&mut processes, heartbeat * 10 + Duration::from_secs(10)) {
        stop_all(&mut processes, Duration::from_secs(5));
    }
    if !learner_status.success() {
        bail!("the learner failed ({learner_status})");
    }
    println!(
        "[launcher] training finished; metrics in {}",
        job.job.output_dir.join(&job.metrics.jsonl).display()
    );
    Ok(())
}
