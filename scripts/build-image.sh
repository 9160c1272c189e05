#!/usr/bin/env bash
# `make image`: the project image (default spade:dev) from the project's Dockerfile, on this machine, from
# nothing. The Docker engine is installed and started when none answers (scripts/docker-engine.sh). The
# Dockerfile's own base image is used when it is here or can be pulled; otherwise a local stand-in for
# python:3.11-slim-bookworm is built (scripts/stand-in-base.sh) and passed as BASE_IMAGE, and the image's
# torch comes from the package index. Builds use the host network (the engine has no bridge).
#
#   scripts/build-image.sh [IMAGE]      BASE_IMAGE=... to choose the base yourself
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${1:-spade:dev}
STAND_IN=spade-base:python3.11-bookworm

bash scripts/docker-engine.sh

default_base=$(sed -n -E 's/^ARG BASE_IMAGE=(.*)$/\1/p' Dockerfile | head -n 1)
base=${BASE_IMAGE:-}
if [ -z "$base" ]; then
  if docker image inspect "$default_base" >/dev/null 2>&1 || timeout 300 docker pull -q "$default_base" >/dev/null 2>&1; then
    base=$default_base
  else
    echo "the Dockerfile's base $default_base cannot be pulled here: using a local stand-in for python:3.11-slim-bookworm"
    bash scripts/stand-in-base.sh "$STAND_IN"
    base=$STAND_IN
  fi
fi

echo "building $IMAGE on $base"
start=$(date +%s)
docker build --network host --build-arg "BASE_IMAGE=$base" -t "$IMAGE" .
size=$(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.1f GB", $1/1e9}')
echo "built $IMAGE in $(( $(date +%s) - start )) s ($size)"
