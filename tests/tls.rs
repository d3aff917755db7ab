//! TLS as a user turns it on: `quill certs` makes the job CA and host certificates, a
//! learner with `[cluster.tls]` refuses plaintext clients and certificates of another CA,
//! a small job trains to its end over TLS with real processes, and bad TLS settings are
//! refused naming the field, flag or file.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use support::job::{quill_bin, set, TestJob};

fn quill(args: &[&str]) -> Output {
    Command::new(quill_bin()).args(args).output().unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// `quill certs --out DIR --host localhost,127.0.0.1 EXTRA...`, which must succeed.
fn certs(dir: &Path, extra: &[&str]) {
    let out = dir.to_str().unwrap();
    let mut args = vec!["certs", "--out", out, "--host", "localhost,127.0.0.1"];
    args.extend(extra);
    let made = quill(&args);
    assert!(made.status.success(), "{}", stderr(&made));
}

/// The member flags for the host files `localhost.*` in `dir`.
fn tls_flags(dir: &Path) -> Vec<String> {
    let file = |name: &str| dir.join(name).display().to_string();
    vec![
        "--tls-ca".into(),
        file("ca.pem"),
        "--tls-cert".into(),
        file("localhost.pem"),
        "--tls-key".into(),
        file("localhost.key"),
    ]
}

#[test]
fn certs_are_made_once_and_keys_kept_private() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("certs");
    certs(&out, &["--host", "node-2,10.0.0.2"]);
    for key in ["ca.key", "localhost.key", "node-2.key"] {
        let mode = std::fs::metadata(out.join(key))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{key}");
    }
    let ca = std::fs::read(out.join("ca.pem")).unwrap();
    let key = std::fs::read(out.join("localhost.key")).unwrap();
    // Again without --force: refused, nothing replaced.
    let again = quill(&[
        "certs",
        "--out",
        out.to_str().unwrap(),
        "--host",
        "localhost",
    ]);
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("localhost.pem already exists: pass --force"),
        "{}",
        stderr(&again)
    );
    assert_eq!(std::fs::read(out.join("localhost.key")).unwrap(), key);
    // With --force: a new host key from the same CA.
    certs(&out, &["--force"]);
    assert_ne!(std::fs::read(out.join("localhost.key")).unwrap(), key);
    assert_eq!(std::fs::read(out.join("ca.pem")).unwrap(), ca);
    for bad in ["", "a b", "x,,y"] {
        let refused = quill(&["certs", "--out", out.to_str().unwrap(), "--host", bad]);
        assert!(
            stderr(&refused).contains("--host"),
            "{bad:?}: {}",
            stderr(&refused)
        );
    }
    let help = String::from_utf8(quill(&["certs", "--help"]).stdout).unwrap();
    for flag in ["--out", "--host", "--days", "--force"] {
        assert!(help.contains(flag), "{flag} in {help}");
    }
}

#[test]
fn bad_tls_settings_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    certs(dir.path(), &[]);
    let with = |edit: &dyn Fn(&mut toml::Table)| {
        let job = TestJob::new(|t| edit(t));
        let out = quill(&[
            "learner",
            "--config",
            job.config.to_str().unwrap(),
            "--token-file",
            job.token.to_str().unwrap(),
        ]);
        assert!(!out.status.success());
        stderr(&out)
    };
    let remote = with(&|t| set(t, "cluster", "learner_addr", "192.0.2.1:0"));
    assert!(
        remote.contains("cluster.learner_addr: 192.0.2.1:0 is not a loopback address"),
        "{remote}"
    );
    let tls_table = |key: &str| {
        let mut tls = toml::Table::new();
        tls.insert(
            "ca_cert".into(),
            dir.path().join("ca.pem").display().to_string().into(),
        );
        tls.insert(
            "cert".into(),
            dir.path()
                .join("localhost.pem")
                .display()
                .to_string()
                .into(),
        );
        tls.insert("key".into(), key.into());
        tls
    };
    let no_key = with(&|t| {
        let mut tls = tls_table("");
        tls.remove("key");
        set(t, "cluster", "tls", tls);
    });
    assert!(no_key.contains("cluster.tls.key: missing"), "{no_key}");
    let missing = dir.path().join("nope.key").display().to_string();
    let absent = with(&|t| set(t, "cluster", "tls", tls_table(&missing)));
    assert!(
        absent.contains("cluster.tls") && absent.contains(&format!("{missing}: No such file")),
        "{absent}"
    );
    // A learner listening on all interfaces without TLS.
    let job = TestJob::new(|_| {});
    let out = quill(&[
        "learner",
        "--config",
        job.config.to_str().unwrap(),
        "--token-file",
        job.token.to_str().unwrap(),
        "--listen",
        "0.0.0.0:0",
    ]);
    assert!(
        stderr(&out).contains("--listen 0.0.0.0:0 is not a loopback address"),
        "{}",
        stderr(&out)
    );
    // Members: TLS flags go together; plaintext stays on loopback.
    let token = job.token.to_str().unwrap();
    let ca = dir.path().join("ca.pem").display().to_string();
    let partial = quill(&[
        "reward",
        "--learner",
        "127.0.0.1:1",
        "--token-file",
        token,
        "--tls-ca",
        &ca,
    ]);
    assert!(
        stderr(&partial).contains("--tls-ca, --tls-cert and --tls-key go together"),
        "{}",
        stderr(&partial)
    );
    let far = quill(&[
        "actor",
        "--learner",
        "192.0.2.7:50051",
        "--token-file",
        token,
    ]);
    assert!(
        stderr(&far).contains("--learner 192.0.2.7:50051 is not a loopback address"),
        "{}",
        stderr(&far)
    );
}

