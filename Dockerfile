# Clyde agent image: a static-ish release build on Debian, copied into a slim runtime.
# Not built in this project's CI (no Docker engine on its machines); see docs/architecture.md.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# protoc compiles proto/ (the admin API) at build time.
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler \
 && rm -rf /var/lib/apt/lists/*
COPY . .
RUN cargo build --release --locked --bin clyde && strip target/release/clyde

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/clyde /usr/local/bin/clyde
# 30021 mirror (node-local), 30022 peer HTTP, 30023 libp2p, 30024 metrics.
EXPOSE 30021 30022 30023 30024
VOLUME ["/var/lib/clyde"]
ENTRYPOINT ["/usr/local/bin/clyde"]
CMD ["serve"]
