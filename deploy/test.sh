#!/usr/bin/env bash
# Install what the tests need on a fresh Debian 12 machine (as root), then run every test:
# lint, types, unit, integration (real etcd) and functional (real nspawn cluster).
set -euo pipefail
cd "$(dirname "$0")/.."
./deploy/setup.sh
./deploy/fetch-etcd35.sh  # the contract suites also run against etcd 3.5
export FLEET_REQUIRE_ETCD35=1
VENV="${FLEET_VENV:-/opt/fleet/venv}"
export PATH="$VENV/bin:$PATH"
echo "== ruff"
ruff check .
ruff format --check .
echo "== mypy --strict"
mypy
echo "== pytest"
exec pytest -ra "$@"
