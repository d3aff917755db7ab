#!/usr/bin/env bash
# The main job: sets everything up on a fresh machine, builds quill, runs the small local
# RL job of configs/default.toml (learner, actor and reward worker as separate processes on
# loopback, the embedded tiny model) into a fresh folder under runs/, and draws its curves.
# Extra arguments go to `quill launch local`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
cd "$root"
cargo build --release --bin quill
out="$root/runs/default-$(date +%Y%m%d-%H%M%S)"
"$root/target/release/quill" launch local --config "$root/configs/default.toml" --output-dir "$out" --threads 1 "$@"
"$root/target/release/quill" plot "$out/metrics.jsonl" --out "$out/plots"
