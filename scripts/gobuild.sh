#!/usr/bin/env bash
# Builds Go binaries pinned by one Go module, cached.
#
#   scripts/gobuild.sh MODULE_DIR BIN_DIR NAME=PACKAGE[;LDFLAGS]...
#
# LDFLAGS, when given, are added to the link (e.g. -X flags that stamp a version).
#
# The build is skipped when BIN_DIR already holds every NAME, built from the same go.mod/go.sum
# and sources with the same Go toolchain (a stamp file records that). Prints BIN_DIR on stdout; build
# chatter goes to stderr. Fails when Go is missing: nothing that needs these binaries may skip.
set -euo pipefail

module=$(cd "$1" && pwd)
bin=$2
shift 2
stamp="$bin/.stamp"

if ! command -v go >/dev/null 2>&1; then
  echo "gobuild: the Go toolchain is required to build $*" >&2
  exit 1
fi

# The module's own sources count too (the pinned modules have none; tests/interop does).
want=$( (cat "$module/go.mod" "$module/go.sum"; find "$module" -maxdepth 1 -name '*.go' | sort | xargs -r cat; go version; printf '%s\n' "$@" | sort) | sha256sum | cut -d' ' -f1)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  all_there=1
  for spec in "$@"; do [[ -x "$bin/${spec%%=*}" ]] || all_there=0; done
  if [[ $all_there == 1 ]]; then
    echo "$bin"
    exit 0
  fi
fi

mkdir -p "$bin"
for spec in "$@"; do
  name=${spec%%=*}
  rest=${spec#*=}
  package=${rest%%;*}
  extra=""
  [[ $rest == *";"* ]] && extra=${rest#*;}
  echo "gobuild: building $name from $package" >&2
  start=$(date +%s)
  (cd "$module" && CGO_ENABLED=0 go build -trimpath -ldflags="-s -w $extra" -o "$bin/$name" "$package") >&2
  echo "gobuild: built $name in $(( $(date +%s) - start ))s" >&2
done
echo "$want" >"$stamp"
echo "$bin"
