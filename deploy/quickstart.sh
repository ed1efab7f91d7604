#!/usr/bin/env bash
# The README's first command: on a fresh Debian 12 machine, as root, set everything up and run
# the main job: a local 3-machine fleet cluster (systemd-nspawn machines with real systemd and
# fleetd), then fleet's classic walkthrough: list the machines, start hello.service, list units.
# Re-running it reuses the running cluster. `fleet-cluster down` removes everything.
# Environment: FLEET_VENV (default /opt/fleet/venv), FLEET_CLUSTER_NAME (default fleet),
# FLEET_CLUSTER_SUBNET (the bridge's /24, default fleet-cluster's 10.77.0.0/24).
set -euo pipefail
cd "$(dirname "$0")/.."
./deploy/setup.sh
VENV="${FLEET_VENV:-/opt/fleet/venv}"
export PATH="$VENV/bin:$PATH"
NAME="${FLEET_CLUSTER_NAME:-fleet}"
# The bridge's subnet (fleet-cluster's default 10.77.0.0/24 unless set).
SUBNET="${FLEET_CLUSTER_SUBNET:-}"

if fleet-cluster status --name "$NAME" >/dev/null 2>&1; then
    echo "== cluster '$NAME' is already up"
else
    # etcd on 2379 when it is free, so plain `fleetctl` finds it without any setting.
    extra_args=()
    if ! (exec 3<>/dev/tcp/127.0.0.1/2379) 2>/dev/null; then
        extra_args+=(--etcd-port 2379)
    fi
    if [ -n "$SUBNET" ]; then
        extra_args+=(--subnet "$SUBNET")
    fi
    echo "== fleet-cluster up -n 3"
    fleet-cluster up -n 3 --name "$NAME" --agent-ttl 10s --metadata 'region=west' "${extra_args[@]}"
fi
eval "$(fleet-cluster env --name "$NAME")"

run() {
    echo
    echo "\$ $*"
    "$@"
}
run fleetctl list-machines
run fleetctl start units/hello.service
# `start` returns once the unit is launched; give its machine a moment to report it running.
for _ in $(seq 50); do
    fleetctl list-units --no-legend 2>/dev/null | grep '^hello\.service.*running' >/dev/null && break
    sleep 0.2
done
run fleetctl list-units
cat <<EOT

The cluster keeps running. Point fleetctl at it in your shell with:
    export PATH=$VENV/bin:\$PATH; eval "\$(fleet-cluster env --name $NAME)"
Then try: fleetctl list-unit-files; fleetctl status hello.service; fleetctl journal hello.service
Kill the machine running hello and watch it move: fleet-cluster kill <machine>; fleetctl list-units
Remove everything: fleet-cluster down --name $NAME
EOT
