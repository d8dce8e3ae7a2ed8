# idemq container image.
#
#   docker build -t idemq .
#   docker run --rm -p 9464:9464 -e IDEMQ_NATS_URL=nats://nats:4222 idemq
#
# Two stages: a Debian bookworm Rust toolchain builds the release binary, and
# it is copied alone into distroless/cc-debian12, which has the same glibc
# (bookworm), libgcc and CA certificates the binary needs and nothing else:
# no shell, no package manager, and a non-root user (65532).

# The toolchain CI tests with; any release >= the crate's rust-version (1.89) works.
ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-slim-bookworm AS builder
WORKDIR /build

# Keep symbol names for panic backtraces, drop the debug info.
ENV CARGO_PROFILE_RELEASE_STRIP=debuginfo

# Dependencies first, in their own layer: it is rebuilt only when a manifest
# or Cargo.lock change, not on every source edit. The stub lib and main only
# exist so cargo has targets to build the dependency graph for. The
# workspace's other member (bench/, the benchmark) is only declared: its
# manifest and a stub, never built into the image.
COPY Cargo.toml Cargo.lock ./
COPY bench/Cargo.toml bench/Cargo.toml
RUN mkdir src bench/src \
    && echo 'fn main() {}' > src/main.rs \
    && echo '//! stub' > src/lib.rs \
    && echo '//! stub' > bench/src/lib.rs \
    && echo 'fn main() {}' > bench/src/main.rs \
    && cargo build --release --locked -p idemq --bin idemq \
    && rm -rf src

# The real sources. COPY keeps their old timestamps, which are older than the
# stub build, so touch them or cargo would keep the stub binary.
COPY src ./src
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked -p idemq --bin idemq \
    && ./target/release/idemq --version

FROM gcr.io/distroless/cc-debian12:nonroot AS runtime

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="idemq" \
      org.opencontainers.image.description="Idempotent intent worker for NATS: each intent runs at most once per idempotency key, every copy gets the same answer." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="gcr.io/distroless/cc-debian12:nonroot"

COPY --from=builder /build/target/release/idemq /usr/local/bin/idemq

# Numeric, so Kubernetes' runAsNonRoot can verify it without a passwd lookup.
USER 65532:65532

# Metrics and health endpoints (/metrics, /healthz, /readyz) on the
# conventional port. Without IDEMQ_METRICS_ADDR they are off, and the
# HEALTHCHECK below would fail, so the image turns them on.
ENV IDEMQ_METRICS_ADDR=0.0.0.0:9464
EXPOSE 9464

# The image has no curl or shell: idemq probes its own /healthz
# (127.0.0.1:9464, from IDEMQ_METRICS_ADDR) and exits 0 on 200.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/idemq", "healthcheck"]

# On SIGTERM idemq drains within --grace (10s by default); give it the time:
# `docker stop -t 15` / compose `stop_grace_period`.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/idemq"]
CMD ["serve"]
