#!/usr/bin/env bash
# make demo: builds everything, then runs the demo binary (demo/src/main.rs) against a real
# control plane it starts and stops itself.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
scripts/protoc.sh >/dev/null
scripts/controlplane.sh >/dev/null
exec cargo run -q -p demo
