"""The README's first command, run literally: `./deploy/quickstart.sh` boots a 3-machine cluster
and walks through list-machines, start hello.service and list-units. Always torn down after.

The cluster is named `qs<pid>` and gets a free subnet, so it never meets the session's cluster
or another developer's; FLEET_VENV is this venv, so setup.sh's `pip install -e` is quick. The
session's wheel is not passed on: the script builds the wheel the machines install, as it does
for a user.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from cluster_fixture import free_subnet, require_cluster_host
from test_cluster_tool import assert_nothing_left

REPO = Path(__file__).resolve().parents[2]
CLUSTER_CLI = [sys.executable, "-m", "fleet_cluster"]


def section(output: str, command: str) -> list[str]:
    """The output lines of `$ command` in the walkthrough (up to the next command or blank)."""
    lines = output.splitlines()
    start = lines.index(f"$ {command}") + 1
    body: list[str] = []
    for line in lines[start:]:
        if not line.strip() or line.startswith("$ "):
            break
        body.append(line)
    return body


def test_quickstart_walkthrough_then_down_leaves_nothing() -> None:
    require_cluster_host()
    name = f"qs{os.getpid()}"
    env = {
        **os.environ,
        "FLEET_CLUSTER_NAME": name,
        "FLEET_CLUSTER_SUBNET": free_subnet(offset=25),
        "FLEET_VENV": sys.prefix,
    }
    for key in [k for k in env if k.startswith("FLEETCTL_") or k == "FLEET_CLUSTER_WHEEL"]:
        del env[key]  # only what the script sets up itself (it builds the wheel itself too)
    state_file = Path("/run/fleet-cluster", name, "state.json")
    state: dict[str, object] = {}
    try:
        done = subprocess.run(
            ["./deploy/quickstart.sh"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if state_file.exists():
            state = json.loads(state_file.read_text())
        output = done.stdout
        failed = f"quickstart.sh exited {done.returncode}:\n{output}\n{done.stderr}"
        assert done.returncode == 0, failed

        machines = section(output, "fleetctl list-machines")
        assert machines[0].split()[:2] == ["MACHINE", "IP"], output
        assert len(machines) == 1 + 3, output
        assert all("region=west" in line for line in machines[1:]), output

        units = section(output, "fleetctl list-units")
        hello = [line.split() for line in units if line.startswith("hello.service")]
        assert len(hello) == 1, output
        assert hello[0][-2:] == ["active", "running"], output
        assert f"fleet-cluster down --name {name}" in output
    finally:
        down = subprocess.run(
            [*CLUSTER_CLI, "down", "--name", name], capture_output=True, text=True, timeout=180
        )
    assert down.returncode == 0, down.stdout + down.stderr
    assert state, "the cluster never came up"
    assert_nothing_left(name, state)
    status = subprocess.run(
        [*CLUSTER_CLI, "status", "--name", name], capture_output=True, text=True, timeout=60
    )
    assert status.returncode == 1, status.stdout
