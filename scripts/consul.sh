#!/usr/bin/env bash
# Builds the pinned Consul agent (version in tests/consul/go.mod) into target/consul/bin, cached.
# Prints the bin directory. The Consul backend's tests and `make demo BACKEND=consul` run it.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
exec "$root/scripts/gobuild.sh" "$root/tests/consul" "${CONSUL_BIN:-$root/target/consul/bin}" \
  consul=github.com/hashicorp/consul
