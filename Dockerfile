# Flash Interp in a container: the backend and the web app built in one stage, a slim runtime in
# the next, with the default model fetched (pip + pinned sha256) at build time.
#
#   docker build -t flash-interp .            (or: podman build --format docker -t flash-interp .)
#   scripts/container-smoke.sh flash-interp  (start, readiness, API, SIGTERM, restart on the volume)
#   docker run -p 8080:8080 -v flash-maps:/data flash-interp
#
# Neuron maps are built at first start (about a minute for the default model on 2 cores; GET
# /readyz answers 200 when they are) and cached in /data, so mount a volume there. Put a reverse
# proxy with TLS in front (see README, "Deploy") and add --trust-x-forwarded-for to the command.

FROM rust:1.89-bookworm AS build
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends nodejs npm python3-pip && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# The web app's toolchain first (a layer that survives source changes): Trunk and wasm-bindgen-cli
# at the version Cargo.lock pins.
COPY Cargo.lock ./
RUN rustup target add wasm32-unknown-unknown \
    && cargo install --locked trunk --version 0.21.14 \
    && cargo install wasm-bindgen-cli --version "$(grep -A1 '^name = "wasm-bindgen"$' Cargo.lock | sed -n 's/^version = "\(.*\)"$/\1/p')"
COPY . .
# scripts/setup.sh with FLASH_INTERP_APP_ONLY=1: npm ci (plotly, wasm-opt), trunk build into
# dist/, and the default model into models/ (no Chromium: that is for the browser tests).
ENV PIP_BREAK_SYSTEM_PACKAGES=1
RUN FLASH_INTERP_APP_ONLY=1 bash scripts/setup.sh && cargo build --release -p flash-interp

FROM debian:bookworm-slim
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends ca-certificates curl && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY --from=build /src/target/release/flash-interp /usr/local/bin/flash-interp
COPY --from=build /src/dist /app/dist
COPY --from=build /src/models/SmolLM2-135M-Instruct.Q4_1.gguf /app/models/SmolLM2-135M-Instruct.Q4_1.gguf
ENV FLASH_INTERP_MODEL=/app/models/SmolLM2-135M-Instruct.Q4_1.gguf \
    FLASH_INTERP_MODELS=/app/models \
    FLASH_INTERP_CACHE=/data/cache \
    FLASH_INTERP_DIST=/app/dist \
    FLASH_INTERP_BIND=0.0.0.0 \
    FLASH_INTERP_PORT=8080
# The unprivileged user must own the volume's mount point (a fresh named volume copies it).
RUN mkdir -p /data/cache && chown -R 65534:65534 /data
VOLUME /data
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=3s CMD curl -fsS http://127.0.0.1:8080/healthz || exit 1
USER 65534:65534
ENTRYPOINT ["flash-interp", "serve"]
