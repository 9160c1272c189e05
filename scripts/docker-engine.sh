#!/usr/bin/env bash
# A running Docker engine for `make image` and the container tests: installed (Debian's docker.io) and
# started when none answers. The daemon runs with host networking only (no bridge, no iptables, no
# private-range addresses); builds and containers use `--network host`. Its log: $DOCKERD_LOG.
set -euo pipefail
DOCKERD_LOG=${DOCKERD_LOG:-/var/log/spade-dockerd.log}
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo

docker info >/dev/null 2>&1 && exit 0

if ! command -v dockerd >/dev/null; then
  echo "installing Debian's docker.io (the Docker engine)"
  if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq docker.io >/dev/null; }; then
    echo "error: could not install docker.io with apt-get; install a Docker engine by hand and run again" >&2
    exit 1
  fi
fi

if [ -S /var/run/docker.sock ] && pgrep -x dockerd >/dev/null; then
  echo "a dockerd runs but does not answer; waiting for it"
else
  echo "starting dockerd (host networking only; log: $DOCKERD_LOG)"
  $SUDO mkdir -p "$(dirname "$DOCKERD_LOG")"
  # setsid: the daemon outlives this script and the make that ran it
  $SUDO setsid dockerd --bridge=none --iptables=false --ip-masq=false >>"$DOCKERD_LOG" 2>&1 </dev/null &
fi
for _ in $(seq 60); do
  docker info >/dev/null 2>&1 && exit 0
  sleep 1
done
echo "error: the Docker engine did not answer within 60 s; the end of $DOCKERD_LOG:" >&2
tail -n 20 "$DOCKERD_LOG" >&2 || true
exit 1
