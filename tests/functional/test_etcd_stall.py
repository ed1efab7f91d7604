"""etcd that stalls instead of stopping: SIGSTOP of the real etcd for 2x and 5x agent_ttl.

A stopped etcd gives every lease a fresh TTL when it starts again; a paused one does not: as it
resumes it expires every lease whose TTL ran out meanwhile, all at once. Every fleetd then
finds its lease gone. What must hold (issue 16): no fleetd exits (they run here with
Restart=no, so an exit would show), every machine re-registers under its id, the engine
moves nothing (an etcd-side fault is not a machine failure), every `keep` unit keeps its
MainPID before, during and after, no placement key changes, a PartitionPolicy=stop unit is
fenced during the stall and runs again on its machine after it (never two copies), and a unit
started afterwards runs.

The session's default cluster: 3 machines, one etcd member, agent_ttl 3 s. The 3-member etcd
whose raft leader is paused is in test_faults.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from fleet_cluster import Cluster, MachineState
from fleet_helpers import (
    Fleet,
    eventually,
    fleet_on,
    fleetd_pids,
    holds_for,
    placements,
    report,
    single_pids,
    spread,
    time_to_run,
    unit,
)

AGENT_TTL = 3.0
DROP_IN = "/run/systemd/system/fleet.service.d/50-test-no-restart.conf"


def set_no_restart(fleet: Fleet, on: bool) -> None:
    """fleet.service without Restart= (the issue's cluster): a fleetd that exits stays dead."""
    for m in fleet.home:
        if on:
            fleet.cluster.exec(m, ["mkdir", "-p", DROP_IN.rsplit("/", 1)[0]])
            fleet.cluster.exec(m, ["sh", "-c", f"printf '[Service]\\nRestart=no\\n' > {DROP_IN}"])
        else:
            fleet.cluster.exec(m, ["rm", "-f", DROP_IN])
        fleet.cluster.exec(m, ["systemctl", "daemon-reload"])


@pytest.fixture(scope="module")
def fleet(cluster: Cluster) -> Iterator[Fleet]:
    with fleet_on(cluster, AGENT_TTL, "tests/functional/test_etcd_stall.py") as fleet:
        set_no_restart(fleet, True)
        try:
            yield fleet
        finally:
            cluster.resume_etcd()  # never leave the session's etcd frozen
            set_no_restart(fleet, False)
            fleet.cleanup()


def runs_on(fleet: Fleet, name: str) -> list[str]:
    return sorted(fleet.main_pids([name])[name])


@pytest.mark.parametrize("factor", [2, 5], ids=["2xTTL", "5xTTL"])
def test_etcd_paused_past_agent_ttl_moves_and_restarts_nothing(fleet: Fleet, factor: int) -> None:
    cluster = fleet.cluster
    names = sorted(spread(fleet, 6, prefix=f"stall{factor}"))
    fenced = f"stall{factor}-fenced.service"
    fleet.start(fenced, unit("PartitionPolicy=stop"))
    fenced_host: MachineState = fleet.wait_running(fenced, timeout=30)
    before = single_pids(fleet, names)
    daemons = fleetd_pids(fleet)
    assert all(daemons.values()), daemons
    placed = placements(fleet, [*names, fenced])
    copies: list[int] = []

    def unchanged() -> bool:
        copies.append(len(runs_on(fleet, fenced)))
        return single_pids(fleet, names) == before

    cluster.pause_etcd()
    paused_at = time.monotonic()
    try:
        holds_for(unchanged, factor * AGENT_TTL, "every keep unit on its pid (etcd paused)")
        assert not runs_on(fleet, fenced), "the stop-policy unit ran through the stall"
    finally:
        cluster.resume_etcd()
    resumed_at = time.monotonic()

    # Every lease expired as etcd resumed: each machine registers again, same id.
    fleet.wait_registered(fleet.home, timeout=AGENT_TTL + 15)
    back = time.monotonic() - resumed_at
    # The engine's grace (one agent_ttl) passes; nothing may move during or after it.
    holds_for(unchanged, 2 * AGENT_TTL, "every keep unit on its pid (after the stall)")
    sd = fleet.wait_systemd_running(fenced_host, fenced, 2 * AGENT_TTL + 10)
    eventually(
        lambda: runs_on(fleet, fenced) == [fenced_host.name],
        10,
        "the stop-policy unit back on its own machine only",
    )
    assert max(copies) <= 1, "the PartitionPolicy=stop unit ran on two machines at once"
    assert fleetd_pids(fleet) == daemons, "a fleetd exited or restarted"
    assert all(fleet.fleetd_state(m) == "active/running" for m in fleet.home)
    assert single_pids(fleet, names) == before
    assert placements(fleet, [*names, fenced]) == placed, "a placement changed"
    after = time_to_run(fleet, f"after-stall{factor}.service", timeout=30)
    fleet.record(
        f"etcd_paused_{factor}x_ttl",
        {
            "paused_seconds": round(resumed_at - paused_at, 3),
            "all_registered_again_seconds": round(back, 3),
            "keep_units_same_pid": len(names),
            "stop_policy_unit_back_pid": sd.main_pid,
            "new_unit_start_seconds": round(after, 3),
        },
    )
    report(
        f"etcd paused {resumed_at - paused_at:.1f} s ({factor}x agent_ttl): every fleetd the "
        f"same process, all re-registered {back:.2f} s after resume, {len(names)} units kept "
        f"their pids, the stop-policy unit fenced and back on {fenced_host.name}; a new unit "
        f"ran in {after:.2f} s"
    )
