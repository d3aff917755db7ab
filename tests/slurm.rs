//! A real SLURM cluster on this machine: munged, slurmctld and four slurmd daemons
//! (emulated nodes q1-q4 on one host, so each component of the heterogeneous job gets
//! nodes of its own: two learner ranks, an actor, a reward worker) with their configuration in a temporary directory via `SLURM_CONF`.
//! `quill launch slurm` submits a small default job with the real `sbatch`; the test waits
//! for it and checks that it trained and that every component COMPLETED with exit code 0.
//! Every daemon and job process is stopped when the test ends, also on failure.

mod support;

use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use support::job::{quill_bin, set, TestJob};
use support::{stderr, stdout};

const STEPS: i64 = 3;

/// An installed program, from PATH or the sbin folders; fails the test when SLURM or munge
/// is missing.
fn program(name: &str) -> PathBuf {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin"])
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file());
    found.unwrap_or_else(|| {
        panic!(
            "{name} not found: SLURM and munge are not installed; run scripts/test.sh \
                 (or .ci/run), which installs Debian's slurm-wlm and munge"
        )
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A one-machine SLURM cluster; dropping it cancels its jobs and stops its daemons.
struct Cluster {
    dir: tempfile::TempDir,
    conf: PathBuf,
    daemons: Vec<(String, Child)>,
}

impl Cluster {
    fn start() -> Cluster {
        let (munged, slurmctld, slurmd) =
            (program("munged"), program("slurmctld"), program("slurmd"));
        program("sbatch");
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let key = root.join("munge.key");
        let mut bytes = vec![0u8; 1024];
        rand::fill(&mut bytes[..]);
        std::fs::write(&key, bytes).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o400)).unwrap();
        let socket = root.join("munge.sock");
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
        let (ctld_port, node_port) = (free_port(), free_port());
        let mut conf = format!(
            "ClusterName=quilltest\nSlurmctldHost={host}(127.0.0.1)\nSlurmctldPort={ctld_port}\n\
             SlurmUser=root\nSlurmdUser=root\nAuthType=auth/munge\nCredType=cred/munge\n\
             AuthInfo=socket={socket}\nProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\n\
             SelectType=select/cons_tres\nSelectTypeParameters=CR_Core\nReturnToService=2\n\
             MpiDefault=none\nSchedulerParameters=bf_interval=1\nMinJobAge=3600\n\
             AccountingStorageType=accounting_storage/none\nJobAcctGatherType=jobacct_gather/none\n\
             StateSaveLocation={root}/state\nSlurmdSpoolDir={root}/spool/%n\n\
             SlurmctldPidFile={root}/slurmctld.pid\nSlurmdPidFile={root}/slurmd-%n.pid\n\
             SlurmctldLogFile={root}/slurmctld.log\nSlurmdLogFile={root}/slurmd-%n.log\n\
             SlurmdParameters=config_overrides\n",
            host = host.trim(),
            socket = socket.display(),
            root = root.display(),
        );
        // Four emulated nodes on this host, one slurmd each: the heterogeneous job's
        // components are then placed side by side (SLURM plans them node by node); the
        // learner component takes two of them (two data-parallel learner ranks).
        for i in 1..=4 {
            let port = if i == 1 { node_port } else { free_port() };
            conf.push_str(&format!(
                "NodeName=q{i} NodeAddr=127.0.0.1 NodeHostname={} Port={port} CPUs=2 RealMemory=4000\n",
                host.trim()
            ));
        }
        conf.push_str("PartitionName=debug Nodes=q[1-4] Default=YES MaxTime=INFINITE State=UP\n");
        let conf_path = root.join("slurm.conf");
        std::fs::write(&conf_path, conf).unwrap();
        std::fs::create_dir_all(root.join("state")).unwrap();
        let mut cluster = Cluster {
            conf: conf_path.clone(),
            dir,
            daemons: Vec::new(),
        };
        let root = cluster.dir.path().to_owned();
        let mut munge = Command::new(munged);
        munge
            .args(["--foreground", "--force"])
            .arg(format!("--socket={}", socket.display()))
            .arg(format!("--key-file={}", key.display()))
            .arg(format!("--log-file={}", root.join("munged.log").display()))
            .arg(format!("--pid-file={}", root.join("munged.pid").display()))
            .arg(format!(
                "--seed-file={}",
                root.join("munged.seed").display()
            ));
        cluster.spawn("munged", munge);
        cluster.wait_for("munged's socket", |_| socket.exists());
        let mut ctld = Command::new(slurmctld);
        ctld.arg("-D").arg("-f").arg(&conf_path);
        cluster.spawn("slurmctld", ctld);
        for i in 1..=4 {
            std::fs::create_dir_all(root.join(format!("spool/q{i}"))).unwrap();
            let mut d = Command::new(&slurmd);
            d.arg("-D")
                .args(["-N", &format!("q{i}")])
                .arg("-f")
                .arg(&conf_path);
            cluster.spawn(&format!("slurmd-q{i}"), d);
        }
        cluster.wait_for("four idle nodes in sinfo", |cluster| {
            let out = cluster.run("sinfo", &["-h", "-N", "-o", "%t"]);
            let states = stdout(&out);
            states.lines().filter(|l| l.trim() == "idle").count() == 4
        });
        cluster
    }

    fn spawn(&mut self, name: &str, mut command: Command) {
        let log = std::fs::File::create(self.dir.path().join(format!("{name}.out"))).unwrap();
        command
            .env("SLURM_CONF", &self.conf)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log));
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        self.daemons.push((name.to_owned(), child));
    }

    fn wait_for(&mut self, what: &str, mut ready: impl FnMut(&Cluster) -> bool) {
        let started = Instant::now();
        while !ready(self) {
            let exited = self.daemons.iter_mut().find_map(|(name, child)| {
                let status = child.try_wait().unwrap()?;
                Some(format!("{name} exited ({status})"))
            });
            if let Some(exited) = exited {
                panic!("{exited} while waiting for {what}:\n{}", self.logs());
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "no {what} after 60 s:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Runs a SLURM client command against this cluster.
    fn run(&self, program: &str, args: &[&str]) -> Output {
        Command::new(program)
            .args(args)
            .env("SLURM_CONF", &self.conf)
            .output()
            .unwrap()
    }

    /// The daemons' logs, for failure messages.
    fn logs(&self) -> String {
        let mut text = String::new();
        for name in [
            "slurmctld.log",
            "slurmd-q1.log",
            "slurmctld.out",
            "munged.out",
        ] {
            let body = std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
            let tail: Vec<&str> = body.lines().rev().take(15).collect();
            text.push_str(&format!("--- {name}\n"));
            for line in tail.into_iter().rev() {
                text.push_str(line);
                text.push('\n');
            }
        }
        text
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.run("scancel", &["--user", "root"]);
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(15)
            && !stdout(&self.run("squeue", &["-h"])).trim().is_empty()
        {
            std::thread::sleep(Duration::from_millis(200));
        }
        // Last started, first stopped: slurmd, slurmctld, then munged.
        while let Some((_, mut child)) = self.daemons.pop() {
            // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let started = Instant::now();
            while child.try_wait().unwrap().is_none() {
                if started.elapsed() > Duration::from_secs(10) {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// `JobState` and `ExitCode` of every component of a job, from `scontrol show job`.
fn job_states(cluster: &Cluster, id: &str) -> Vec<(String, String)> {
    let text = stdout(&cluster.run("scontrol", &["show", "job", id]));
    let field = |record: &str, key: &str| {
        record
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .unwrap_or_default()
            .to_owned()
    };
    text.split("\n\n")
        .filter(|r| r.contains("JobId="))
        .map(|r| (field(r, "JobState="), field(r, "ExitCode=")))
        .collect()
}

fn submitted_id(out: &Output) -> String {
    let text = stdout(out);
    text.lines()
        .find_map(|l| l.strip_prefix("submitted SLURM job "))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no job id in:\n{text}\n{}", stderr(out)))
        .to_owned()
}

#[test]
#[ignore = "slow tier: starts a SLURM cluster and trains a job through it"]
fn a_job_trains_on_a_real_slurm_cluster() {
    let cluster = Cluster::start();
    let job = TestJob::new(|t| {
        set(t, "grpo", "steps", STEPS);
        set(t, "grpo", "prompts_per_step", 2);
        set(t, "sampling", "group_size", 4);
        set(t, "sampling", "max_new_tokens", 48);
        set(t, "checkpoint", "every_steps", 0);
        // The batch script listens on all interfaces; this one-machine cluster runs plaintext.
        set(t, "cluster", "allow_plaintext", true);
    });
    let launch = |extra: &[&str]| {
        Command::new(quill_bin())
            .args(["launch", "slurm", "--config"])
            .arg(&job.config)
            .args(["--threads", "1", "--time", "30"])
            .args(extra)
            .env("SLURM_CONF", &cluster.conf)
            .output()
            .unwrap()
    };

    // The real sbatch refuses a partition the cluster does not have; quill shows why.
    let refused = launch(&["--partition", "nosuch"]);
    assert!(!refused.status.success());
    let err = stderr(&refused);
    assert!(
        err.contains("sbatch refused the job") && err.contains("invalid partition"),
        "{err}"
    );

    let reward_port = free_port().to_string();
    let learner_port = free_port().to_string();
    let out = launch(&[
        "--reward-port",
        &reward_port,
        "--learner-nodes",
        "2",
        "--learner-port",
        &learner_port,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let id = submitted_id(&out);
    assert!(stdout(&out).contains(&format!("squeue --job {id}")));
    let log_file = job.out().join(format!("slurm-{id}.out"));
    let job_log = || std::fs::read_to_string(&log_file).unwrap_or_default();

    let started = Instant::now();
    let states = loop {
        let states = job_states(&cluster, &id);
        let pending = ["PENDING", "RUNNING", "CONFIGURING", "COMPLETING"];
        if states.len() == 3 && states.iter().all(|(s, _)| !pending.contains(&s.as_str())) {
            break states;
        }
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "job {id} not finished after 900 s: {states:?}\n{}\n{}",
            job_log(),
            cluster.logs()
        );
        std::thread::sleep(Duration::from_secs(1));
    };
    let log = job_log();
    for (state, exit) in &states {
        assert_eq!(state, "COMPLETED", "{states:?}\n{log}");
        assert_eq!(exit, "0:0", "{states:?}\n{log}");
    }
    assert!(log.contains("learner at 127.0.0.1:"), "{log}");
    assert!(log.contains("the learner finished (status 0)"), "{log}");

    let records: Vec<_> = quill_telemetry::read_records(&job.out().join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .filter(|r| r.get("kind").and_then(Value::as_str) == Some("step"))
        .collect();
    assert!(
        records.iter().all(|r| r["learner_ranks"] == 2),
        "{records:?}"
    );
    let steps: Vec<i64> = records
        .iter()
        .map(|r| r["step"].as_i64().unwrap())
        .collect();
    assert_eq!(steps, (1..=STEPS).collect::<Vec<_>>(), "{log}");
    let checkpoints: Vec<PathBuf> = std::fs::read_dir(job.out().join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(
        checkpoints
            .iter()
            .any(|c| c.join("config.json").exists() && c.join("model.safetensors").exists()),
        "{checkpoints:?}"
    );
    let token = std::fs::metadata(job.out().join("job.token")).unwrap();
    assert_eq!(token.permissions().mode() & 0o777, 0o600);
    assert!(job.out().join("quill.sbatch").exists());

    job.no_process_left();
}
