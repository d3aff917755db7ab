//! Helpers shared by quill's integration tests: the project venv's Python, the reference
//! fixtures built with transformers, tensor comparisons.
#![allow(dead_code)] // each test binary uses a different subset

pub mod http;
pub mod job;

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use tch::Tensor;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("cluster/ sits in the repo")
        .to_owned()
}

/// The project venv's Python (made by scripts/setup.sh).
pub fn python() -> PathBuf {
    let python = repo_root().join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/test.sh (it creates the venv)",
        python.display()
    );
    python
}

/// The reference script.
pub fn reference_script() -> PathBuf {
    repo_root().join("tests/reference/reference.py")
}

/// Runs the reference script with `args`, panicking with its stderr on failure.
pub fn run_reference(args: &[&std::ffi::OsStr]) {
    let output = Command::new(python())
        .arg(reference_script())
        .args(args)
        .output()
        .expect("python runs");
    assert!(
        output.status.success(),
        "reference.py {args:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The directory of transformers-built fixtures, built once per script version.
pub fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let script = std::fs::read(reference_script()).expect("reference script");
        let mut hasher = DefaultHasher::new();
        script.hash(&mut hasher);
        let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let dir = base.join(format!("fixtures-{:016x}", hasher.finish()));
        if dir.join("done").exists() {
            return dir;
        }
        let scratch = tempfile::tempdir_in(&base).expect("scratch dir");
        run_reference(&["fixtures".as_ref(), scratch.path().as_os_str()]);
        std::fs::write(scratch.path().join("done"), b"").expect("marker");
        let scratch = scratch.keep();
        if std::fs::rename(&scratch, &dir).is_err() {
            // Another test binary finished first; use its copy.
            let _ = std::fs::remove_dir_all(&scratch);
        }
        dir
    })
}

/// Tensors of a `*.expected.safetensors` fixture.
pub fn expected(name: &str) -> HashMap<String, Tensor> {
    let path = fixtures().join(format!("{name}.expected.safetensors"));
    Tensor::read_safetensors(&path)
        .expect("expected tensors")
        .into_iter()
        .collect()
}

/// Token ids of a 1-D integer tensor.
pub fn ids(t: &Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(&t.to_kind(tch::Kind::Int64)).expect("1-D ids")
}

/// The device the parity tests run quill's side on: `QUILL_TEST_DEVICE` (`cpu`, `cuda`
/// or `cuda:N`; `scripts/gpu-check.sh` sets it), CPU when unset.
pub fn test_device() -> tch::Device {
    match std::env::var("QUILL_TEST_DEVICE").as_deref() {
        Err(_) | Ok("cpu") => tch::Device::Cpu,
        Ok("cuda") => tch::Device::Cuda(0),
        Ok(other) => match other.strip_prefix("cuda:").map(str::parse) {
            Some(Ok(index)) => tch::Device::Cuda(index),
            _ => panic!("QUILL_TEST_DEVICE must be cpu, cuda or cuda:N, got {other:?}"),
        },
    }
}

/// Largest absolute difference between two tensors of the same shape (on any devices).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    let on_cpu = |t: &Tensor| t.to_device(tch::Device::Cpu).to_kind(tch::Kind::Double);
    (on_cpu(a) - on_cpu(b)).abs().max().double_value(&[])
}

/// Runs the `quill` binary with `args` (no `LD_LIBRARY_PATH`: the rpath must do).
pub fn quill(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_quill"))
        .args(args)
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .expect("quill runs")
}

/// A finished command's standard output.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A finished command's standard error.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The two causal-LM fixture variants.
pub const VARIANTS: [&str; 2] = ["tied_gqa_single", "untied_mha_sharded"];
