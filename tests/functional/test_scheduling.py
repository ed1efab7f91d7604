"""Scheduling on a real cluster: placement, constraints, and machine or fleetd loss.

Three nspawn machines run fleetd as a systemd service (agent_ttl 3s), with metadata
m1 region=east, m2 region=west, m3 region=west,disk=ssd. Tests drive the cluster the way
fleetctl does (fleet_helpers.RegistryDriver: fleetd's Registry on the cluster's etcd) and check
both what fleetd publishes in etcd (states, placement) and what systemd in the machines says.

Each test starts from a clean cluster (its three machines registered, no units) and destroys
what it created. Tests that take machines or fleetd down bring them back; they come last, as
does the one that adds a fourth machine (stopped again at its end). Figures (start latency,
kill-to-active, graceful handover) are printed and appended to fleet_helpers.METRICS_FILE.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fleet_cluster import Cluster, MachineState
from fleet_helpers import Fleet, eventually, fleet_on, holds_for, report, summary

from fleetd.model import Cordon, TargetState
from fleetd.unit.file import parse_unit

FLEETCTL = str(Path(sys.prefix) / "bin" / "fleetctl")

AGENT_TTL = 3.0
METADATA = {
    "1": {"region": "east"},
    "2": {"region": "west"},
    "3": {"region": "west", "disk": "ssd"},
}
pytestmark = pytest.mark.parametrize(
    "cluster",
    [{"n": 3, "agent_ttl": f"{AGENT_TTL:g}s", "metadata": METADATA}],
    indirect=True,
    ids=["3-machines-east-west"],
)


def unit(xfleet: str = "", exec_start: str = "/bin/sleep infinity") -> str:
    """A long-running service, with an [X-Fleet] section if given."""
    text = f"[Unit]\nDescription=test unit\n\n[Service]\nExecStart={exec_start}\n"
    if xfleet:
        text += f"\n[X-Fleet]\n{xfleet.strip()}\n"
    return text


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet_module(cluster: Cluster) -> Iterator[Fleet]:
    with fleet_on(cluster, AGENT_TTL, "tests/functional/test_scheduling.py") as fleet:
        yield fleet


def restore(fleet: Fleet) -> None:
    """The three original machines up with fleetd and registered; any extra one stopped."""
    cluster = fleet.cluster
    for machine_id in fleet.driver._run(fleet.driver.registry.cordons()):
        fleet.driver._run(fleet.driver.registry.uncordon(machine_id))
    home = {m.name for m in fleet.home}
    for m in cluster.machines:
        if m.name not in home and m.running:
            cluster.stop(m)
    for m in fleet.home:
        if not m.running:
            cluster.restart(m)
        elif fleet.fleetd_state(m) != "active/running":
            status = cluster.start_fleetd(m)
            assert status.ok, f"fleetd in {m.name}: {status}"
    fleet.wait_registered(fleet.home)


@pytest.fixture
def fleet(fleet_module: Fleet) -> Iterator[Fleet]:
    """The cluster, clean: home machines registered, no units; cleaned up again after."""
    restore(fleet_module)
    leftovers = list(fleet_module.driver.units())
    if leftovers:  # a previous test could not clean up; do not let that fail this one
        fleet_module.created.extend(leftovers)
        fleet_module.cleanup()
    yield fleet_module
    restore(fleet_module)
    fleet_module.cleanup()


# -- machines --------------------------------------------------------------------------------


def test_machines_register_with_their_ips_and_metadata(fleet: Fleet) -> None:
    machines = {m.id: m for m in fleet.driver.machines()}
    assert len(machines) == 3
    for m in fleet.cluster.machines:
        registered = machines[m.machine_id]
        assert registered.public_ip == m.ip
        assert registered.metadata_dict == METADATA[str(m.index)]
    assert fleet.driver.leader() in machines


# -- one unit's life -------------------------------------------------------------------------


def test_unit_runs_on_exactly_one_machine(fleet: Fleet) -> None:
    fleet.start("hello.service", unit())
    m = fleet.wait_running("hello.service")

    [state] = fleet.driver.states("hello.service")
    assert state.machine_id == m.machine_id
    assert state.load_state == "loaded"
    assert state.agent_state == TargetState.LAUNCHED
    assert state.hash == parse_unit(unit()).hash
    assert "hello.service" in fleet.unit_files(m)
    fleet.assert_not_loaded("hello.service", [o for o in fleet.live() if o is not m])


def test_stop_unload_destroy(fleet: Fleet) -> None:
    name = "lifecycle.service"
    fleet.start(name, unit())
    m = fleet.wait_running(name)
    first_pid = fleet.systemd(m, name).main_pid

    # stop: target loaded. systemd keeps the unit loaded but stopped, fleetd says so too.
    fleet.driver.set_target(name, TargetState.LOADED)
    eventually(
        lambda: (
            [
                (s.machine_id, s.load_state, s.active_state, s.sub_state, s.agent_state)
                for s in fleet.driver.states(name)
            ]
            == [(m.machine_id, "loaded", "inactive", "dead", TargetState.LOADED)]
        ),
        10.0,
        lambda: f"{fleet.describe(name)} to be loaded and stopped",
    )
    sd = fleet.systemd(m, name)
    assert (sd.load_state, sd.active_state, sd.sub_state) == ("loaded", "inactive", "dead"), sd
    assert name in fleet.unit_files(m)
    placement = fleet.driver.placement(name)
    assert placement is not None
    assert placement.machine_id == m.machine_id

    # start again: same machine (no churn), a new process.
    fleet.driver.set_target(name, TargetState.LAUNCHED)
    assert fleet.wait_running(name) is m
    assert fleet.systemd(m, name).main_pid != first_pid

    # unload: target inactive. The file leaves the machine, the state and placement go.
    fleet.driver.set_target(name, TargetState.INACTIVE)
    eventually(
        lambda: not fleet.driver.states(name) and fleet.driver.placement(name) is None,
        10.0,
        lambda: f"{fleet.describe(name)} to be unloaded",
    )
    fleet.wait_files_gone(m, [name])
    fleet.assert_not_loaded(name, fleet.live())
    assert fleet.driver.units()[name].target_state == TargetState.INACTIVE

    # destroy: the unit itself goes.
    fleet.destroy([name])
    assert name not in fleet.driver.units()
    assert fleet.driver.placement(name) is None
    assert not fleet.driver.states(name)


def test_start_latency(fleet: Fleet) -> None:
    """Create (launched) to active/running as published in etcd: median of 10."""
    samples = []
    for i in range(10):
        name = f"latency-{i}.service"
        started = time.monotonic()
        fleet.start(name, unit())
        eventually(functools.partial(fleet.running_on, name), 10.0, name, poll=0.005)
        samples.append(time.monotonic() - started)
        fleet.wait_running(name)  # systemd agrees
        fleet.destroy([name])
    figures = summary(samples)
    fleet.record("start_to_active_seconds", figures)
    report(
        f"create-launched -> active/running (etcd): median {figures['median']:.3f} s "
        f"(min {figures['min']:.3f}, max {figures['max']:.3f}, n=10)"
    )
    assert figures["median"] < 5.0


# -- constraints -----------------------------------------------------------------------------


def test_machine_of_colocates(fleet: Fleet) -> None:
    # Least-loaded placement alone would put pong beside nothing: ping's machine has load 1.
    fleet.start("ping.service", unit())
    fleet.start("pong.service", unit("MachineOf=ping.service"))
    ping = fleet.wait_running("ping.service")
    pong = fleet.wait_running("pong.service")
    assert pong is ping
    # A third, unconstrained unit goes elsewhere: the pair did not land together by chance.
    fleet.start("other.service", unit())
    assert fleet.wait_running("other.service") is not ping


def test_conflicts_keep_apart_both_directions_with_globs(fleet: Fleet) -> None:
    a, b, c = fleet.home
    # Load b and c with two units each, so least-loaded placement prefers a for everything.
    for m in (b, c):
        for i in (1, 2):
            fleet.start(f"filler-{m.index}-{i}.service", unit(f"MachineID={m.machine_id}"))
    for m in (b, c):
        for i in (1, 2):
            assert fleet.wait_running(f"filler-{m.index}-{i}.service") is m

    fleet.start("c1.service", unit("Conflicts=c*.service"))
    assert fleet.wait_running("c1.service") is a
    # c2 declares nothing; c1's glob keeps c2 away from a (the other direction).
    fleet.start("c2.service", unit())
    c2_on = fleet.wait_running("c2.service")
    assert c2_on is not a
    # d1's own glob keeps it away from c1 and c2.
    fleet.start("d1.service", unit("Conflicts=c?.service"))
    d1_on = fleet.wait_running("d1.service")
    assert d1_on not in (a, c2_on)
    # Every machine now runs something e conflicts with: it cannot be placed, and says why.
    fleet.start("e.service", unit("Conflicts=c1.service d*.service filler-*"))
    reason = fleet.wait_unplaced("e.service")
    assert "conflict" in reason, reason
    assert not fleet.driver.states("e.service")
    fleet.assert_not_loaded("e.service", fleet.live())


def test_machine_metadata_filters(fleet: Fleet) -> None:
    east, west2, west3 = fleet.home
    fleet.start("east.service", unit("MachineMetadata=region=east"))
    fleet.start("west-a.service", unit("MachineMetadata=region=west"))
    fleet.start("west-b.service", unit("MachineMetadata=region=west"))
    fleet.start("ssd.service", unit("MachineMetadata=region=west\nMachineMetadata=disk=ssd"))
    fleet.start(
        "east-or-north.service", unit("MachineMetadata=region=east\nMachineMetadata=region=north")
    )
    assert fleet.wait_running("east.service") is east
    west = {fleet.wait_running(n).name for n in ("west-a.service", "west-b.service")}
    assert west <= {west2.name, west3.name}
    assert fleet.wait_running("ssd.service") is west3
    assert fleet.wait_running("east-or-north.service") is east


def test_unplaceable_units_say_why_and_place_once_possible(fleet: Fleet) -> None:
    fleet.start("north.service", unit("MachineMetadata=region=north"))
    fleet.start("nvme.service", unit("MachineMetadata=disk=nvme"))
    fleet.start("pinned.service", unit("MachineID=" + "0" * 32))
    fleet.start("follower.service", unit("MachineOf=leader.service"))

    north = fleet.wait_unplaced("north.service")
    assert "region=north" in north, north
    assert "MachineID=" + "0" * 32 in fleet.wait_unplaced("pinned.service")
    follower = fleet.wait_unplaced("follower.service")
    assert "MachineOf" in follower, follower
    assert "leader.service" in follower, follower
    assert "disk=nvme" in fleet.wait_unplaced("nvme.service")
    for name in ("north.service", "nvme.service", "pinned.service", "follower.service"):
        assert not fleet.driver.states(name), name
        fleet.assert_not_loaded(name, fleet.live())

    # The missing MachineOf peer arrives: both run, together.
    fleet.start("leader.service", unit())
    assert fleet.wait_running("follower.service") is fleet.wait_running("leader.service")

    # A machine gains the metadata (dynamic machine metadata): the unit is placed there.
    west2 = fleet.home[1]
    fleet.driver.set_metadata(west2.machine_id, "disk", "nvme")
    try:
        assert fleet.wait_running("nvme.service") is west2
    finally:
        fleet.driver.set_metadata(west2.machine_id, "disk", None)
    # ... and loses it again: the unit has nowhere to go.
    eventually(
        lambda: not fleet.running_on("nvme.service"), 10.0, "nvme.service to leave its machine"
    )
    assert "disk=nvme" in fleet.wait_unplaced("nvme.service")


def test_global_units_run_on_every_matching_machine(fleet: Fleet) -> None:
    east, west2, west3 = fleet.home
    fleet.start("everywhere.service", unit("Global=true"))
    fleet.start("west-only.service", unit("Global=true\nMachineMetadata=region=west"))
    fleet.wait_running_on("everywhere.service", fleet.home)
    fleet.wait_running_on("west-only.service", [west2, west3])
    fleet.assert_not_loaded("west-only.service", [east])

    fleet.destroy(["everywhere.service", "west-only.service"])
    fleet.assert_not_loaded("everywhere.service", fleet.home)
    fleet.assert_not_loaded("west-only.service", fleet.home)


def test_replaces_moves_the_replaced_unit(fleet: Fleet) -> None:
    east, west2, west3 = fleet.home
    # One unit on each west machine, so old lands on east, the least loaded.
    for m in (west2, west3):
        fleet.start(f"filler-{m.index}.service", unit(f"MachineID={m.machine_id}"))
        assert fleet.wait_running(f"filler-{m.index}.service") is m
    fleet.start("old.service", unit())
    assert fleet.wait_running("old.service") is east
    old_pid = fleet.systemd(east, "old.service").main_pid
    # new can only run on east (metadata) and replaces old there: old has to move.
    fleet.start("new.service", unit("MachineMetadata=region=east\nReplaces=old.service"))
    assert fleet.wait_running("new.service") is east
    moved_to = fleet.wait_running("old.service", not_on=[east.machine_id])
    assert moved_to in (west2, west3)
    assert fleet.systemd(moved_to, "old.service").main_pid != old_pid
    fleet.assert_not_loaded("old.service", [east])


def test_template_instances_share_a_body_and_spread(fleet: Fleet) -> None:
    template = unit(exec_start="/bin/sleep 1000%i")
    names = [f"hello@{i}.service" for i in (1, 2, 3)]
    fleet.start_instances(template, names)
    units = fleet.driver.units()
    assert {units[n].hash for n in names} == {parse_unit(template).hash}
    where = {n: fleet.wait_running(n) for n in names}
    assert len({m.name for m in where.values()}) == 3, {n: m.name for n, m in where.items()}
    for i, name in enumerate(names, start=1):
        pid = fleet.systemd(where[name], name).main_pid
        cmdline = fleet.cluster.exec(where[name], ["cat", f"/proc/{pid}/cmdline"]).stdout
        assert cmdline.split("\0")[:2] == ["/bin/sleep", f"1000{i}"], cmdline


# -- fleetd and machines going away ----------------------------------------------------------


def spread_units(fleet: Fleet, count: int) -> dict[str, MachineState]:
    names = [f"work-{i}.service" for i in range(count)]
    for name in names:
        fleet.start(name, unit())
    return {name: fleet.wait_running(name) for name in names}


# -- day 2: cordon and drain ----------------------------------------------------------------


def fleetctl(fleet: Fleet, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The installed fleetctl, through etcd, as an operator on the host runs it."""
    state = fleet.cluster.state
    assert state is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETCTL_")}
    env["FLEETCTL_ETCD_KEY_PREFIX"] = state.etcd_key_prefix
    argv = [FLEETCTL, "--driver", "etcd", "--endpoint", fleet.cluster.etcd_endpoint, *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)


