#!/usr/bin/env bash
# Installs what Wharf's build and tests need and finds missing, and says what it did.
# Usage: scripts/ensure-deps.sh [run|test|bench]
set -euo pipefail
want=${1:-test}

need=()
have() { command -v "$1" >/dev/null 2>&1; }
have docker-registry || need+=(docker-registry)
have protoc || need+=(protobuf-compiler)   # the wharf.v1 gRPC code and etcd-client are generated at build time
have etcd || need+=(etcd-server)           # the control plane's store in tests and multi-node setups
# The system roots upstreams are verified against (without them a node falls back to built-in roots).
[ -s /etc/ssl/certs/ca-certificates.crt ] || need+=(ca-certificates)
if [ "$want" != run ]; then
  have skopeo || need+=(skopeo)
fi
if [ "$want" = test ]; then
  # Real docker and containerd clients (tests/src/docker.rs): docker.io brings dockerd, containerd and ctr.
  have dockerd || need+=(docker.io)
  # podman as a client of the node's mirror and token service (tests/src/podman.rs).
  have podman || need+=(podman)
  # The schema fuzzer (schemathesis) goes into a venv of its own: python3's venv module may be missing.
  python3 -c "import venv, ensurepip" >/dev/null 2>&1 || need+=(python3-venv)
fi
if [ "$want" = bench ]; then
  have nginx || need+=(nginx-light)
  have wrk || need+=(wrk)
  have curl || need+=(curl)
fi

if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "ensure-deps: installing missing packages: ${need[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
  echo "ensure-deps: installed ${need[*]}"
else
  echo "ensure-deps: all tools present (protoc, etcd, docker-registry, skopeo, dockerd, podman as needed)"
fi

# Python tools of the suites, in target/tools-venv (no system Python package is touched):
# schemathesis, the OpenAPI fuzzer of tests/tests/control_schema.rs, and oras (oras-py, the ORAS
# project's Python client: the oras CLI has no Debian package) for tests/tools/oras_pull.py.
venv="$(dirname "$0")/../target/tools-venv"
if [ "$want" = test ] && { [ ! -x "$venv/bin/schemathesis" ] || ! "$venv/bin/python" -c "import oras" 2>/dev/null; }; then
  echo "ensure-deps: installing schemathesis and oras into target/tools-venv (python3 -m venv, pip)"
  [ -x "$venv/bin/pip" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check schemathesis oras
fi

if ! cargo nextest --version >/dev/null 2>&1 && [ "$want" = test ]; then
  echo "ensure-deps: installing cargo-nextest (cargo install --locked cargo-nextest)"
  cargo install --locked cargo-nextest
fi
