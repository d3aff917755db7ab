//! `quill launch slurm`: render `cluster/slurm/quill.sbatch` for a job and submit it with
//! `sbatch` as one heterogeneous job (learner ranks, actors, reward workers).

use anyhow::{bail, Context};
use quill_config::job::JobConfig;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The batch script template; `{{name}}` marks a value filled in by [`render`].
pub const TEMPLATE: &str = include_str!("../../slurm/quill.sbatch");

/// The file name of the rendered script in the job's output directory.
pub const SCRIPT_NAME: &str = "quill.sbatch";

/// Flags of `quill launch slurm`.
#[derive(clap::Args, Debug)]
pub struct SlurmArgs {
    /// The job file (TOML). Its path, the quill binary and the output directory must be
    /// reachable at the same paths on every node.
    #[arg(long)]
    pub config: PathBuf,
    /// Nodes of the learner component (data-parallel ranks: one per GPU, or one per node
    /// without GPUs).
    #[arg(long, default_value_t = 1)]
    pub learner_nodes: u32,
    /// GPUs per learner node (default: 1 when model.device is CUDA, else 0).
    #[arg(long)]
    pub gpus_per_learner_node: Option<u32>,
    /// Nodes of the actor component.
    #[arg(long, default_value_t = 1)]
    pub actor_nodes: u32,
    /// GPUs per actor node, one actor per GPU (default: 1 when model.device is CUDA, else
    /// 0: one actor per node).
    #[arg(long)]
    pub gpus_per_actor_node: Option<u32>,
    /// Nodes of the reward component (one reward worker each).
    #[arg(long, default_value_t = 1)]
    pub reward_nodes: u32,
    /// The SLURM partition of every component (default: the cluster's default partition).
    #[arg(long)]
    pub partition: Option<String>,
    /// Time limit of every component in SLURM's format (minutes, MM:SS, HH:MM:SS, D-HH,
    /// D-HH:MM or D-HH:MM:SS; default: the partition's).
    #[arg(long)]
    pub time: Option<String>,
    /// Write checkpoints, metrics, the token, the script and SLURM's log here instead of
    /// `job.output_dir`.
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// The learner hub's TCP port on its node (default: the port of cluster.learner_addr;
    /// 0 picks a free port, possible with one learner rank only).
    #[arg(long)]
    pub learner_port: Option<u16>,
    /// The TCP port reward workers serve on, on their nodes.
    #[arg(long, default_value_t = 50052)]
    pub reward_port: u16,
    /// CPU threads libtorch may use in the learner and each actor (0 keeps libtorch's
    /// default).
    #[arg(long, default_value_t = 0)]
    pub threads: u32,
    /// Continue from the latest checkpoint in the output directory.
    #[arg(long)]
    pub resume: bool,
    /// Print the batch script instead of writing and submitting it.
    #[arg(long)]
    pub dry_run: bool,
    /// The sbatch program to submit with.
    #[arg(long, default_value = "sbatch")]
    pub sbatch: PathBuf,
}

/// Renders `template`: each `{{name}}` takes its value from `values`; a line that names a
/// value given as `None` is left out. Fails on a placeholder with no entry.
pub fn render(template: &str, values: &[(&str, Option<String>)]) -> anyhow::Result<String> {
    let mut out = String::with_capacity(template.len());
    'lines: for line in template.lines() {
        let mut line = line.to_owned();
        for (name, value) in values {
            let mark = format!("{{{{{name}}}}}");
            if line.contains(&mark) {
                match value {
                    Some(v) => line = line.replace(&mark, v),
                    None => continue 'lines,
                }
            }
        }
        if let Some(at) = line.find("{{") {
            bail!(
                "the batch template has an unknown placeholder: {}",
                &line[at..]
            );
        }
        out.push_str(&line);
        out.push('\n');
    }
    Ok(out)
}

