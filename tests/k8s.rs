//! The Kubernetes manifests in `cluster/k8s/`: rendered offline with `kubectl kustomize`,
//! parsed as YAML, and checked against the real `quill` binary: every container runs a
//! real subcommand with flags that subcommand's `--help` lists, names only Services and
//! variables that exist, and the job file in the ConfigMap is a valid job.

mod support;

use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::Command;
use support::{python, quill, repo_root, stderr, stdout};

/// Every object of the rendered manifests.
fn rendered() -> Vec<Value> {
    let kubectl = Path::new("/usr/bin/kubectl");
    assert!(
        kubectl.exists(),
        "kubectl is needed to render cluster/k8s (kubectl kustomize) and was not found at /usr/bin/kubectl"
    );
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(repo_root().join("cluster/k8s")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    std::fs::write(dir.path().join("token"), "0123456789abcdef\n").unwrap();
    let out = Command::new(kubectl)
        .arg("kustomize")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "kubectl kustomize: {}", stderr(&out));
    let yaml = dir.path().join("rendered.yaml");
    std::fs::write(&yaml, &out.stdout).unwrap();
    let script =
        "import json, sys, yaml\nprint(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))";
    let out = Command::new(python())
        .args(["-c", script])
        .arg(&yaml)
        .output()
        .unwrap();
    assert!(out.status.success(), "YAML: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn of_kind<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

fn name(object: &Value) -> &str {
    object["metadata"]["name"].as_str().unwrap()
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

/// The `--flags` that `quill <sub> --help` lists.
fn help_flags(sub: &str) -> HashSet<String> {
    let out = quill(&[sub, "--help"]);
    assert!(out.status.success(), "quill {sub} --help: {}", stderr(&out));
    stdout(&out)
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|w| w.starts_with("--"))
        .map(|w| {
            w.trim_end_matches(|c: char| !c.is_alphanumeric())
                .to_owned()
        })
        .collect()
}

#[test]
#[ignore = "slow tier: needs kubectl (and PyYAML from the venv)"]
fn every_container_runs_real_quill_flags() {
    let objects = rendered();
    let workloads: Vec<&Value> = ["StatefulSet", "Deployment"]
        .iter()
        .flat_map(|k| of_kind(&objects, k))
        .collect();
    let services: HashMap<&str, &Value> = of_kind(&objects, "Service")
        .into_iter()
        .map(|s| (name(s), s))
        .collect();
    let configmaps: HashSet<&str> = of_kind(&objects, "ConfigMap")
        .into_iter()
        .map(name)
        .collect();
    let secrets: HashSet<&str> = of_kind(&objects, "Secret").into_iter().map(name).collect();
    let mut subcommands = HashSet::new();
    for workload in &workloads {
        let pod = &workload["spec"]["template"]["spec"];
        for volume in pod["volumes"].as_array().into_iter().flatten() {
            if let Some(map) = volume["configMap"]["name"].as_str() {
                assert!(
                    configmaps.contains(map),
                    "{}: no ConfigMap {map}",
                    name(workload)
                );
            }
        }
        for container in pod["containers"].as_array().unwrap() {
            assert_eq!(
                strings(&container["command"]),
                ["quill"],
                "{}",
                name(workload)
            );
            let args = strings(&container["args"]);
            let sub = args[0].as_str();
            subcommands.insert(sub.to_owned());
            let known = help_flags(sub);
            for flag in args.iter().filter(|a| a.starts_with("--")) {
                assert!(
                    known.contains(flag),
                    "{}: quill {sub} has no flag {flag}",
                    name(workload)
                );
            }
            let env: HashMap<String, &Value> = container["env"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| (e["name"].as_str().unwrap().to_owned(), e))
                .collect();
            let token = env
                .get("QUILL_TOKEN")
                .expect("the token comes from the environment");
            let secret = token["valueFrom"]["secretKeyRef"]["name"].as_str().unwrap();
            assert!(secrets.contains(secret), "no Secret {secret}");
            for arg in &args {
                if let Some(var) = arg.strip_prefix("$(").and_then(|a| a.split(')').next()) {
                    assert!(
                        env.contains_key(var),
                        "{}: $({var}) is not set",
                        name(workload)
                    );
                }
            }
            // Every address dialled is a Service of the manifests on a port it exposes.
            for pair in args.windows(2).filter(|w| w[0] == "--learner") {
                let (host, port) = pair[1].rsplit_once(':').unwrap();
                let service = host.split('.').next_back().unwrap();
                let service = services
                    .get(service)
                    .unwrap_or_else(|| panic!("no Service {service} for {}", pair[1]));
                let ports: Vec<String> = service["spec"]["ports"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| p["port"].to_string())
                    .collect();
                assert!(ports.contains(&port.to_owned()), "{}: port {port}", pair[1]);
            }
            if sub != "reward" {
                let gpus = &container["resources"]["requests"]["nvidia.com/gpu"];
                assert_eq!(gpus.as_i64(), Some(1), "{} requests a GPU", name(workload));
            }
        }
    }
    let expected: HashSet<String> = ["learner", "actor", "reward"].map(String::from).into();
    assert_eq!(subcommands, expected);
    let learner = of_kind(&objects, "StatefulSet")[0];
    assert_eq!(
        learner["spec"]["serviceName"].as_str(),
        Some("quill-learner-ranks")
    );
    assert_eq!(services["quill-learner-ranks"]["spec"]["clusterIP"], "None");
    assert_eq!(
        services["quill-learner"]["spec"]["selector"]["apps.kubernetes.io/pod-index"], "0",
        "the hub Service selects rank 0"
    );
    let names: HashSet<&str> = workloads.iter().map(|w| name(w)).collect();
    assert!(
        names.contains("quill-actor"),
        "kubectl scale deployment/quill-actor works"
    );
}

#[test]
#[ignore = "slow tier: needs kubectl (and PyYAML from the venv)"]
fn the_configmap_holds_a_valid_job() {
    let objects = rendered();
    let map = of_kind(&objects, "ConfigMap")[0];
    let text = map["data"]["job.toml"].as_str().unwrap();
    let job = quill_config::job::JobConfig::from_toml_str(text, "cluster/k8s/job.toml")
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(job.job.output_dir, Path::new("/data/out"));
    assert!(job.cluster.learner_addr.starts_with("0.0.0.0:"));
    let secret = of_kind(&objects, "Secret")[0];
    assert!(
        secret["data"]["token"].is_string(),
        "the token Secret has key token"
    );
}
