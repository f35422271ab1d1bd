#!/usr/bin/env bash
# Builds the Go interop client (tests/interop: etcd's naming resolver and endpoints manager)
# into target/interop/bin, cached. Prints the bin directory.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
exec "$root/scripts/gobuild.sh" "$root/tests/interop" "$root/target/interop/bin" \
  interop=github.com/grpc-registrar/grpc-registrar/tests/interop
