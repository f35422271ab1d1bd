#!/usr/bin/env bash
# Builds the pinned control-plane binaries (etcd and kube-apiserver, versions in
# tests/controlplane/go.mod) into target/controlplane/bin, cached. Prints the bin directory.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
exec "$root/scripts/gobuild.sh" "$root/tests/controlplane" "${CONTROLPLANE_BIN:-$root/target/controlplane/bin}" \
  etcd=go.etcd.io/etcd/server/v3 \
  kube-apiserver=k8s.io/kubernetes/cmd/kube-apiserver
