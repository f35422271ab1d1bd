#!/usr/bin/env bash
# Builds the pinned control-plane binaries (etcd, and later kube-apiserver) from
# the Go module in tests/controlplane into target/controlplane/bin.
#
# The build is skipped when the binaries were already built from the same
# go.mod/go.sum with the same Go toolchain (a stamp file records that).
# Prints the bin directory on stdout; build chatter goes to stderr.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
module="$root/tests/controlplane"
bin="${CONTROLPLANE_BIN:-$root/target/controlplane/bin}"
stamp="$bin/.stamp"

# binary name -> Go package (all pinned by tests/controlplane/go.mod)
declare -A packages=(
  [etcd]=go.etcd.io/etcd/server/v3
  [kube-apiserver]=k8s.io/kubernetes/cmd/kube-apiserver
)

if ! command -v go >/dev/null 2>&1; then
  echo "controlplane: the Go toolchain is required to build etcd and kube-apiserver" >&2
  exit 1
fi

want=$( (cat "$module/go.mod" "$module/go.sum"; go version; printf '%s\n' "${!packages[@]}" | sort) | sha256sum | cut -d' ' -f1)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  all_there=1
  for name in "${!packages[@]}"; do [[ -x "$bin/$name" ]] || all_there=0; done
  if [[ $all_there == 1 ]]; then
    echo "$bin"
    exit 0
  fi
fi

mkdir -p "$bin"
for name in "${!packages[@]}"; do
  echo "controlplane: building $name from ${packages[$name]}" >&2
  start=$(date +%s)
  (cd "$module" && CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' -o "$bin/$name" "${packages[$name]}") >&2
  echo "controlplane: built $name in $(( $(date +%s) - start ))s" >&2
done
echo "$want" >"$stamp"
echo "$bin"
