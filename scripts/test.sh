#!/usr/bin/env bash
# The test command: sets everything up on a fresh machine, checks formatting and lints,
# and runs every test (unit, parity against transformers, end-to-end CLI).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
# tests/slurm.rs starts its own SLURM cluster (munged, slurmctld, slurmd); install
# Debian's packages when they are missing. No daemon is started here.
missing() { ! command -v "$1" >/dev/null && [ ! -x "/usr/sbin/$1" ]; }
if missing sbatch || missing munged || missing slurmctld || missing slurmd; then
    echo "test: installing slurm-wlm and munge with apt-get" >&2
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi
# tests/k8s.rs renders the Kubernetes manifests offline with `kubectl kustomize`.
if ! command -v kubectl >/dev/null; then
    echo "test: installing kubernetes-client (kubectl) with apt-get" >&2
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubernetes-client >/dev/null
fi
cd "$root"
cargo fmt --all --check
cargo clippy --release --workspace --all-targets -- -D warnings
cargo test --release --workspace
