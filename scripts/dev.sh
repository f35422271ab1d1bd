#!/usr/bin/env bash
# The local dev loop: a control plane that stays up, with the real controller binary.
#
#   scripts/dev.sh up     builds, starts kube-apiserver (+ its etcd), a registry etcd and the
#                         controller in the background, and prints what to export
#   scripts/dev.sh down   stops all of it
#
# State (the env file, the controller log, the supervisor's pid and log) lives in $DEV_DIR
# (default target/dev). `source target/dev/env` gives KUBECONFIG, ETCDCTL_ENDPOINTS and a PATH
# with the pinned kubectl and etcdctl.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dir=${DEV_DIR:-$root/target/dev}
pidfile=$dir/devloop.pid

running() { [[ -f $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

show() {
  cat "$dir/env"
  cat <<MSG

The dev loop is up. In your shell:
  source $dir/env
  kubectl apply -f $root/demo/greeter.yaml               # or your own GrpcServices and pods
  kubectl get grpcsvc -A                                 # READY / STATUS / TARGET / ENDPOINTS
  etcdctl get --prefix services/                         # what clients resolve
  curl -s \$GRPC_REGISTRAR_METRICS | grep grpc_registrar  # metrics
  tail -f \$GRPC_REGISTRAR_LOG                            # the controller's log
There is no kubelet: mark a pod ready as one would, e.g.
  kubectl patch pod NAME --subresource=status --type=merge -p '{"status":{"phase":"Running","podIP":"10.1.0.1","conditions":[{"type":"Ready","status":"True"}]}}'
Stop it with: $root/scripts/dev.sh down
MSG
}

case ${1:-} in
  up)
    if running; then
      echo "dev loop already running (pid $(cat "$pidfile"))" >&2
      show
      exit 0
    fi
    mkdir -p "$dir"
    rm -f "$dir/env"
    if [[ -z ${DEV_SKIP_BUILD:-} ]]; then
      "$root/scripts/protoc.sh" >/dev/null
      "$root/scripts/controlplane.sh" >/dev/null
      (cd "$root" && cargo build -q --bin grpc-registrar && cargo build -q -p demo --bin devloop)
    fi
    devloop=${DEVLOOP_BIN:-$root/target/debug/devloop}
    controller=${GRPC_REGISTRAR_BIN:-$root/target/debug/grpc-registrar}
    setsid "$devloop" "$dir" "$controller" >"$dir/devloop.log" 2>&1 < /dev/null &
    echo $! >"$pidfile"
    for _ in $(seq 1 600); do
      [[ -f $dir/env ]] && { show; exit 0; }
      if ! running; then
        echo "dev loop failed to start; its log ($dir/devloop.log):" >&2
        cat "$dir/devloop.log" >&2
        exit 1
      fi
      sleep 0.2
    done
    echo "dev loop not ready after 120 s; see $dir/devloop.log" >&2
    exit 1
    ;;
  down)
    if ! running; then
      echo "dev loop not running"
      rm -f "$pidfile" "$dir/env"
      exit 0
    fi
    pid=$(cat "$pidfile")
    kill -TERM "$pid"
    for _ in $(seq 1 300); do
      kill -0 "$pid" 2>/dev/null || { rm -f "$pidfile"; echo "dev loop stopped"; exit 0; }
      sleep 0.1
    done
    echo "dev loop did not stop within 30 s; killing it" >&2
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid"
    rm -f "$pidfile" "$dir/env"
    ;;
  *)
    echo "usage: scripts/dev.sh up|down" >&2
    exit 2
    ;;
esac
