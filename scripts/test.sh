#!/usr/bin/env bash
# The test command: sets everything up on a fresh machine, checks formatting and lints,
# and runs every test in two tiers:
#   fast tier: `cargo test --release` (unit tests and quick integration tests; needs
#              neither transformers nor SLURM nor kubectl),
#   slow tier: `cargo test --release --workspace -- --ignored` (the tests marked
#              `#[ignore = "slow tier: ..."]`: parity with transformers, SLURM, Kubernetes
#              rendering, whole training jobs).
# `scripts/test.sh --fast` stops after the fast tier.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
fast_only=0
case "${1:-}" in
    "") ;;
    --fast) fast_only=1 ;;
    *) echo "usage: scripts/test.sh [--fast]" >&2; exit 2 ;;
esac
"$root/scripts/setup.sh"
cd "$root"
cargo fmt --all --check
cargo clippy --release --workspace --all-targets -- -D warnings
echo "test: fast tier" >&2
cargo test --release --workspace
if [ "$fast_only" -eq 1 ]; then
    exit 0
fi
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
echo "test: slow tier" >&2
cargo test --release --workspace -- --ignored
