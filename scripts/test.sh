#!/usr/bin/env bash
# Run every test: installs what is missing (scripts/setup.sh), then the whole workspace's tests,
# the real default model included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo test --release --workspace
