#!/usr/bin/env bash
# A local stand-in for python:3.11-slim-bookworm, for machines that cannot pull from a container registry:
# Debian bookworm (debootstrap, minbase) from the mirror this machine's apt uses, Python 3.11 with pip as
# `python` / `pip`, and this machine's CA bundle trusted (pip, curl and Python find the package index
# through whatever TLS interception the machine's network does). The machine's pip constraints (its
# package policy, e.g. a cap on the torch version) are carried too, so that the image resolves the same
# versions as a virtual environment made here. Imported as IMAGE (default spade-base:python3.11-bookworm);
# nothing is done when that image exists and was made by this version of the script.
#
#   scripts/stand-in-base.sh [IMAGE]
set -euo pipefail
IMAGE=${1:-spade-base:python3.11-bookworm}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo

STAND_IN_VERSION=2  # raise when what the stand-in carries changes: older stand-ins are rebuilt
made_by=$(docker image inspect -f '{{ index .Config.Labels "spade.stand-in" }}' "$IMAGE" 2>/dev/null || true)
if [ "$made_by" = "$STAND_IN_VERSION" ]; then
  echo "stand-in base $IMAGE is there"
  exit 0
fi

# the machine's Debian mirror: deb822 sources (URIs:) or one-line sources (deb URL suite ...)
mirror=$(grep -h -s -E '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v -- '-security' | head -n 1 || true)
[ -n "$mirror" ] || mirror=$(grep -h -s -E '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
  | awk '{print $2}' | grep -v -- '-security' | head -n 1 || true)
mirror=${mirror:-http://deb.debian.org/debian}

command -v debootstrap >/dev/null || {
  echo "installing Debian's debootstrap"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq debootstrap >/dev/null
}

root=$(mktemp -d /tmp/spade-base.XXXXXX)
trap '$SUDO rm -rf "$root"' EXIT
echo "building the stand-in base $IMAGE: Debian bookworm from $mirror (about a minute)"
$SUDO debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates \
  bookworm "$root" "$mirror" >"$root.log" 2>&1 || {
  echo "error: debootstrap failed; the end of its log:" >&2
  tail -n 20 "$root.log" >&2
  exit 1
}
rm -f "$root.log"
# what the official python image gives: `python` and `pip` on PATH, pip allowed to install system-wide
$SUDO ln -sf /usr/bin/python3 "$root/usr/local/bin/python"
$SUDO ln -sf /usr/bin/pip3 "$root/usr/local/bin/pip"
$SUDO rm -f "$root"/usr/lib/python3*/EXTERNALLY-MANAGED
# the machine's trust: kept through update-ca-certificates runs (a JRE's install triggers one)
if [ -s "$CA_BUNDLE" ]; then
  $SUDO cp "$CA_BUNDLE" "$root/usr/local/share/ca-certificates/machine-bundle.crt"
  $SUDO cp "$CA_BUNDLE" "$root/etc/ssl/certs/ca-certificates.crt"
fi
# the machine's pip constraints: $PIP_CONSTRAINT, else pip's configured `constraint` (files, space-separated)
constraints=${PIP_CONSTRAINT:-$(python3 -m pip config list 2>/dev/null | sed -n -E "s/^(global|install)\.constraint='(.*)'$/\2/p" | head -n 1 || true)}
constraint_env=()
if [ -n "$constraints" ]; then
  for file in $constraints; do
    [ -f "$file" ] && $SUDO sh -c "cat '$file' >> '$root/etc/pip-constraints.txt'"
  done
  if [ -s "$root/etc/pip-constraints.txt" ]; then
    echo "carrying this machine's pip constraints: $(tr '\n' ' ' < "$root/etc/pip-constraints.txt")"
    constraint_env=(--change 'ENV PIP_CONSTRAINT=/etc/pip-constraints.txt')
  fi
fi
$SUDO rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
$SUDO tar -C "$root" -c . | docker import \
  --change "LABEL spade.stand-in=$STAND_IN_VERSION" \
  "${constraint_env[@]}" \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
  --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
  --change 'ENV REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt' \
  --change 'CMD ["python3"]' \
  - "$IMAGE" >/dev/null
echo "stand-in base $IMAGE imported ($(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"
