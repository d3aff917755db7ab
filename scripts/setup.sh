#!/usr/bin/env bash
# Creates (or refreshes) the project-local Python virtual environment in .venv with
# libtorch for tch (torch==2.13.0 from PyPI) and the reference stack used by the parity
# tests and benchmarks, then points .venv/libtorch at torch's folder, where
# .cargo/config.toml tells the build to find libtorch. Idempotent: does nothing when the
# venv already matches scripts/requirements.txt.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
requirements="$root/scripts/requirements.txt"
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$requirements" | cut -d' ' -f1)"

if ! command -v cargo >/dev/null; then
    echo "setup: cargo is not on PATH; install Rust from https://rustup.rs first" >&2
    exit 1
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    python="$(command -v python3 || true)"
    if [ -z "$python" ] || ! "$python" -c 'import venv, ensurepip' 2>/dev/null; then
        echo "setup: python3 with the venv module is needed (Debian: apt-get install python3-venv)" >&2
        exit 1
    fi
    echo "setup: creating $venv with $(grep -c '==' "$requirements") pinned packages (torch is ~5 GB)" >&2
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet -r "$requirements"
    echo "$want" >"$stamp"
fi
torch_dir="$("$venv/bin/python" -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
ln -sfn "$torch_dir" "$venv/libtorch"
