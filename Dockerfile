# syntax=docker/dockerfile:1
# The widgets service: a release build in the Rust image, run from a slim Debian image as
# a non-root user. Single node by default; Redis mode with --build-arg FEATURES=redis:
#   docker build -t widgets:0.1.0 .
#   docker build -t widgets:0.1.0-redis --build-arg FEATURES=redis .
# Every setting comes from the environment at run time (README, Settings); nothing secret
# is baked in.

# The toolchain: Rust 1.89 or newer, the rust-version in Cargo.toml (deploy/check.py holds
# this line and the tag below to it). Bookworm, as the runtime image below, so the binary
# links against the glibc it runs with.
FROM rust:1.93-slim-bookworm AS build
# Cargo features of the build: empty (single node) or "redis".
ARG FEATURES=""
WORKDIR /src
COPY . .
# The registry and target caches stay between builds (BuildKit); the binary is copied out
# of the cached target directory, which the next stage cannot see.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p widgets ${FEATURES:+--features "$FEATURES"} \
    && cp target/release/widgets /usr/local/bin/widgets

FROM debian:bookworm-slim
# ca-certificates: the roots TLS to PostgreSQL and Redis trusts (README, TLS to PostgreSQL
# and Redis); no list of roots is built into the binary. Debian stable only takes security
# fixes into it: an exact version pin would break the build whenever the archive moves on,
# for no reproducibility gained.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 widgets \
    && useradd --system --uid 10001 --gid widgets --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin widgets \
    && mkdir /data \
    && chown widgets:widgets /data
COPY --from=build /usr/local/bin/widgets /usr/local/bin/widgets
# Numeric, so Kubernetes' runAsNonRoot can check it.
USER 10001:10001
# The WAL (/data/wal) and the embedded store (/data/store): the single node's state.
VOLUME ["/data"]
ENV WIDGETS_LISTEN=0.0.0.0:8080 \
    WIDGETS_DATA_DIR=/data
EXPOSE 8080
# SIGTERM starts the graceful stop: finish in-flight requests, flush to the store, close
# the WAL (README, Durability). Give it the time that takes (docker stop -t, Kubernetes'
# terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
# No subcommand: serve. `docker run IMAGE migrate` and the like run the others.
ENTRYPOINT ["/usr/local/bin/widgets"]
