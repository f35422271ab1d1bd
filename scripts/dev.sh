#!/usr/bin/env bash
# The local dev loop: a control plane that stays up, with the real controller binary.
#
#   scripts/dev.sh up     builds, starts kube-apiserver (+ its etcd), a registry etcd and the
#                         controller in the background, and prints what to export
#   scripts/dev.sh down   stops all of it
#   scripts/dev.sh status         says whether the control plane and the controller run
#   scripts/dev.sh restart        rebuilds the controller and restarts it alone
#   scripts/dev.sh ready POD [IP]  marks a pod Running and Ready as a kubelet would
#   scripts/dev.sh unready POD     marks it not Ready
#   scripts/dev.sh delete POD      deletes it at once (no kubelet confirms a graceful delete)
#   (POD is NAME or NAMESPACE/NAME; IP defaults to the pod's, or one derived from its name)
#
# State (the env file, the controller log, the supervisor's pid and log) lives in $DEV_DIR
# (default target/dev). `source target/dev/env` gives KUBECONFIG, ETCDCTL_ENDPOINTS and a PATH
# with the pinned kubectl and etcdctl.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dir=${DEV_DIR:-$root/target/dev}
pidfile=$dir/devloop.pid

running() { [[ -f $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }
controller_running() { [[ -f $dir/controller.pid ]] && kill -0 "$(cat "$dir/controller.pid")" 2>/dev/null; }

need_up() {
  running || { echo "dev loop not running; start it with: make dev" >&2; exit 1; }
  # shellcheck disable=SC1091
  source "$dir/env"
}

# NAME or NAMESPACE/NAME -> "-n NAMESPACE NAME"
pod_args() {
  local pod=$1
  if [[ $pod == */* ]]; then echo "-n ${pod%%/*} ${pod#*/}"; else echo "-n default $pod"; fi
}

set_ready() {
  local pod=$1 ready=$2 ip=${3:-}
  # shellcheck disable=SC2046
  if [[ -z $ip ]]; then
    ip=$(kubectl get pod $(pod_args "$pod") -o 'jsonpath={.status.podIP}')
  fi
  if [[ -z $ip ]]; then
    local n
    n=$(printf '%s' "$pod" | cksum | cut -d' ' -f1)
    ip=10.1.$(( n / 250 % 250 )).$(( n % 250 + 1 ))
  fi
  # shellcheck disable=SC2046
  kubectl patch pod $(pod_args "$pod") --subresource=status --type=merge -p \
    "{\"status\":{\"phase\":\"Running\",\"podIP\":\"$ip\",\"podIPs\":[{\"ip\":\"$ip\"}],\"conditions\":[{\"type\":\"Ready\",\"status\":\"$ready\"}]}}"
}

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
There is no kubelet, so pods stay Pending until you act as one (pods run on node demo-node):
  $root/scripts/dev.sh ready greeter-0 [IP]             # Running and Ready (unready: not Ready)
  $root/scripts/dev.sh delete greeter-0                 # delete now (no kubelet confirms)
  $root/scripts/dev.sh restart                          # rebuild and restart the controller alone
  $root/scripts/dev.sh status                           # is everything still running?
Stop it with: $root/scripts/dev.sh down
MSG
}

case ${1:-} in
  up)
    if running; then
      echo "dev loop already running (pid $(cat "$pidfile"))" >&2
      controller_running || echo "but its controller is not running: scripts/dev.sh restart" >&2
      show
      exit 0
    fi
    mkdir -p "$dir"
    rm -f "$dir/env"
    if [[ -z ${DEV_SKIP_BUILD:-} ]]; then
      echo "==> Fetching or building the tools it runs (cached after the first run, which takes minutes)"
      "$root/scripts/protoc.sh" >/dev/null
      "$root/scripts/controlplane.sh" >/dev/null
      echo "==> Building the controller and the dev loop (the first build takes a few minutes)"
      (cd "$root" && cargo build -q --bin grpc-registrar && cargo build -q -p demo --bin devloop)
    fi
    echo "==> Starting kube-apiserver (+ its etcd), a registry etcd and the controller"
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
  status)
    if ! running; then echo "dev loop not running"; exit 1; fi
    echo "dev loop running (pid $(cat "$pidfile"))"
    if controller_running; then
      echo "controller running (pid $(cat "$dir/controller.pid")); log: $dir/controller.log"
    else
      echo "controller NOT running; see $dir/devloop.log and $dir/controller.log; scripts/dev.sh restart starts it"
      exit 1
    fi
    ;;
  restart)
    running || { echo "dev loop not running; start it with: make dev" >&2; exit 1; }
    if [[ -z ${DEV_SKIP_BUILD:-} ]]; then
      (cd "$root" && cargo build -q --bin grpc-registrar)
    fi
    old=$(cat "$dir/controller.pid" 2>/dev/null || true)
    kill -HUP "$(cat "$pidfile")"
    for _ in $(seq 1 300); do
      new=$(cat "$dir/controller.pid" 2>/dev/null || true)
      if [[ -n $new && $new != "$old" ]] && kill -0 "$new" 2>/dev/null; then
        echo "controller restarted (pid $new); log: $dir/controller.log"
        exit 0
      fi
      sleep 0.1
    done
    echo "controller did not restart within 30 s; see $dir/devloop.log" >&2
    exit 1
    ;;
  ready|unready)
    [[ -n ${2:-} ]] || { echo "usage: scripts/dev.sh $1 POD [IP]" >&2; exit 2; }
    need_up
    if [[ $1 == ready ]]; then set_ready "$2" True "${3:-}"; else set_ready "$2" False "${3:-}"; fi
    ;;
  delete)
    [[ -n ${2:-} ]] || { echo "usage: scripts/dev.sh delete POD" >&2; exit 2; }
    need_up
    # shellcheck disable=SC2046
    kubectl delete pod $(pod_args "$2") --force --grace-period=0 2>&1 | grep -v "^Warning: Immediate deletion"
    ;;
  *)
    echo "usage: scripts/dev.sh up|down|status|restart|ready POD [IP]|unready POD|delete POD" >&2
    exit 2
    ;;
esac
