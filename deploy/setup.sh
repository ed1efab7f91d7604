#!/usr/bin/env bash
# One-time setup on a fresh Debian 12 machine (as root): the Debian packages fleet runs on
# and a virtualenv with fleet and its test tools. Idempotent: re-running only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
    echo "setup.sh: run as root (it installs Debian packages and boots machines)" >&2
    exit 1
fi
PKGS=(etcd-server etcd-client systemd-container openssh-server openssh-client iproute2 dbus python3-venv)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "== apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# etcd-server's package starts a host etcd on 2379 where systemd runs; our tests and the local
# cluster start their own etcd, so make sure the packaged one is not in the way.
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    systemctl disable --now etcd >/dev/null 2>&1 || true
fi
VENV="${FLEET_VENV:-/opt/fleet/venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "== virtualenv $VENV"
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
fi
echo "== pip install -e .[dev]"
"$VENV/bin/pip" install -q -e '.[dev]'