/// Quotes `s` for a POSIX shell.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A path as an absolute, shell-quoted string.
fn quoted_path(path: &Path, what: &str) -> anyhow::Result<String> {
    let absolute = std::path::absolute(path).with_context(|| format!("resolving {what}"))?;
    let text = absolute
        .to_str()
        .with_context(|| format!("{what} is not UTF-8: {}", absolute.display()))?;
    Ok(shell_quote(text))
}

/// Whether `time` is one of SLURM's time-limit formats.
fn valid_time(time: &str) -> bool {
    let numbers = |s: &str, most: usize| {
        let parts: Vec<&str> = s.split(':').collect();
        parts.len() <= most
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    };
    match time.split_once('-') {
        Some((days, rest)) => numbers(days, 1) && numbers(rest, 3),
        None => matches!(time, "UNLIMITED" | "INFINITE") || numbers(time, 3),
    }
}

/// Checks the flags against each other and the job; errors name the flag.
fn check(args: &SlurmArgs, job: &JobConfig) -> anyhow::Result<(u32, u32)> {
    for (flag, nodes) in [
        ("--learner-nodes", args.learner_nodes),
        ("--actor-nodes", args.actor_nodes),
        ("--reward-nodes", args.reward_nodes),
    ] {
        if nodes == 0 {
            bail!("{flag}: must be at least 1, got 0");
        }
    }
    let cuda = job.model.device.starts_with("cuda");
    let default_gpus = u32::from(cuda);
    let learner_gpus = args.gpus_per_learner_node.unwrap_or(default_gpus);
    let actor_gpus = args.gpus_per_actor_node.unwrap_or(default_gpus);
    if cuda && learner_gpus == 0 {
        bail!(
            "--gpus-per-learner-node: model.device is {:?}, so the learner needs at least 1 GPU per node",
            job.model.device
        );
    }
    if let Some(p) = &args.partition {
        if p.is_empty()
            || !p
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.,".contains(&b))
        {
            bail!(
                "--partition: {p:?} is not a partition name (letters, digits, '-', '_', '.', ',')"
            );
        }
    }
    if let Some(t) = &args.time {
        if !valid_time(t) {
            bail!("--time: {t:?} is not a SLURM time limit (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS)");
        }
    }
    Ok((learner_gpus, actor_gpus))
}

/// The port of `cluster.learner_addr`.
fn configured_port(job: &JobConfig) -> anyhow::Result<u16> {
    job.cluster
        .learner_addr
        .rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .with_context(|| {
            format!(
                "cluster.learner_addr: {:?} has no port; pass --learner-port",
                job.cluster.learner_addr
            )
        })
}

/// The members' transport flags, shell-quoted: the job's `[cluster.tls]` files (the same
/// on every node, on the shared file system), `--allow-plaintext` when the job allows it,
/// else none.
fn transport(job: &JobConfig) -> anyhow::Result<String> {
    let Some(tls) = &job.cluster.tls else {
        return Ok(if job.cluster.allow_plaintext {
            "--allow-plaintext".to_owned()
        } else {
            String::new()
        });
    };
    Ok(format!(
        "--tls-ca {} --tls-cert {} --tls-key {}",
        quoted_path(&tls.ca_cert, "cluster.tls.ca_cert")?,
        quoted_path(&tls.cert, "cluster.tls.cert")?,
        quoted_path(&tls.key, "cluster.tls.key")?
    ))
}