class ActiveCopies:
    """Active copies of units as etcd's published states say, sampled every 0.1 s."""

    def __init__(self, fleet: Fleet, names: list[str]) -> None:
        self.fleet = fleet
        self.samples: dict[str, list[int]] = {n: [] for n in names}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            states = self.fleet.driver.states()
            for name, seen in self.samples.items():
                seen.append(sum(s.name == name and s.active_state == "active" for s in states))
            self._stop.wait(0.1)

    def __enter__(self) -> ActiveCopies:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def on_one_machine(fleet: Fleet, names_and_texts: list[tuple[str, str]]) -> MachineState:
    """Start the units on the first machine (the others cordoned meanwhile)."""
    home, *others = fleet.home
    for m in others:
        fleet.driver._run(fleet.driver.registry.cordon(Cordon(m.machine_id)))
    for name, text in names_and_texts:
        fleet.start(name, text)
    for name, _ in names_and_texts:
        assert fleet.wait_running(name) is home
    for m in others:
        fleet.driver._run(fleet.driver.registry.uncordon(m.machine_id))
    return home


def test_drain_moves_units_without_downtime_and_names_what_stays(fleet: Fleet) -> None:
    stop_policy = unit("PartitionPolicy=stop")
    web = unit("MinAvailable=1")
    home = on_one_machine(
        fleet,
        [
            ("single.service", unit()),
            ("fenced.service", stop_policy),
            ("web@1.service", web),
            ("web@2.service", web),
            ("pinned.service", unit(f"MachineID={home_id(fleet)}")),
        ],
    )
    fleet.start("everywhere.service", unit("Global=true"))
    eventually(
        lambda: home.machine_id in fleet.running_on("everywhere.service"), 20.0, "global unit"
    )
    watched = ["single.service", "fenced.service", "web@1.service", "web@2.service"]
    with ActiveCopies(fleet, watched) as copies:
        # The pinned unit cannot leave: the drain ends at its deadline, naming it.
        first = fleetctl(fleet, "drain", home.machine_id[:12], "--deadline", "15s")
        assert first.returncode == 1, first
        assert "pinned.service" in first.stderr, first.stderr
        assert "MachineID" in first.stderr, first.stderr
        eventually(
            lambda: not {"single.service", "fenced.service"} & set(fleet.unit_files(home)),
            20.0,
            "single and fenced to leave the drained machine",
        )
        fleet.destroy(["pinned.service"])
        second = fleetctl(fleet, "drain", home.machine_id, "--deadline", "30s")
        assert second.returncode == 0, second
    report(
        f"drain: single.service active copies min {min(copies.samples['single.service'])}, "
        f"fenced.service max {max(copies.samples['fenced.service'])} "
        f"({len(copies.samples['single.service'])} samples at 0.1 s)"
    )
    assert min(copies.samples["single.service"]) >= 1, "the singleton had no active copy"
    assert max(copies.samples["fenced.service"]) <= 1, "the stop-policy unit ran twice"
    web_active = [
        a + b
        for a, b in zip(
            copies.samples["web@1.service"], copies.samples["web@2.service"], strict=True
        )
    ]
    assert min(web_active) >= 1, "MinAvailable=1 of web@.service was broken"
    for name in ("single.service", "fenced.service", "web@1.service", "web@2.service"):
        assert fleet.wait_running(name) is not home
    assert home.machine_id in fleet.running_on("everywhere.service"), "the global unit left"
    fleet.assert_not_loaded("single.service", [home])
    # list-machines keeps fleet's columns; --fields shows the cordon.
    listed = fleetctl(fleet, "list-machines", "--fields", "machine,schedulable", "--full")
    assert f"{home.machine_id}\tdraining" in listed.stdout, listed.stdout
    assert fleetctl(fleet, "uncordon", home.machine_id[:8]).returncode == 0
    fleet.start("after-uncordon.service", unit(f"MachineID={home.machine_id}"))
    assert fleet.wait_running("after-uncordon.service") is home


