#!/usr/bin/env bash
# Smoke-test a built image (`docker build -t flash-interp .` or `podman build ...`): start it with
# a maps volume, wait for /readyz, check the API, a page, a link-preview card, then stop it with
# SIGTERM and check that it exits cleanly, and that a restart finds its maps cached in the volume.
#
#   scripts/container-smoke.sh [IMAGE]        (ENGINE=docker to use docker; default podman)
#   RUN_ARGS="--runtime /usr/sbin/runc"       extra `run` options for a restricted host
set -euo pipefail
IMAGE=${1:-flash-interp}
ENGINE=${ENGINE:-podman}
PORT=${PORT:-18080}
VOLUME=flash-interp-smoke-$$
NAME=flash-interp-smoke-$$
# shellcheck disable=SC2086
start() { $ENGINE run -d --name "$NAME" ${RUN_ARGS:-} -p "127.0.0.1:$PORT:8080" -v "$VOLUME:/data" "$IMAGE" >/dev/null; }
cleanup() {
    $ENGINE rm -f "$NAME" >/dev/null 2>&1 || true
    $ENGINE volume rm -f "$VOLUME" >/dev/null 2>&1 || true
}
trap cleanup EXIT
base=http://127.0.0.1:$PORT

ready() {
    local t0=$SECONDS
    until curl -fsS "$base/readyz" >/dev/null 2>&1; do
        if ((SECONDS - t0 > 600)); then
            echo "not ready after 600 s"; $ENGINE logs "$NAME" | tail -20; exit 1
        fi
        sleep 2
    done
    echo "ready after $((SECONDS - t0)) s"
}

start
ready
model=$(curl -fsS "$base/api/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])')
echo "model: $model"
curl -fsS "$base/api/models/$model/search?tokens=%20dog&top=3" | python3 -c '
import json, sys
r = json.load(sys.stdin)
h = r["top"][0]
print("search \" dog\": strongest", h["layer"], h["neuron"], h["top_tokens"][:5])
assert len(r["layers"]) == 30'
curl -fsS "$base/neuron/29/808" | grep -q 'og:image' || { echo "the permalink has no og:image"; exit 1; }
echo "permalink: link-preview tags present"
curl -fsS -o /tmp/smoke-card.png -w 'card: %{http_code} %{content_type} %{size_download} bytes\n' "$base/api/models/$model/search/card.png?tokens=+dog"
curl -fsS "$base/api/models/$model/gallery" | python3 -c '
import json, sys
n = len(json.load(sys.stdin)["examples"])
print("gallery examples:", n)
assert n >= 3, "the default model should have its gallery"'
curl -fsS -X POST "$base/api/models/$model/generate" -H 'content-type: application/json' \
    -d '{"prompt":{"text":"What is the capital of France?"},"sampling":{"max_new_tokens":12}}' |
    python3 -c 'import json,sys; print("generate:", repr(json.load(sys.stdin)["completions"][0]["text"]))'

t0=$SECONDS
$ENGINE stop -t 20 "$NAME" >/dev/null
code=$($ENGINE inspect -f '{{.State.ExitCode}}' "$NAME")
echo "stopped by SIGTERM in $((SECONDS - t0)) s, exit code $code"
[ "$code" = 0 ]
$ENGINE rm "$NAME" >/dev/null

# The maps are in the volume: a second start loads every one from the cache.
start
ready
cached=$($ENGINE logs "$NAME" 2>&1 | grep -c "ready: Cache" || true)
echo "maps loaded from the volume's cache: $cached of 3"
[ "$cached" = 3 ]
echo "container smoke test passed"
