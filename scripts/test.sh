#!/usr/bin/env bash
# The test command: sets everything up on a fresh machine, checks formatting and lints,
# and runs every test (unit, parity against transformers, end-to-end CLI).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
cd "$root"
cargo fmt --all --check
cargo clippy --release --workspace --all-targets -- -D warnings
cargo test --release --workspace