def home_id(fleet: Fleet) -> str:
    return fleet.home[0].machine_id


def test_drain_completes_across_an_engine_failover(fleet: Fleet) -> None:
    leader_id = fleet.driver.leader()
    leader = next(m for m in fleet.home if m.machine_id == leader_id)
    target = next(m for m in fleet.home if m is not leader)
    names = [f"move-{i}.service" for i in range(3)]
    for name in names:
        fleet.start(name, unit())
    where = {name: fleet.wait_running(name) for name in names}
    on_target = [n for n, m in where.items() if m is target]
    assert on_target, f"least-loaded placement put nothing on {target.name}: {where}"
    started = fleetctl(fleet, "drain", target.machine_id, "--no-wait")
    assert started.returncode == 0, started
    # The engine leader's fleetd is killed as the drain begins; `drain` again shows the rest.
    fleet.cluster.exec(leader, ["systemctl", "kill", "-s", "KILL", "fleet"], check=True)
    again = fleetctl(fleet, "drain", target.machine_id, "--deadline", "60s")
    assert again.returncode == 0, again
    for name in on_target:
        assert fleet.wait_running(name) is not target


def test_fleetd_restart_keeps_units_running(fleet: Fleet) -> None:
    where = spread_units(fleet, 3)
    name, m = next(iter(where.items()))
    pid = fleet.systemd(m, name).main_pid
    keys = fleet.driver.registry.keys
    placement_key = fleet.driver.key_facts(keys.placement(name))
    schedule_key = fleet.driver.key_facts(keys.scheduled(m.machine_id, name))
    machine_key = fleet.driver.key_facts(keys.machine(m.machine_id))
    assert placement_key is not None
    assert schedule_key is not None
    assert machine_key is not None

    fleet.cluster.exec(m, ["systemctl", "restart", "fleet"], check=True, timeout=60)
    eventually(lambda: fleet.fleetd_state(m) == "active/running", 20.0, f"fleetd in {m.name}")

    def unchanged() -> bool:
        return (
            fleet.systemd(m, name).main_pid == pid
            and fleet.running_on(name) == [m.machine_id]
            and fleet.driver.key_facts(keys.placement(name)) == placement_key
            and fleet.driver.key_facts(keys.scheduled(m.machine_id, name)) == schedule_key
            and fleet.driver.key_facts(keys.machine(m.machine_id)) == machine_key
        )

    # Past agent_ttl: a lost lease would have rescheduled the unit by then.
    holds_for(unchanged, AGENT_TTL + 1.0, f"{name} on {m.name} with pid {pid}, keys unchanged")
    # The restarted fleetd still works: it takes new work.
    fleet.start("after-restart.service", unit(f"MachineID={m.machine_id}"))
    assert fleet.wait_running("after-restart.service") is m


