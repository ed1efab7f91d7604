"""Faults on a real cluster: etcd down, restarted or losing its raft leader; the engine
leader's fleetd SIGKILLed over and over under a stream of submissions; a machine partitioned
past agent_ttl; fleetd crashing; a machine rebooting; a clone claiming a machine id in use.

Three nspawn machines run fleetd from the deploy units (Restart=always, RestartSec=2s) against a
3-member etcd on the host, with agent_ttl 10s (so a SIGKILLed fleetd, back after about 3 s, is
back well within it). Each test injects its fault, then asserts what must hold: units on
healthy machines keep running with the same main PID, nothing submitted is lost, nothing runs
twice except where the test measures it. Figures go to stderr (`pytest -s`) and to
fleet_helpers.METRICS_FILE.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator

import pytest
from fleet_cluster import Cluster, MachineState
from fleet_helpers import (
    LAUNCHES,
    Fleet,
    RegistryDriver,
    eventually,
    fleet_on,
    fleetd_pids,
    holds_for,
    launches,
    machine_leases,
    placements,
    report,
    single_pids,
    spread,
    summary,
    time_to_run,
    unit,
)

from fleetd.errors import RegistryUnavailable

AGENT_TTL = 10.0
ETCD_DOWN_SECONDS = 30.0
ENGINE_KILLS = 50
pytestmark = pytest.mark.parametrize(
    "cluster",
    [{"n": 3, "agent_ttl": f"{AGENT_TTL:g}s", "etcd_members": 3}],
    indirect=True,
    ids=["3-machines-3-etcd"],
)

# fleetd states that are not on their way somewhere (auto-restart after a kill is).
SETTLED = ("active/running", "inactive/dead", "failed/failed")


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet_module(cluster: Cluster) -> Iterator[Fleet]:
    with fleet_on(cluster, AGENT_TTL, "tests/functional/test_faults.py") as fleet:
        yield fleet


def restore(fleet: Fleet) -> None:
    """All etcd members up; the home machines up with fleetd and registered; others gone."""
    cluster = fleet.cluster
    cluster.start_etcd()
    home = {m.name for m in fleet.home}
    for m in cluster.machines:
        if m.name not in home and m.running:
            cluster.stop(m)
    for m in fleet.home:
        if not m.running:
            cluster.restart(m)
        elif m.partitioned:
            cluster.heal(m)
    for m in fleet.home:
        eventually(
            lambda m=m: fleet.fleetd_state(m) in SETTLED,
            30.0,
            f"fleetd in {m.name} to settle",
        )
        if fleet.fleetd_state(m) != "active/running":
            status = cluster.start_fleetd(m)
            assert status.ok, f"fleetd in {m.name}: {status}"
    fleet.wait_registered(fleet.home, timeout=AGENT_TTL + 30)


@pytest.fixture
def fleet(fleet_module: Fleet) -> Iterator[Fleet]:
    restore(fleet_module)
    leftovers = list(fleet_module.driver.units())
    if leftovers:
        fleet_module.created.extend(leftovers)
        fleet_module.cleanup()
    for m in fleet_module.live():
        fleet_module.cluster.exec(m, ["rm", "-f", LAUNCHES])
    yield fleet_module
    restore(fleet_module)
    fleet_module.cleanup()


# -- etcd ------------------------------------------------------------------------------------


def test_etcd_down_30s_stops_nothing_and_the_cluster_resumes(fleet: Fleet) -> None:
    where = spread(fleet, 6)
    names = sorted(where)
    # One opt-in PartitionPolicy=stop unit: it is the one unit that must stop in an outage.
    fleet.start("fenced.service", unit("PartitionPolicy=stop"))
    fenced_host = fleet.wait_running("fenced.service")
    before = single_pids(fleet, names)
    fenced_pid = fleet.systemd(fenced_host, "fenced.service").main_pid
    leases = machine_leases(fleet)
    placed = placements(fleet, [*names, "fenced.service"])
    daemons = fleetd_pids(fleet)

    fleet.cluster.stop_etcd()
    down_at = time.monotonic()
    fenced_stopped: list[float] = []

    def nothing_moved() -> bool:
        if not fenced_stopped and not fleet.systemd(fenced_host, "fenced.service").running:
            fenced_stopped.append(time.monotonic() - down_at)
        return single_pids(fleet, names) == before

    holds_for(nothing_moved, ETCD_DOWN_SECONDS, "every keep unit on its pid", poll=1.0)
    fleet.cluster.start_etcd()
    back_at = time.monotonic()

    # The default policy kept every unit through the outage; the stop-policy unit was fenced
    # before its lease could have expired (2/3 agent_ttl) and comes back as the lease survived.
    assert fenced_stopped, "PartitionPolicy=stop unit ran through a 30 s etcd outage"
    assert fenced_stopped[0] < AGENT_TTL, fenced_stopped
    sd = fleet.wait_systemd_running(fenced_host, "fenced.service", AGENT_TTL)
    assert sd.main_pid != fenced_pid
    # Nothing lost, nothing re-registered, nothing rescheduled.
    assert single_pids(fleet, names) == before
    assert machine_leases(fleet) == leases
    assert placements(fleet, [*names, "fenced.service"]) == placed
    assert fleetd_pids(fleet) == daemons, "a fleetd exited or restarted"
    assert set(fleet.driver.units()) == {*names, "fenced.service"}
    resumed = time_to_run(fleet, "after-outage.service", timeout=30)
    fleet.record(
        "etcd_down_30s",
        {
            "units_kept_same_pid": len(names),
            "stop_policy_unit_stopped_after_seconds": round(fenced_stopped[0], 3),
            "etcd_back_to_new_unit_running_seconds": round(time.monotonic() - back_at, 3),
            "new_unit_start_seconds": round(resumed, 3),
        },
    )
    report(
        f"etcd down {ETCD_DOWN_SECONDS:g} s: {len(names)} units kept their pids; stop-policy "
        f"unit fenced after {fenced_stopped[0]:.2f} s and restarted; a new unit ran "
        f"{time.monotonic() - back_at:.2f} s after etcd came back"
    )


def test_etcd_restart_stops_nothing(fleet: Fleet) -> None:
    where = spread(fleet, 6)
    names = sorted(where)
    before = single_pids(fleet, names)
    leases = machine_leases(fleet)
    placed = placements(fleet, names)
    daemons = fleetd_pids(fleet)

    started = time.monotonic()
    fleet.cluster.stop_etcd()
    fleet.cluster.start_etcd()
    restarted = time.monotonic() - started
    resumed = time_to_run(fleet, "after-restart.service", timeout=30)
    holds_for(lambda: single_pids(fleet, names) == before, AGENT_TTL / 2, "units on their pids")
    assert machine_leases(fleet) == leases
    assert placements(fleet, names) == placed
    assert fleetd_pids(fleet) == daemons, "a fleetd exited or restarted"
    fleet.record(
        "etcd_restart",
        {"restart_seconds": round(restarted, 3), "new_unit_start_seconds": round(resumed, 3)},
    )
    report(f"etcd restarted in {restarted:.2f} s; units kept their pids; new unit {resumed:.2f} s")


def test_etcd_leader_killed_stops_nothing_and_scheduling_goes_on(fleet: Fleet) -> None:
    where = spread(fleet, 6)
    names = sorted(where)
    before = single_pids(fleet, names)
    leases = machine_leases(fleet)
    leader = eventually(fleet.cluster.etcd_leader, 10.0, "an etcd leader")

    fleet.cluster.stop_etcd([leader], kill=True)
    killed_at = time.monotonic()
    new_leader = eventually(fleet.cluster.etcd_leader, 15.0, "a new etcd leader")
    elected = time.monotonic() - killed_at
    assert new_leader != leader
    # Scheduling goes on with two members: a new unit is placed and runs.
    first = time_to_run(fleet, "during-election.service", timeout=30)
    holds_for(lambda: single_pids(fleet, names) == before, 2.0, "units on their pids")
    assert machine_leases(fleet) == leases

    fleet.cluster.start_etcd([leader])
    after = time_to_run(fleet, "member-back.service", timeout=30)
    assert single_pids(fleet, names) == before
    assert machine_leases(fleet) == leases
    fleet.record(
        "etcd_leader_killed",
        {
            "new_etcd_leader_seconds": round(elected, 3),
            "new_unit_start_seconds_two_members": round(first, 3),
            "new_unit_start_seconds_member_back": round(after, 3),
        },
    )
    report(
        f"etcd leader (member {leader}) killed: member {new_leader} leads after "
        f"{elected:.2f} s; a new unit ran in {first:.2f} s; units kept their pids"
    )


def start_as_an_operator(fleet: Fleet, name: str) -> tuple[int, float]:
    """Start `name` as an operator would while an etcd member is frozen: a start that times
    out is run once more if the unit is not there (fleetctl's first call may go to the frozen
    member: a write is not sent again by the client, it may yet be applied; the timed-out
    connection is dropped, so the second start goes to another member). The tries, and the
    seconds from the first start until the unit runs."""
    started = time.monotonic()
    tries = 1
    try:
        fleet.start(name, unit())
    except RegistryUnavailable as e:
        if "no answer" not in str(e):
            raise
        if name not in fleet.driver.units():
            tries = 2
            fleet.start(name, unit())
    fleet.wait_running(name, timeout=30)
    return tries, time.monotonic() - started


def test_etcd_leader_paused_2x_ttl_stops_nothing(fleet: Fleet) -> None:
    """SIGSTOP of etcd's raft leader: the two others elect a new leader (which gives every
    lease a fresh TTL), the clients on the frozen member time out and move on."""
    cluster = fleet.cluster
    names = sorted(spread(fleet, 6))
    before = single_pids(fleet, names)
    daemons = fleetd_pids(fleet)
    placed = placements(fleet, names)
    leader = eventually(cluster.etcd_leader, 10.0, "an etcd leader")
    others = [m for m in range(1, 4) if m != leader]

    cluster.pause_etcd([leader])
    paused_at = time.monotonic()
    try:
        new_leader = eventually(
            lambda: cluster.etcd_leader(among=others), 15.0, "a new etcd leader"
        )
        elected = time.monotonic() - paused_at
        tries, during = start_as_an_operator(fleet, "leader-paused.service")
        left = 2 * AGENT_TTL - (time.monotonic() - paused_at)
        holds_for(lambda: single_pids(fleet, names) == before, max(left, 1.0), "units on pids")
    finally:
        cluster.resume_etcd([leader])
    after = time_to_run(fleet, "leader-resumed.service", timeout=30)
    assert single_pids(fleet, names) == before
    assert placements(fleet, names) == placed
    assert fleetd_pids(fleet) == daemons, "a fleetd exited or restarted"
    fleet.record(
        "etcd_leader_paused_2x_ttl",
        {
            "new_etcd_leader_seconds": round(elected, 3),
            "new_unit_start_seconds_leader_paused": round(during, 3),
            "new_unit_start_tries_leader_paused": tries,
            "new_unit_start_seconds_after_resume": round(after, 3),
        },
    )
    report(
        f"etcd leader (member {leader}) paused {2 * AGENT_TTL:g} s: member {new_leader} led "
        f"after {elected:.2f} s; a new unit ran in {during:.2f} s meanwhile ({tries} "
        "fleetctl start); units kept their pids, every fleetd the same process"
    )


# -- fleetd ----------------------------------------------------------------------------------


def kill_fleetd(fleet: Fleet, m: MachineState) -> None:
    fleet.cluster.exec(m, ["systemctl", "kill", "--signal=KILL", "fleet"], check=True)


def test_fleetd_sigkill_keeps_units_and_lease(fleet: Fleet) -> None:
    where = spread(fleet, 6)
    names = sorted(where)
    leader = fleet.driver.leader()
    m = next(h for h in where.values() if h.machine_id != leader)
    before = single_pids(fleet, names)
    leases = machine_leases(fleet)
    placed = placements(fleet, names)

    killed_at = time.monotonic()
    kill_fleetd(fleet, m)
    eventually(
        lambda: fleet.fleetd_state(m) == "active/running",
        AGENT_TTL,
        f"systemd to restart fleetd in {m.name}",
    )
    back = time.monotonic() - killed_at

    def unchanged() -> bool:
        return (
            single_pids(fleet, names) == before
            and machine_leases(fleet) == leases
            and placements(fleet, names) == placed
        )

    # Past agent_ttl from the kill: a lost lease would have moved the units by then.
    holds_for(unchanged, AGENT_TTL + 1.0 - back, "units, leases and placements unchanged")
    mine = [n for n, h in where.items() if h is m]
    fleet.start("after-crash.service", unit(f"MachineID={m.machine_id}"))
    assert fleet.wait_running("after-crash.service") is m
    fleet.record("fleetd_sigkill", {"back_seconds": round(back, 3), "units_on_it": len(mine)})
    report(f"fleetd SIGKILLed in {m.name}: back in {back:.2f} s, {len(mine)} units kept")


class Submitter(threading.Thread):
    """Submits `stream-N.service` units one after another until stopped."""

    def __init__(self, endpoint: str, interval: float) -> None:
        super().__init__(daemon=True)
        self.endpoint = endpoint
        self.interval = interval
        self.done = threading.Event()
        self.submitted: list[str] = []
        self.errors: list[str] = []

    def run(self) -> None:
        driver = RegistryDriver(self.endpoint)
        try:
            while not self.done.is_set():
                name = f"stream-{len(self.submitted)}.service"
                try:
                    driver.start(name, unit())
                    self.submitted.append(name)
                except Exception as exc:  # every failure is a finding
                    self.errors.append(f"{name}: {exc!r}")
                self.done.wait(self.interval)
        finally:
            driver.close()


@pytest.mark.timeout(900)  # 50 kills, each waiting for systemd's RestartSec=2s
def test_engine_leader_sigkilled_50_times_under_submits(fleet: Fleet) -> None:
    submitter = Submitter(",".join(fleet.cluster.etcd_endpoints), interval=0.5)
    submitter.start()
    resumed: list[float] = []
    leaders: list[str] = []
    try:
        for i in range(ENGINE_KILLS):
            leader_id = eventually(fleet.driver.leader, AGENT_TTL, "an engine leader")
            m = fleet.machine(leader_id)
            eventually(
                lambda m=m: fleet.fleetd_state(m) == "active/running",
                AGENT_TTL,
                f"fleetd in {m.name} running",
            )
            killed_at = time.monotonic()
            kill_fleetd(fleet, m)
            probe = f"probe-{i}.service"
            fleet.start(probe, unit())

            def placed(probe: str = probe) -> bool:
                found = fleet.driver.placement(probe)
                return found is not None and found.machine_id is not None

            eventually(placed, AGENT_TTL + 5, f"{probe} to be placed after the kill", poll=0.05)
            resumed.append(time.monotonic() - killed_at)
            leaders.append(m.name)
    finally:
        submitter.done.set()
        submitter.join(timeout=30)
    assert not submitter.errors, submitter.errors[:5]

    names = sorted([*submitter.submitted, *(f"probe-{i}.service" for i in range(ENGINE_KILLS))])
    # Nothing lost: every submission is stored and runs on exactly one machine...
    assert set(fleet.driver.units()) == set(names)

    def all_running_once() -> bool:
        running: dict[str, int] = {}
        for s in fleet.driver.states():
            if (s.active_state, s.sub_state) == ("active", "running"):
                running[s.name] = running.get(s.name, 0) + 1
        return all(running.get(n) == 1 for n in names)

    eventually(all_running_once, 60.0, f"{len(names)} units to run once each")
    pids = fleet.main_pids(names)
    twice = {n: where for n, where in pids.items() if len(where) != 1}
    assert not twice, f"units not running exactly once per systemd: {twice}"
    # ... and was launched exactly once: no copy started, stopped and started elsewhere.
    counts = launches(fleet)
    assert {n: counts.get(n, 0) for n in names if counts.get(n, 0) != 1} == {}
    figures = summary(resumed)
    fleet.record(
        "engine_leader_sigkill",
        {
            "kills": ENGINE_KILLS,
            "units_submitted": len(names),
            "kill_to_placement_seconds": figures,
            "leaders_killed": sorted(set(leaders)),
        },
    )
    report(
        f"{ENGINE_KILLS} engine-leader SIGKILLs under {len(names)} submissions: scheduling "
        f"resumed after median {figures['median']} s, max {figures['max']} s; every unit "
        "launched exactly once"
    )
    assert max(resumed) < AGENT_TTL, figures


# -- machines --------------------------------------------------------------------------------


def test_partition_moves_units_and_stale_copies_stop_on_heal(fleet: Fleet) -> None:
    spread(fleet, 3)
    fleet.start("keep.service", unit())
    victim = fleet.wait_running("keep.service")
    # Beside it, an opt-in PartitionPolicy=stop unit: it must never run twice.
    fleet.start("fenced.service", unit("MachineOf=keep.service\nPartitionPolicy=stop"))
    assert fleet.wait_running("fenced.service") is victim
    watched = ["keep.service", "fenced.service"]
    keep_pid = fleet.systemd(victim, "keep.service").main_pid
    others = [m for m in fleet.home if m is not victim]

    timeline: list[tuple[float, dict[str, dict[str, int]]]] = []

    def sample() -> dict[str, dict[str, int]]:
        seen = fleet.main_pids(watched)
        timeline.append((time.monotonic(), seen))
        return seen

    fleet.cluster.partition(victim)
    cut_at = time.monotonic()

    def moved() -> bool:
        seen = sample()
        return all(any(name != victim.name for name in seen[u]) for u in watched)

    eventually(moved, AGENT_TTL + 15, "both units to run on another machine", poll=0.05)
    moved_at = time.monotonic()
    # The keep unit ran on through the partition, on its pid.
    assert timeline[-1][1]["keep.service"].get(victim.name) == keep_pid
    fleet.cluster.heal(victim)
    healed_at = time.monotonic()

    def stale_gone() -> bool:
        seen = sample()
        return all(victim.name not in seen[u] for u in watched)

    eventually(stale_gone, AGENT_TTL + 15, f"stale copies in {victim.name} to stop", poll=0.05)
    stale_stopped_at = time.monotonic()

    # Seconds with two copies of one unit, from the samples.
    double = {u: 0.0 for u in watched}
    for (t, seen), (t_next, _) in itertools.pairwise(timeline):
        for u in watched:
            if len(seen[u]) > 1:
                double[u] += t_next - t
    max_copies = {u: max(len(seen[u]) for _, seen in timeline) for u in watched}
    assert max_copies["fenced.service"] == 1, "a PartitionPolicy=stop unit ran twice"
    # The moved units run once, where the engine put them; the victim is back, without them.
    for u in watched:
        m = fleet.wait_running(u, not_on=[victim.machine_id])
        assert m in others
    fleet.wait_registered(fleet.home, timeout=AGENT_TTL + 10)
    fleet.assert_not_loaded("keep.service", [victim])
    fleet.record(
        "partition",
        {
            "moved_seconds": round(moved_at - cut_at, 3),
            "heal_to_stale_stopped_seconds": round(stale_stopped_at - healed_at, 3),
            "double_run_seconds": {u: round(v, 3) for u, v in double.items()},
            "samples": len(timeline),
        },
    )
    report(
        f"partition of {victim.name}: units moved after {moved_at - cut_at:.2f} s; after heal "
        f"stale copies stopped in {stale_stopped_at - healed_at:.2f} s; two copies ran for "
        f"{double['keep.service']:.2f} s (keep), {double['fenced.service']:.2f} s (stop policy)"
    )


def test_machine_reboot_keeps_its_id_and_hands_units_over(fleet: Fleet) -> None:
    where = spread(fleet, 6)
    victim = where["work-0.service"]
    mine = sorted(n for n, h in where.items() if h is victim)
    kept = {n: h for n, h in where.items() if h is not victim}
    kept_pids = single_pids(fleet, sorted(kept))

    started = time.monotonic()
    fleet.cluster.restart(victim)  # a clean shutdown, then a boot of the same machine
    rebooted = time.monotonic() - started
    fleet.wait_registered(fleet.home, timeout=AGENT_TTL + 10)
    back = time.monotonic() - started
    for name in mine:
        assert fleet.wait_running(name) is not victim
    assert single_pids(fleet, sorted(kept)) == kept_pids
    # Same machine id, a member again, taking new work.
    fleet.start("after-reboot.service", unit(f"MachineID={victim.machine_id}"))
    assert fleet.wait_running("after-reboot.service") is victim
    fleet.record(
        "reboot", {"reboot_seconds": round(rebooted, 3), "registered_seconds": round(back, 3)}
    )
    report(f"{victim.name} rebooted in {rebooted:.2f} s, registered again after {back:.2f} s")


def test_clone_claiming_a_machine_id_in_use_is_refused(fleet: Fleet) -> None:
    where = spread(fleet, 3)
    original = where["work-0.service"]
    leases = machine_leases(fleet)
    pids = single_pids(fleet, sorted(where))
    clone = fleet.cluster.add_machine(machine_id=original.machine_id)
    try:

        def refused() -> bool:
            done = fleet.cluster.exec(clone, ["journalctl", "-u", "fleet", "-o", "cat"])
            return "machine_id_in_use" in done.stdout

        eventually(refused, 20.0, f"fleetd in {clone.name} to refuse the duplicate machine id")
        # The original keeps its registration, its lease and its units; the clone gets none.
        holds_for(
            lambda: machine_leases(fleet) == leases and single_pids(fleet, sorted(where)) == pids,
            2.0,
            f"{original.name} registered as before",
        )
        registered = [m for m in fleet.driver.machines() if m.id == original.machine_id]
        assert len(registered) == 1
        assert registered[0].public_ip == original.ip
        assert not any(sd.running for sd in fleet.systemd_many(clone, sorted(where)).values())
    finally:
        fleet.cluster.stop(clone)
