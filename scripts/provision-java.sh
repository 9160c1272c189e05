#!/usr/bin/env bash
# Java >= 17 for TorchServe's frontend (`make demo` serves its model; `make test` drives TorchServe):
# Debian's openjdk-17-jre-headless from apt (as root, or through sudo) when none is on PATH.
set -euo pipefail
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo

java_major() { java -version 2>&1 | sed -n -E '1s/.*version "([0-9]+).*/\1/p'; }
if ! command -v java >/dev/null || [ "$(java_major)" -lt 17 ]; then
  echo "installing Debian's openjdk-17-jre-headless (TorchServe needs Java 17)"
  if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq openjdk-17-jre-headless >/dev/null; }; then
    echo "error: could not install openjdk-17-jre-headless with apt-get; install Java 17 by hand and run again" >&2
    exit 1
  fi
fi
[ "$(java_major)" -ge 17 ] || { echo "error: TorchServe needs Java >= 17, found $(java -version 2>&1 | head -1)" >&2; exit 1; }