def test_graceful_fleetd_stop_hands_units_over_at_once(fleet: Fleet) -> None:
    where = spread_units(fleet, 3)
    name, m = next(iter(where.items()))
    started = time.monotonic()
    fleet.cluster.stop_fleetd(m)
    moved_to = fleet.wait_running(name, timeout=AGENT_TTL + 10, not_on=[m.machine_id])
    elapsed = time.monotonic() - started
    fleet.record("graceful_stop_to_active_elsewhere_seconds", round(elapsed, 3))
    report(f"systemctl stop fleet in {m.name} -> {name} active in {moved_to.name}: {elapsed:.3f} s")
    assert elapsed < AGENT_TTL, f"handover took {elapsed:.2f} s, not under agent_ttl"
    # The old copy is stopped and gone, the machine left the cluster.
    fleet.assert_not_loaded(name, [m])
    assert m.machine_id not in fleet.registered()
    # The other units did not move.
    for other, host in where.items():
        if other != name:
            assert fleet.running_on(other) == [host.machine_id], fleet.describe(other)


def survivor_lease(fleet: Fleet, m: MachineState) -> tuple[int, int]:
    """(lease, create revision) of a machine's registration: a re-registration changes both."""
    facts = fleet.driver.key_facts(fleet.driver.registry.keys.machine(m.machine_id))
    assert facts is not None, f"{m.name} is not registered"
    return facts.lease, facts.create_revision