/// Renders the batch script for `args` and the job.
pub fn script(args: &SlurmArgs, job: &JobConfig) -> anyhow::Result<String> {
    let (learner_gpus, actor_gpus) = check(args, job)?;
    let learner_tasks = learner_gpus.max(1);
    let actor_tasks = actor_gpus.max(1);
    let port = match args.learner_port {
        Some(port) => port,
        None => configured_port(job)?,
    };
    if port == 0 && args.learner_nodes * learner_tasks > 1 {
        bail!(
            "--learner-port: the learner ranks need a fixed hub port (0 only works with one rank)"
        );
    }
    let output_dir = &job.job.output_dir;
    let (token_file, generate) = match &job.job.token_file {
        Some(file) => (quoted_path(file, "job.token_file")?, "0"),
        None => (
            quoted_path(&output_dir.join("job.token"), "the output directory")?,
            "1",
        ),
    };
    let quill = std::env::current_exe().context("locating the quill binary")?;
    let grace = (job.cluster.heartbeat_seconds * 10.0).ceil() as u64 + 10;
    let gpu_request = |gpus: u32| (gpus > 0).then(|| gpus.to_string());
    let values = [
        ("job_name", Some(job.job.name.clone())),
        (
            "output_dir",
            Some(quoted_path(output_dir, "the output directory")?),
        ),
        ("partition", args.partition.clone()),
        ("time", args.time.clone()),
        ("learner_nodes", Some(args.learner_nodes.to_string())),
        ("learner_tasks_per_node", Some(learner_tasks.to_string())),
        ("learner_gpu_request", gpu_request(learner_gpus)),
        ("learner_gpus_per_node", Some(learner_gpus.to_string())),
        ("actor_nodes", Some(args.actor_nodes.to_string())),
        ("actor_tasks_per_node", Some(actor_tasks.to_string())),
        ("actor_gpu_request", gpu_request(actor_gpus)),
        ("actor_gpus_per_node", Some(actor_gpus.to_string())),
        ("reward_nodes", Some(args.reward_nodes.to_string())),
        ("quill", Some(quoted_path(&quill, "the quill binary")?)),
        ("config", Some(quoted_path(&args.config, "--config")?)),
        ("token_file", Some(token_file)),
        ("generate_token", Some(generate.to_owned())),
        ("learner_port", Some(port.to_string())),
        ("reward_port", Some(args.reward_port.to_string())),
        ("threads", Some(args.threads.to_string())),
        ("resume", Some(u8::from(args.resume).to_string())),
        ("grace_seconds", Some(grace.to_string())),
        ("transport", Some(transport(job)?)),
    ];
    render(TEMPLATE, &values)
}

/// Runs `sbatch --parsable script`; returns the job id.
fn submit(sbatch: &Path, script: &Path) -> anyhow::Result<String> {
    let output = match Command::new(sbatch).arg("--parsable").arg(script).output() {
        Ok(output) => output,
        Err(e) if e.kind() == ErrorKind::NotFound => bail!(
            "--sbatch: {} not found; install SLURM's client commands or pass --sbatch PATH",
            sbatch.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("running {}", sbatch.display())),
    };
    if !output.status.success() {
        bail!(
            "sbatch refused the job ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let id = stdout
        .trim()
        .split(';')
        .next()
        .unwrap_or_default()
        .to_owned();
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
        bail!("sbatch printed no job id: {:?}", stdout.trim());
    }
    Ok(id)
}

/// Renders the job's batch script and submits it (or prints it with `--dry-run`).
pub fn run(args: SlurmArgs) -> anyhow::Result<()> {
    let mut job = JobConfig::from_file(&args.config)?;
    if let Some(dir) = &args.output_dir {
        job.job.output_dir = dir.clone();
    }
    job.job.output_dir =
        std::path::absolute(&job.job.output_dir).context("resolving the output directory")?;
    let text = script(&args, &job)?;
    if args.dry_run {
        print!("{text}");
        return Ok(());
    }
    let dir = &job.job.output_dir;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(SCRIPT_NAME);
    std::fs::write(&path, &text).with_context(|| format!("writing {}", path.display()))?;
    let id = submit(&args.sbatch, &path)?;
    println!("submitted SLURM job {id} ({})", path.display());
    println!("  queue:   squeue --job {id}");
    println!(
        "  log:     {}",
        dir.join(format!("slurm-{id}.out")).display()
    );
    println!("  metrics: {}", dir.join(&job.metrics.jsonl).display());
    println!("  cancel:  scancel {id}");
    Ok(())
}
