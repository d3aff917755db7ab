#!/usr/bin/env bash
# The main job: sets everything up on a fresh machine, builds quill, and runs a small local
# job on the embedded default model. Extra arguments go to `quill generate`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
cd "$root"
cargo build --release --bin quill
exec "$root/target/release/quill" generate \
    --model default \
    --prompt "Write a 300-word story about a lighthouse keeper." \
    --prompt "写一篇关于春天的800字散文。" \
    -n 4 --max-new-tokens 256 "$@"