def test_killed_machine_units_come_back_elsewhere(fleet: Fleet) -> None:
    where = spread_units(fleet, 6)
    victim = where["work-0.service"]
    lost = sorted(n for n, host in where.items() if host is victim)
    kept = {n: host for n, host in where.items() if host is not victim}
    was_leader = fleet.driver.leader() == victim.machine_id
    survivors = [m for m in fleet.home if m is not victim]
    leases = {m.name: survivor_lease(fleet, m) for m in survivors}
    # Before anyone kills it: what does the engine's planner say the kill will do?
    asked = fleetctl(fleet, "plan", "--kill", victim.machine_id, "-o", "json")
    assert asked.returncode == 0, asked  # every unit has somewhere to go
    predicted = {u["name"]: u for u in json.loads(asked.stdout)["units"]}

    started = time.monotonic()
    fleet.cluster.kill(victim)
    killed = time.monotonic() - started
    # One poll loop for both events, so neither time is delayed by waiting for the other.
    seen: dict[str, float] = {}

    def all_back() -> bool:
        now = time.monotonic() - started
        if "expired" not in seen and victim.machine_id not in fleet.registered():
            seen["expired"] = now
        for name in lost:
            if name not in seen:
                running = fleet.running_on(name)
                if running and victim.machine_id not in running:
                    seen[name] = now
        return all(name in seen for name in lost) and "expired" in seen

    eventually(all_back, AGENT_TTL + 15, lambda: f"{lost} to run elsewhere (seen {seen})")
    for name in lost:
        fleet.wait_running(name, not_on=[victim.machine_id])  # and systemd there agrees
    # The prediction was exact: the same units moved, each to the machine it named.
    assert sorted(predicted) == lost, (predicted, lost)
    for name in lost:
        assert predicted[name]["action"] == "move", predicted[name]
        assert fleet.running_on(name) == [predicted[name]["to"]], (name, predicted[name])
    elapsed = round(max(seen[n] for n in lost), 3)
    fleet.record(
        "kill_to_active_elsewhere_seconds",
        {
            "all": elapsed,
            "per_unit": {n: round(seen[n], 3) for n in lost},
            "kill_call": round(killed, 3),
            "machine_key_expired": round(seen["expired"], 3),
            "killed_leader": was_leader,
        },
    )
    report(
        f"kill {victim.name} ({len(lost)} units{', engine leader' if was_leader else ''}) -> "
        f"all active elsewhere: {elapsed:.3f} s (kill call {killed:.3f} s, machine key gone "
        f"{seen['expired']:.3f} s; agent_ttl {AGENT_TTL:g} s)"
    )
    # Not before the machine's lease expired, and soon after it.
    assert all(seen[n] >= seen["expired"] for n in lost), seen
    assert elapsed < AGENT_TTL + 3, seen
    for name, host in kept.items():
        assert fleet.running_on(name) == [host.machine_id], fleet.describe(name)
    # The other machines were not disturbed: they kept their leases (so their units and
    # states never went away; a bridge whose MAC changed with its ports once broke this).
    assert {m.name: survivor_lease(fleet, m) for m in survivors} == leases

    # The machine comes back (same id) and is a member again, with no units of its own.
    fleet.cluster.restart(victim)
    fleet.wait_registered(fleet.home)
    assert all(s.machine_id != victim.machine_id for s in fleet.driver.states())
    assert {m.name: survivor_lease(fleet, m) for m in survivors} == leases


def test_new_machine_gets_new_work(fleet: Fleet) -> None:
    where = spread_units(fleet, 3)  # one per machine: the newcomer is least loaded
    placements = {n: m.machine_id for n, m in where.items()}
    leases = {m.name: survivor_lease(fleet, m) for m in fleet.home}
    joined = fleet.cluster.add_machine({"region": "north"})
    try:
        fleet.wait_registered([*fleet.home, joined])
        fleet.start("fresh.service", unit())
        fleet.start("north.service", unit("MachineMetadata=region=north"))
        assert fleet.wait_running("fresh.service") is joined
        assert fleet.wait_running("north.service") is joined
        # Nothing moved to it: a joining machine takes new work only.
        for name, machine_id in placements.items():
            assert fleet.running_on(name) == [machine_id], fleet.describe(name)
        fleet.destroy(["fresh.service", "north.service"])
    finally:
        fleet.cluster.stop(joined)
    fleet.wait_registered(fleet.home)
    # Neither its arrival nor its departure disturbed the others.
    assert {m.name: survivor_lease(fleet, m) for m in fleet.home} == leases
    for name, machine_id in placements.items():
        assert fleet.running_on(name) == [machine_id], fleet.describe(name)
