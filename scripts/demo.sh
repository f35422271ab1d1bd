#!/usr/bin/env bash
# First version of the demo: a local etcd registry plus the controller, run against the cluster of
# your current kube context. It applies the CRD and examples/greeter.yaml, then runs the
# controller in the foreground; Ctrl-C stops both (keys expire after the lease TTL).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

if ! kubectl cluster-info >/dev/null 2>&1; then
  echo "demo: no reachable cluster in the current kube context (KUBECONFIG)." >&2
  echo "demo: the self-contained control plane arrives with the control-plane work; until then point KUBECONFIG at a cluster." >&2
  exit 1
fi

bin=$(scripts/controlplane.sh)
PROTOC=$(scripts/protoc.sh) cargo build -q --bin grpc-registrar
work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
peer=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$bin/etcd" --data-dir "$work/etcd" --listen-client-urls "http://127.0.0.1:$port" \
  --advertise-client-urls "http://127.0.0.1:$port" --listen-peer-urls "http://127.0.0.1:$peer" \
  --initial-advertise-peer-urls "http://127.0.0.1:$peer" --initial-cluster "default=http://127.0.0.1:$peer" \
  --log-level warn >"$work/etcd.log" 2>&1 &
etcd_pid=$!
trap 'kill $etcd_pid 2>/dev/null; rm -rf "$work"' EXIT

kubectl apply -f crds/grpcservice.yaml
kubectl wait --for condition=established crd/grpcservices.grpc-registrar.io --timeout=30s
kubectl apply -f examples/greeter.yaml
echo "demo: registry etcd at http://127.0.0.1:$port; watch the controller register ready app=greeter pods"
RUST_LOG=${RUST_LOG:-info,grpc_registrar=debug} target/debug/grpc-registrar \
  --etcd-endpoints "http://127.0.0.1:$port" --metrics-addr 127.0.0.1:0
