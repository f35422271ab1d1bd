#!/usr/bin/env bash
# Builds the pinned helm (version in tests/helm/go.mod) into target/helm/bin, cached.
# Prints the bin directory.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
exec "$root/scripts/gobuild.sh" "$root/tests/helm" "$root/target/helm/bin" \
  helm=helm.sh/helm/v3/cmd/helm
