# syntax=docker/dockerfile:1
# One image for every Fieldline service; pick the role with `serve --services <name>`.

FROM rust:1-bookworm AS builder
WORKDIR /src
# Shown by fieldline_build_info{commit}: `docker build --build-arg FL_BUILD_COMMIT=$(git rev-parse --short HEAD)`.
ARG FL_BUILD_COMMIT=unknown
ENV FL_BUILD_COMMIT=${FL_BUILD_COMMIT}
COPY . .
# The registry and target dirs are cache mounts, so they are gone after this RUN:
# copy the binary out of the target dir inside the same step.
# No protoc needed: the .proto files are compiled by a pure-Rust compiler at build time.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin fieldline \
    && install -D -m 0755 target/release/fieldline /out/fieldline

FROM debian:bookworm-slim
# ca-certificates: webhook POSTs to third parties and OTLP export over TLS. Left
# unpinned on purpose so a rebuild picks up Debian's security updates.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin fieldline
COPY --from=builder /out/fieldline /usr/local/bin/fieldline
ENV FIELDLINE_HTTP_ADDR=0.0.0.0:8080
USER 10001
EXPOSE 8080
# Ready means NATS, PostgreSQL and the service's own checks pass; the binary checks itself
# (the slim image has no curl), on the port of FIELDLINE_HTTP_ADDR.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["fieldline", "healthcheck"]
ENTRYPOINT ["fieldline"]
CMD ["serve", "--services", "all"]
