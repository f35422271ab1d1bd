# The controller image the Helm chart runs (ghcr.io/grpc-registrar/grpc-registrar).
#   docker build -t ghcr.io/grpc-registrar/grpc-registrar:0.1.0 .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin grpc-registrar

# glibc, CA roots and a nonroot user (65532), nothing else.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/grpc-registrar /usr/local/bin/grpc-registrar
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/grpc-registrar"]