/// One learner with TLS: plaintext and another CA's certificate get nothing, the job's
/// own certificates get the status; then an actor and a reward worker over TLS train the
/// job to its end.
#[test]
fn a_tls_job_refuses_strangers_and_trains_to_its_end() {
    let job = TestJob::new(|t| {
        set(t, "grpo", "steps", 1000);
        set(t, "grpo", "prompts_per_step", 2);
        set(t, "grpo", "drop_zero_advantage_groups", false);
        set(t, "sampling", "max_new_tokens", 24);
        set(t, "data", "epochs", 1);
    });
    let lines: Vec<String> = (0..4)
        .map(|i| format!(r#"{{"question": "Write about topic {i}.", "length": 20}}"#))
        .collect();
    job.use_prompts(&lines);
    let certs_dir = job.dir.path().join("certs");
    let other_dir = job.dir.path().join("other");
    certs(&certs_dir, &[]);
    certs(&other_dir, &[]);
    let mut table: toml::Table = std::fs::read_to_string(&job.config)
        .unwrap()
        .parse()
        .unwrap();
    let mut tls = toml::Table::new();
    for (key, file) in [
        ("ca_cert", "ca.pem"),
        ("cert", "localhost.pem"),
        ("key", "localhost.key"),
    ] {
        tls.insert(
            key.into(),
            certs_dir.join(file).display().to_string().into(),
        );
    }
    set(&mut table, "cluster", "tls", tls);
    std::fs::write(&job.config, toml::to_string(&table).unwrap()).unwrap();

    let mut learner = job.start_learner(&[]);
    let addr = job.learner_addr(&mut learner);
    let token = job.token.to_str().unwrap();
    let status = |flags: &[String]| {
        let mut args = vec![
            "status",
            "--learner",
            addr.as_str(),
            "--token-file",
            token,
            "--json",
        ];
        args.extend(flags.iter().map(String::as_str));
        quill(&args)
    };
    let plain = status(&[]);
    assert!(!plain.status.success(), "a plaintext client got an answer");
    let stranger = status(&tls_flags(&other_dir));
    assert!(
        !stranger.status.success(),
        "another CA's client got an answer"
    );
    let mut impostor = tls_flags(&other_dir);
    impostor[1] = certs_dir.join("ca.pem").display().to_string();
    let refused = status(&impostor);
    assert!(
        !refused.status.success(),
        "another CA's certificate got an answer"
    );
    let ours = status(&tls_flags(&certs_dir));
    assert!(ours.status.success(), "{}", stderr(&ours));
    assert!(String::from_utf8_lossy(&ours.stdout).contains("\"leases_active\""));

    let started = Instant::now();
    let member = |role: &str| {
        let mut args = vec![role, "--learner", addr.as_str()];
        let flags = tls_flags(&certs_dir);
        args.extend(flags.iter().map(String::as_str));
        if role == "actor" {
            args.extend(["--threads", "1"]);
        }
        job.start(role, &args)
    };
    let _reward = member("reward");
    let _actor = member("actor");
    let exit = learner.wait(Duration::from_secs(120));
    assert!(exit.success(), "{}", learner.log());
    assert_eq!(job.trained_prompt_ids(), vec![0, 1, 2, 3]);
    assert!(
        learner.log().contains("mutual TLS"),
        "the learner says how it talks: {}",
        learner.log()
    );
    eprintln!("trained over TLS in {:?}", started.elapsed());
}
