#!/usr/bin/env bash
# GPU readiness check: on a CUDA machine with this repository set up (Rust toolchain,
# `scripts/setup.sh`'s .venv), runs
#   1. the parity tests (model logits, cached decoding, the GRPO step in f32 and bf16
#      against PyTorch) with quill's side on CUDA (QUILL_TEST_DEVICE=cuda),
#   2. steps of two (and three, with three GPUs) ranks over NCCL for each sharding mode
#      against the one-rank result: the multi-rank test named below, once per mode, with
#      QUILL_TEST_COLLECTIVE=nccl (rank r on cuda:r) and QUILL_TEST_SHARDING=<mode>; it
#      needs at least two GPUs and is skipped, and said so, on a machine with one,
#   3. `quill bench generate` on CUDA in bf16,
# and prints each command before it runs, then the figures the tests and the benchmark
# print. On a machine without CUDA it stops at once with exit status 1.
#
# This script has never run on a GPU (no GPU machine was available when it was written).
# Step 2 is a contract with the multi-rank test it names: that test reads
# QUILL_TEST_COLLECTIVE (ring | nccl) and QUILL_TEST_SHARDING (the modes to check).
#
# Environment:
#   QUILL_GPU_CHECK_MODES       sharding modes for step 2 (default "none zero1 zero2 zero3")
#   QUILL_GPU_CHECK_MULTI_RANK  the multi-rank test, as `<package> <test path>` (default
#                               "quill-learner train::shard::tests::sharded_ranks_take_the_same_steps_as_one_rank")
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

fail() {
    echo "gpu-check: $*" >&2
    exit 1
}

command -v nvidia-smi >/dev/null 2>&1 || fail "no CUDA here: nvidia-smi is not installed; run this on a machine with an NVIDIA GPU"
gpus="$(nvidia-smi -L 2>/dev/null || true)"
[ -n "$gpus" ] || fail "no CUDA here: nvidia-smi lists no GPU; run this on a machine with an NVIDIA GPU"
python="$root/.venv/bin/python"
[ -x "$python" ] || fail "$python is missing: run scripts/setup.sh first"
"$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' ||
    fail "the venv's torch does not see CUDA (torch.cuda.is_available() is false)"
command -v cargo >/dev/null 2>&1 || fail "cargo is missing: install the Rust toolchain"

echo "gpu-check: GPUs:"
echo "$gpus"
failures=()

run() {
    echo
    echo "gpu-check: running: $*"
    if ! "$@"; then
        failures+=("$*")
    fi
}

# 1. Parity with transformers/PyTorch, quill on CUDA (--nocapture prints the figures).
run env QUILL_TEST_DEVICE=cuda cargo test --release -p quill --test model_parity \
    -- --include-ignored --nocapture --test-threads=1
run env QUILL_TEST_DEVICE=cuda cargo test --release -p quill --test grpo_parity \
    -- --include-ignored --nocapture --test-threads=1

# 2. Two (or three) ranks over NCCL, each sharding mode, against one rank.
read -r multi_package multi_test <<<"${QUILL_GPU_CHECK_MULTI_RANK:-quill-learner train::shard::tests::sharded_ranks_take_the_same_steps_as_one_rank}"
gpu_count="$(printf '%s\n' "$gpus" | grep -c '^GPU ' || true)"
if [ "$gpu_count" -ge 2 ]; then
    for mode in ${QUILL_GPU_CHECK_MODES:-none zero1 zero2 zero3}; do
        run env QUILL_TEST_COLLECTIVE=nccl QUILL_TEST_SHARDING="$mode" \
            cargo test --release -p "$multi_package" --lib -- --exact "$multi_test" \
            --include-ignored --nocapture
    done
else
    echo
    echo "gpu-check: step 2 skipped: NCCL ranks need one GPU each and this machine has $gpu_count"
fi

# 3. Generation throughput on CUDA (quill in bf16; the transformers peer as
#    `quill bench generate` runs it).
run cargo run --release -p quill -- bench generate --device cuda --dtype bf16 \
    --python "$python"

echo
if [ "${#failures[@]}" -gt 0 ]; then
    echo "gpu-check: FAILED:"
    printf '  %s\n' "${failures[@]}"
    exit 1
fi
echo "gpu-check: every check passed"
