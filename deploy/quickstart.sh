#!/usr/bin/env bash
# The README's first command: on a fresh Debian 12 machine, as root, set everything up and run
# the main job: a local 3-machine fleet cluster (systemd-nspawn machines with real systemd and
# fleetd), then fleet's classic walkthrough: list the machines, start hello.service, list units.
# Re-running it reuses the running cluster. `fleet-cluster down` removes everything.
set -euo pipefail
cd "$(dirname "$0")/.."
./deploy/setup.sh
VENV="${FLEET_VENV:-/opt/fleet/venv}"
export PATH="$VENV/bin:$PATH"
NAME="${FLEET_CLUSTER_NAME:-fleet}"

if fleet-cluster status --name "$NAME" >/dev/null 2>&1; then
    echo "== cluster '$NAME' is already up"
else
    # etcd on 2379 when it is free, so plain `fleetctl` finds it without any setting.
    port_args=()
    if ! (exec 3<>/dev/tcp/127.0.0.1/2379) 2>/dev/null; then
        port_args=(--etcd-port 2379)
    fi
    echo "== fleet-cluster up -n 3"
    fleet-cluster up -n 3 --name "$NAME" --agent-ttl 10s --metadata 'region=west' "${port_args[@]}"
fi
eval "$(fleet-cluster env --name "$NAME")"

run() {
    echo
    echo "\$ $*"
    "$@"
}
run fleetctl list-machines
run fleetctl start units/hello.service
run fleetctl list-units
cat <<EOT

The cluster keeps running. Point fleetctl at it in your shell with:
    export PATH=$VENV/bin:\$PATH; eval "\$(fleet-cluster env --name $NAME)"
Then try: fleetctl list-unit-files; fleetctl status hello.service; fleetctl journal hello.service
Kill the machine running hello and watch it move: fleet-cluster kill <machine>; fleetctl list-units
Remove everything: fleet-cluster down --name $NAME
EOT
