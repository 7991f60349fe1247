# Builds the `ledger` binary and runs it on a slim Debian.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin ledger

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/ledger /usr/local/bin/ledger
USER 65534
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/ledger"]
CMD ["serve"]
