#!/usr/bin/env bash
# Builds the pinned control-plane binaries (etcd, kube-apiserver, kube-controller-manager for
# real EndpointSlices, and the kubectl and etcdctl that tests, the demo and the dev loop use;
# versions in tests/controlplane/go.mod) into target/controlplane/bin, cached. Prints the bin
# directory.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Stamp the Kubernetes binaries with their module version, as release builds do (clients such as
# helm check it; an unstamped build reports v0.0.0-master).
k8s=$(sed -n 's/^\tk8s.io\/kubernetes \(v[0-9.]*\).*/\1/p' "$root/tests/controlplane/go.mod")
[[ -n $k8s ]] || { echo "controlplane: no k8s.io/kubernetes version in tests/controlplane/go.mod" >&2; exit 1; }
minor=$(echo "$k8s" | cut -d. -f2)
pkg=k8s.io/component-base/version
version_flags="-X $pkg.gitVersion=$k8s -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
exec "$root/scripts/gobuild.sh" "$root/tests/controlplane" "${CONTROLPLANE_BIN:-$root/target/controlplane/bin}" \
  etcd=go.etcd.io/etcd/server/v3 \
  etcdctl=go.etcd.io/etcd/etcdctl/v3 \
  "kube-apiserver=k8s.io/kubernetes/cmd/kube-apiserver;$version_flags" \
  "kube-controller-manager=k8s.io/kubernetes/cmd/kube-controller-manager;$version_flags" \
  "kubectl=k8s.io/kubernetes/cmd/kubectl;$version_flags"
