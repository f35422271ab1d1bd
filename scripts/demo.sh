#!/usr/bin/env bash
# make demo: builds everything, then runs the demo binary (demo/src/main.rs) against a real
# control plane it starts and stops itself. BACKEND=consul (make demo BACKEND=consul) runs it
# with Consul's catalog as the registry instead of etcd.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
echo "==> Fetching or building the tools it runs (cached after the first run, which takes minutes)"
scripts/protoc.sh >/dev/null
scripts/controlplane.sh >/dev/null
if [[ ${BACKEND:-etcd} == consul ]]; then
  scripts/consul.sh >/dev/null
  scripts/interop.sh >/dev/null
fi
echo "==> Building the demo (the first build takes a few minutes)"
cargo build -q -p demo
exec cargo run -q -p demo
