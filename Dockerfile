# syntax=docker/dockerfile:1
#
# ebpf-proxy image where a registry is reachable:
#   docker build -t ghcr.io/ebpf-proxy/ebpf-proxy:0.1.0 .
# (the tag every manifest pulls: the chart's appVersion; `cargo xtask e2e-kind` builds it
# as ebpf-proxy:e2e). Without a registry, `cargo xtask image` builds the same runtime
# layout FROM scratch with buildah (docs/deploy.md, "Image").
#
# Build stage: a non-root user with its own rustup and cargo homes runs `cargo xtask
# setup` (nightly + rust-src + bpf-linker linked against the nightly's LLVM, the same
# toolchain CI uses), then builds the agent, whose build script compiles the eBPF object
# and embeds it in the binary.
# Runtime stage: distroless (glibc + libgcc only, no shell, no package manager); the
# agent needs nothing else at run time (netlink, not iproute2).

ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
ARG RUST_VERSION
RUN useradd --create-home --uid 10001 builder
USER builder
WORKDIR /home/builder/src
ENV RUSTUP_HOME=/home/builder/.rustup \
    CARGO_HOME=/home/builder/.cargo \
    PATH=/home/builder/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# The base image's rustup belongs to root. rustup is a multi-call binary: run as
# `rustup-init` it installs a private toolchain into our RUSTUP_HOME/CARGO_HOME.
RUN cp /usr/local/cargo/bin/rustup /tmp/rustup-init \
 && /tmp/rustup-init -y --no-modify-path --profile minimal --default-toolchain "${RUST_VERSION}" \
 && rm /tmp/rustup-init

# Toolchain layer: depends only on the workspace manifests and xtask, so editing the
# proxy's sources does not rebuild bpf-linker. Stub targets let cargo load the workspace;
# they are removed before the real sources are copied in.
COPY --chown=builder:builder Cargo.toml Cargo.lock ./
COPY --chown=builder:builder .cargo/ .cargo/
COPY --chown=builder:builder xtask/ xtask/
COPY --chown=builder:builder proxy-common/Cargo.toml proxy-common/
COPY --chown=builder:builder proxy-ebpf/Cargo.toml proxy-ebpf/
COPY --chown=builder:builder proxy-userspace/Cargo.toml proxy-userspace/
COPY --chown=builder:builder tests/Cargo.toml tests/
COPY --chown=builder:builder bench/Cargo.toml bench/
RUN for d in proxy-common proxy-ebpf proxy-userspace tests bench; do mkdir -p "$d/src" && touch "$d/src/lib.rs"; done \
 && echo 'fn main() {}' > proxy-ebpf/src/main.rs \
 && echo 'fn main() {}' > proxy-userspace/src/main.rs \
 && mkdir -p bench/src/bin \
 && echo 'fn main() {}' > bench/src/main.rs \
 && echo 'fn main() {}' > bench/src/bin/bench-podserver.rs \
 && cargo xtask setup \
 && rm -rf proxy-common/src proxy-ebpf/src proxy-userspace/src tests/src bench/src target

COPY --chown=builder:builder . .
RUN cargo build --release --locked -p proxy-userspace \
 && install -D -m 0755 target/release/ebpf-proxy /home/builder/out/ebpf-proxy

# bookworm's glibc above matches debian12's here. The default (not :nonroot) variant runs
# as root: the agent pins under /sys/fs/bpf, which is root's (the DaemonSet says so too).
FROM gcr.io/distroless/cc-debian12 AS runtime
LABEL org.opencontainers.image.title="ebpf-proxy" \
      org.opencontainers.image.description="eBPF kube-proxy replacement: agent and operator CLI" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /home/builder/out/ebpf-proxy /usr/local/bin/ebpf-proxy
# /healthz, /readyz, /metrics (hostNetwork: this is the node's port).
EXPOSE 10256
ENTRYPOINT ["/usr/local/bin/ebpf-proxy"]
CMD ["agent"]
