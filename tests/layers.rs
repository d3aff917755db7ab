//! The workspace's layering, read from `cargo metadata`: library crates never depend on a
//! role crate, dependencies point down the layers, and the contract and configuration
//! crates stay free of tch (so tools and tests build them without libtorch).

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

/// Each workspace crate with the workspace crates it may depend on.
const ALLOWED: &[(&str, &[&str])] = &[
    ("quill-reward", &[]),
    ("quill-proto", &[]),
    ("quill-telemetry", &[]),
    ("quill-config", &["quill-reward"]),
    ("quill-relay", &["quill-proto"]),
    ("quill-model", &["quill-proto"]),
    (
        "quill-reward-worker",
        &[
            "quill-proto",
            "quill-config",
            "quill-telemetry",
            "quill-model",
            "quill-reward",
        ],
    ),
    (
        "quill-actor",
        &[
            "quill-proto",
            "quill-config",
            "quill-telemetry",
            "quill-relay",
            "quill-model",
        ],
    ),
    (
        "quill-learner",
        &[
            "quill-proto",
            "quill-config",
            "quill-telemetry",
            "quill-relay",
            "quill-model",
            "quill-reward",
        ],
    ),
];

/// The crates that make up a role (a process); only the binary may depend on them.
const ROLES: &[&str] = &["quill-actor", "quill-learner", "quill-reward-worker"];

/// The crates that must build without libtorch.
const WITHOUT_TCH: &[&str] = &[
    "quill-reward",
    "quill-proto",
    "quill-telemetry",
    "quill-config",
    "quill-relay",
];

/// Every workspace package with the names of its normal and build dependencies.
fn workspace() -> BTreeMap<String, BTreeSet<String>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .arg("--manifest-path")
        .arg(&root)
        .output()
        .expect("cargo metadata runs");
    assert!(
        output.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: Value = serde_json::from_slice(&output.stdout).expect("metadata is JSON");
    metadata["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|package| {
            let deps = package["dependencies"]
                .as_array()
                .expect("dependencies")
                .iter()
                .filter(|d| d["kind"].as_str() != Some("dev"))
                .map(|d| d["name"].as_str().expect("name").to_owned())
                .collect();
            (package["name"].as_str().expect("name").to_owned(), deps)
        })
        .collect()
}

#[test]
fn every_library_crate_depends_only_on_the_layers_below_it() {
    let packages = workspace();
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    for (name, deps) in &packages {
        if name == "quill" {
            continue;
        }
        let allowed = allowed
            .get(name.as_str())
            .unwrap_or_else(|| panic!("{name} is not in the layering table of tests/layers.rs"));
        for dep in deps.iter().filter(|d| packages.contains_key(*d)) {
            assert!(
                allowed.contains(&dep.as_str()),
                "{name} depends on {dep}, which is not below it"
            );
            assert!(
                !ROLES.contains(&dep.as_str()),
                "library crate {name} depends on role crate {dep}"
            );
        }
    }
    assert_eq!(
        packages.len(),
        ALLOWED.len() + 1,
        "every crate but the binary is in the table"
    );
}

#[test]
fn contracts_and_configuration_build_without_tch() {
    let packages = workspace();
    for name in WITHOUT_TCH {
        let deps = &packages[*name];
        for torch in ["tch", "torch-sys"] {
            assert!(!deps.contains(torch), "{name} depends on {torch}");
        }
    }
}
