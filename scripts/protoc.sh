#!/usr/bin/env bash
# Ensures protoc (needed by etcd-client's and our own tonic build scripts) is
# available, installing Debian's protobuf-compiler when it is missing.
# Prints the path of protoc on stdout.
set -euo pipefail

if [[ -n "${PROTOC:-}" && -x "${PROTOC}" ]]; then
  echo "$PROTOC"
  exit 0
fi
if command -v protoc >/dev/null 2>&1; then
  command -v protoc
  exit 0
fi
if command -v apt-get >/dev/null 2>&1; then
  sudo=""
  [[ $(id -u) == 0 ]] || sudo="sudo"
  echo "protoc: installing Debian's protobuf-compiler" >&2
  $sudo apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq protobuf-compiler >&2
  command -v protoc
  exit 0
fi
echo "protoc: not found; install protobuf-compiler (protoc >= 3.15) or set PROTOC" >&2
exit 1
