# The two commands a newcomer needs: `make demo` (the product, locally) and `make test` (everything).
SHELL := /usr/bin/env bash
.SHELLFLAGS := -euo pipefail -c

# Tools the build and the tests need, fetched or built by the project's own scripts.
PROTOC := $(shell scripts/protoc.sh)
export PROTOC
CONTROLPLANE_BIN := $(shell scripts/controlplane.sh)
export ETCD_BIN := $(CONTROLPLANE_BIN)/etcd

.PHONY: test lint unit crd demo bench

## test: lint, then every test (unit, mock API, real etcd). CI runs exactly this.
test: lint
	cargo test --workspace --all-targets
	cargo test --workspace --doc

## lint: formatting and clippy, warnings denied.
lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

## crd: regenerate the committed CRD (a test fails when it drifts).
crd:
	cargo run -q --bin crdgen > crds/grpcservice.yaml

## bench: registry and cache figures against a real etcd.
bench:
	cargo bench --bench registry

## demo: a local etcd plus the controller against your current kube context.
demo:
	scripts/demo.sh
