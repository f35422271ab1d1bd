#!/usr/bin/env bash
# Builds the pinned helm (version in tests/helm/go.mod) into target/helm/bin, cached.
# Prints the bin directory.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mod=$root/tests/helm/go.mod
# Stamp it as helm's own Makefile stamps release builds. Above all the default Kubernetes
# version (.Capabilities.KubeVersion without --kube-version, and the lint deprecation checks):
# unstamped it is v1.20.0, which fails the chart's kubeVersion. The Makefile derives it from
# k8s.io/client-go vM.N.P as (M+1).N, e.g. v0.37.0 -> 1.37.
helm=$(sed -n 's/^\thelm\.sh\/helm\/v3 \(v[0-9.]*\).*/\1/p' "$mod")
client_go=$(sed -n 's/^\tk8s\.io\/client-go v\([0-9]*\.[0-9]*\)\.[0-9]*.*/\1/p' "$mod")
[[ -n $helm && -n $client_go ]] || { echo "helm: no helm.sh/helm/v3 or k8s.io/client-go version in $mod" >&2; exit 1; }
major=$(( ${client_go%%.*} + 1 ))
minor=${client_go#*.}
flags="-X helm.sh/helm/v3/internal/version.version=$helm"
for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
  flags+=" -X $pkg.k8sVersionMajor=$major -X $pkg.k8sVersionMinor=$minor"
done
exec "$root/scripts/gobuild.sh" "$root/tests/helm" "$root/target/helm/bin" \
  "helm=helm.sh/helm/v3/cmd/helm;$flags"
