# voltcast: one binary for the pipeline, the simulator and the head-unit simulator.
# Multi-stage: the toolchain and build cache stay in the builder; the runtime image is
# Debian slim with the three shared libraries the binary links (OpenSSL for Kafka TLS
# and webhooks, fontconfig for `forecast --plot`) and curl for health checks.

FROM rust:1.95-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake libssl-dev libfontconfig1-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin voltcast \
    && cp target/release/voltcast /usr/local/bin/voltcast

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl libssl3 libfontconfig1 fonts-dejavu-core \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --create-home --home-dir /var/lib/voltcast voltcast
COPY --from=build /usr/local/bin/voltcast /usr/local/bin/voltcast
USER voltcast
WORKDIR /var/lib/voltcast
ENTRYPOINT ["voltcast"]
CMD ["--help"]
