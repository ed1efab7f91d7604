"""Driving a real fleet cluster from tests, and reading back what it did.

Two layers, so the driver can later be swapped for fleetctl without touching the tests:

- `RegistryDriver` does what fleetctl's commands do (start, stop, unload, destroy, list-machines,
  list-units, the placement reason), through fleetd's own `Registry` over `EtcdKV` on the
  cluster's etcd. `KeyFacts` are the few etcd-level facts no fleetctl command shows (a key's
  revisions and lease), used to prove that something was *not* rewritten.
- `Fleet` is what tests use: the driver plus the cluster (machines, `systemctl` inside them),
  waits on conditions with deadlines, and cleanup of every unit a test created.

Every wait polls a condition until a deadline; none sleeps blindly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import pytest
from fleet_cluster import Cluster, MachineState

from fleetd.etcd.client import EtcdConfig, EtcdKV
from fleetd.model import Machine, Placement, TargetState, Unit, UnitState
from fleetd.registry.registry import Registry
from fleetd.unit.file import UnitFile, parse_unit
from fleetd.unit.xfleet import validate_options

T = TypeVar("T")

UNITS_DIR = "/run/fleet/units"
METRICS_FILE = Path(os.environ.get("FLEET_TEST_METRICS", "/tmp/fleet-functional-metrics.json"))


# -- waiting ---------------------------------------------------------------------------------


def eventually(
    probe: Callable[[], T | None], timeout: float, what: str | Callable[[], str], poll: float = 0.02
) -> T:
    """Poll `probe` until it returns a truthy value; fail the test after `timeout` s.

    `what` may be a callable, evaluated on failure, to describe what was seen last.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            described = what() if callable(what) else what
            pytest.fail(f"timed out after {timeout} s waiting for {described}")
        time.sleep(poll)


def holds_for(probe: Callable[[], bool], seconds: float, what: str, poll: float = 0.1) -> None:
    """Check that `probe` stays true for `seconds` (an invariant over time, not a sleep)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert probe(), f"{what} stopped holding"
        time.sleep(poll)
    assert probe(), f"{what} stopped holding"


# -- the driver: what fleetctl does ------------------------------------------------------------


class Driver(Protocol):
    """The cluster operations a test needs, named after fleetctl's commands."""

    def start(self, name: str, text: str) -> None: ...  # submit + launch
    def load(self, name: str, text: str) -> None: ...
    def start_instances(self, template_text: str, names: Iterable[str]) -> None: ...
    def set_target(self, name: str, state: TargetState) -> None: ...  # start/stop/unload
    def destroy(self, name: str) -> None: ...
    def machines(self) -> list[Machine]: ...
    def units(self) -> dict[str, Unit]: ...
    def states(self, name: str | None = None) -> list[UnitState]: ...
    def placement(self, name: str) -> Placement | None: ...
    def set_metadata(self, machine_id: str, key: str, value: str | None) -> None: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class KeyFacts:
    """An etcd key's identity over time: rewriting or recreating it changes these."""

    create_revision: int
    mod_revision: int
    lease: int


class RegistryDriver:
    """`Driver` through fleetd's Registry on the cluster's etcd (a private event loop).

    The loop runs all along, in a thread of its own, as fleetd's and fleetctl's do: one run
    only during calls (run_until_complete) would not take in etcd closing an idle connection
    (a member stopped by a fault) until the next call was already written to it, and lost."""

    def __init__(self, endpoint: str, prefix: str = "/fleet/") -> None:
        """`endpoint`: one etcd URL, or several joined by commas (one per member)."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="registry-driver", daemon=True
        )
        self._thread.start()
        self.kv = EtcdKV(EtcdConfig(endpoints=endpoint.split(",")))
        self.registry = Registry(self.kv, prefix)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _create(self, name: str, body: UnitFile, state: TargetState) -> None:
        validate_options(body)  # as fleetctl and the API do before every create
        created = self._run(self.registry.create_unit(name, body, state))
        assert created, f"unit {name} already exists"

    def start(self, name: str, text: str) -> None:
        self._create(name, parse_unit(text), TargetState.LAUNCHED)

    def load(self, name: str, text: str) -> None:
        self._create(name, parse_unit(text), TargetState.LOADED)

    def start_instances(self, template_text: str, names: Iterable[str]) -> None:
        """fleetctl start hello@1.service ... from one template body (one body, one hash)."""
        body = parse_unit(template_text)
        for name in names:
            self._create(name, body, TargetState.LAUNCHED)

    def set_target(self, name: str, state: TargetState) -> None:
        self._run(self.registry.set_target_state(name, state))

    def destroy(self, name: str) -> None:
        self._run(self.registry.destroy_unit(name))

    def machines(self) -> list[Machine]:
        return self._run(self.registry.list_machines())

    def units(self) -> dict[str, Unit]:
        return {u.name: u for u in self._run(self.registry.list_units())}

    def states(self, name: str | None = None) -> list[UnitState]:
        return self._run(self.registry.list_states(name))

    def placement(self, name: str) -> Placement | None:
        return self._run(self.registry.placement(name))

    def set_metadata(self, machine_id: str, key: str, value: str | None) -> None:
        self._run(self.registry.set_machine_metadata(machine_id, key, value))

    def leader(self) -> str | None:
        return self._run(self.registry.leader())

    def key_facts(self, key: str) -> KeyFacts | None:
        kv = self._run(self.kv.get(key))
        return None if kv is None else KeyFacts(kv.create_revision, kv.mod_revision, kv.lease)

    def close(self) -> None:
        try:
            self._run(self.kv.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()


if TYPE_CHECKING:

    def _conforms(driver: RegistryDriver) -> Driver:
        return driver


# -- what systemd inside a machine says ------------------------------------------------------


@dataclass(frozen=True)
class SystemdUnit:
    load_state: str
    active_state: str
    sub_state: str
    main_pid: int

    @property
    def running(self) -> bool:
        return (self.active_state, self.sub_state) == ("active", "running") and self.main_pid > 0

    def __str__(self) -> str:
        return f"{self.load_state} {self.active_state}/{self.sub_state} pid {self.main_pid}"


# -- the test-facing layer ---------------------------------------------------------------------


@dataclass
class Fleet:
    """A cluster under test: the driver, systemd in the machines, and cleanup."""

    cluster: Cluster
    driver: RegistryDriver
    agent_ttl: float
    # The machines the cluster was booted with; tests that take one down bring it back.
    home: list[MachineState] = field(default_factory=list)
    created: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    suite: str = "tests/functional/test_scheduling.py"  # names the figures' source

    # machines

    def live(self) -> list[MachineState]:
        """Machines that are running (booted and not killed or stopped)."""
        return [m for m in self.cluster.machines if m.running]

    def machine(self, machine_id: str) -> MachineState:
        for m in self.cluster.machines:
            if m.machine_id == machine_id:
                return m
        raise AssertionError(f"machine id {machine_id} is not a machine of the cluster")

    def registered(self) -> set[str]:
        return {m.id for m in self.driver.machines()}

    def wait_registered(self, machines: Iterable[MachineState], timeout: float = 30.0) -> None:
        """Wait until exactly `machines` are registered in etcd."""
        wanted = {m.machine_id for m in machines}
        eventually(
            lambda: self.registered() == wanted,
            timeout,
            lambda: f"registered machines {sorted(wanted)} (have {sorted(self.registered())})",
        )

    # systemd inside a machine

    def systemd(self, m: MachineState, unit: str) -> SystemdUnit:
        done = self.cluster.exec(
            m, ["systemctl", "show", "-p", "LoadState,ActiveState,SubState,MainPID", unit]
        )
        props = dict(line.partition("=")[::2] for line in done.stdout.splitlines())
        return SystemdUnit(
            props.get("LoadState", "?"),
            props.get("ActiveState", "?"),
            props.get("SubState", "?"),
            int(props.get("MainPID") or 0),
        )

    def systemd_many(self, m: MachineState, units: Iterable[str]) -> dict[str, SystemdUnit]:
        """`systemd` for several units in one call into the machine (blocks in unit order)."""
        names = list(units)
        if not names:
            return {}
        props = "Id,LoadState,ActiveState,SubState,MainPID"
        done = self.cluster.exec(m, ["systemctl", "show", "-p", props, *names])
        found: dict[str, SystemdUnit] = {}
        for block in done.stdout.strip().split("\n\n"):
            values = dict(line.partition("=")[::2] for line in block.splitlines())
            if values.get("Id") in names:
                found[values["Id"]] = SystemdUnit(
                    values.get("LoadState", "?"),
                    values.get("ActiveState", "?"),
                    values.get("SubState", "?"),
                    int(values.get("MainPID") or 0),
                )
        return found

    def main_pids(self, units: Iterable[str]) -> dict[str, dict[str, int]]:
        """unit -> {machine name: main pid} for every live machine where systemd runs it."""
        names = list(units)
        seen: dict[str, dict[str, int]] = {name: {} for name in names}
        for m in self.live():
            for name, sd in self.systemd_many(m, names).items():
                if sd.running:
                    seen[name][m.name] = sd.main_pid
        return seen

    def unit_files(self, m: MachineState) -> set[str]:
        """The unit files fleetd wrote in the machine."""
        done = self.cluster.exec(m, ["ls", "-1", UNITS_DIR])
        return set(done.stdout.split())

    def fleetd_state(self, m: MachineState) -> str:
        done = self.cluster.exec(m, ["systemctl", "show", "-p", "ActiveState,SubState", "fleet"])
        props = dict(line.partition("=")[::2] for line in done.stdout.splitlines())
        return f"{props.get('ActiveState')}/{props.get('SubState')}"

    # units

    def start(self, name: str, text: str) -> None:
        self.created.append(name)
        self.driver.start(name, text)

    def load(self, name: str, text: str) -> None:
        self.created.append(name)
        self.driver.load(name, text)

    def start_instances(self, template_text: str, names: list[str]) -> None:
        self.created.extend(names)
        self.driver.start_instances(template_text, names)

    def running_on(self, name: str) -> list[str]:
        """Machine ids where fleetd publishes the unit as active/running."""
        return sorted(
            s.machine_id
            for s in self.driver.states(name)
            if (s.active_state, s.sub_state) == ("active", "running")
        )

    def describe(self, name: str) -> str:
        states = ", ".join(
            f"{self.machine(s.machine_id).name}:{s.load_state}/{s.active_state}/{s.sub_state}"
            for s in self.driver.states(name)
        )
        return f"{name} (placement {self.driver.placement(name)}; states [{states}])"

    def wait_running(
        self, name: str, timeout: float = 15.0, *, not_on: Iterable[str] = ()
    ) -> MachineState:
        """Wait until `name` runs on exactly one machine (not in `not_on`), as etcd and that
        machine's systemd both say; returns the machine."""
        excluded = set(not_on)

        def placed() -> str | None:
            running = self.running_on(name)
            if len(running) != 1 or running[0] in excluded:
                return None
            placement = self.driver.placement(name)
            if placement is None or placement.machine_id != running[0]:
                return None
            return running[0]

        machine_id = eventually(placed, timeout, lambda: f"{self.describe(name)} to run once")
        m = self.machine(machine_id)
        self.wait_systemd_running(m, name, timeout)
        return m

    def wait_systemd_running(self, m: MachineState, name: str, timeout: float) -> SystemdUnit:
        def running() -> SystemdUnit | None:
            sd = self.systemd(m, name)
            return sd if sd.running else None

        sd = eventually(
            running, timeout, lambda: f"systemd in {m.name} to run {name}: {self.systemd(m, name)}"
        )
        assert sd.load_state == "loaded", f"{name} in {m.name}: {sd}"
        return sd

    def wait_running_on(
        self, name: str, machines: Iterable[MachineState], timeout: float = 15.0
    ) -> None:
        """Wait until `name` (a global unit) runs on exactly `machines`."""
        machines = list(machines)
        wanted = sorted(m.machine_id for m in machines)
        eventually(
            lambda: self.running_on(name) == wanted,
            timeout,
            lambda: f"{self.describe(name)} to run on exactly {len(wanted)} machine(s)",
        )
        for m in machines:
            self.wait_systemd_running(m, name, timeout)

    def assert_not_loaded(self, name: str, machines: Iterable[MachineState]) -> None:
        for m in machines:
            sd = self.systemd(m, name)
            assert sd.load_state == "not-found", f"{name} in {m.name}: {sd}"
            assert name not in self.unit_files(m), f"{name} file left in {m.name}"

    def wait_unplaced(self, name: str, timeout: float = 10.0) -> str:
        """Wait until the engine records that `name` cannot be placed; returns the reason."""

        def unplaced() -> Placement | None:
            placement = self.driver.placement(name)
            return placement if placement is not None and placement.machine_id is None else None

        found = eventually(unplaced, timeout, lambda: f"{self.describe(name)} to be unplaceable")
        return found.reason

    def wait_gone(self, names: Iterable[str], timeout: float = 15.0) -> None:
        """Wait until the units, their placements and published states are gone."""
        pending = set(names)

        def gone() -> bool:
            units = self.driver.units()
            states = {s.name for s in self.driver.states()}
            for name in sorted(pending):
                if name not in units and name not in states and not self.driver.placement(name):
                    pending.discard(name)
            return not pending

        eventually(gone, timeout, lambda: f"units {sorted(pending)} to be gone")

    def destroy(self, names: Iterable[str]) -> None:
        names = list(names)
        for name in names:
            self.driver.destroy(name)
        self.wait_gone(names)
        for name in names:
            if name in self.created:
                self.created.remove(name)

    def cleanup(self) -> None:
        """Destroy every unit the test created; wait until no machine has their files."""
        names = list(self.created)
        for name in names:
            self.driver.destroy(name)
        self.wait_gone(names)
        self.created.clear()
        for m in self.live():
            self.wait_files_gone(m, names)

    def wait_files_gone(self, m: MachineState, names: Iterable[str], timeout: float = 10.0) -> None:
        """Wait until fleetd removed the unit files of `names` from machine `m`."""
        wanted = set(names)
        eventually(
            lambda: not (self.unit_files(m) & wanted),
            timeout,
            lambda: f"{m.name} to remove {sorted(self.unit_files(m) & wanted)}",
        )

    # figures

    def record(self, key: str, value: Any) -> None:
        self.metrics[key] = value

    def write_metrics(self) -> None:
        """Print the figures and append them (one run, one entry) to METRICS_FILE."""
        if not self.metrics:
            return
        entry = {
            "suite": self.suite,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "cluster": self.cluster.name,
            "machines": len(self.cluster.machines),
            "agent_ttl_seconds": self.agent_ttl,
            **self.metrics,
        }
        try:
            runs = json.loads(METRICS_FILE.read_text())
            if not isinstance(runs, list):
                runs = []
        except (OSError, ValueError):
            runs = []
        runs.append(entry)
        METRICS_FILE.write_text(json.dumps(runs, indent=2) + "\n")
        print(f"\n[metrics] {json.dumps(entry)}\n[metrics] appended to {METRICS_FILE}")


@contextlib.contextmanager
def fleet_on(cluster: Cluster, agent_ttl: float, suite: str) -> Iterator[Fleet]:
    """A `Fleet` on a booted cluster (its machines registered); figures written at the end."""
    driver = RegistryDriver(",".join(cluster.etcd_endpoints))
    fleet = Fleet(cluster, driver, agent_ttl, home=list(cluster.machines), suite=suite)
    fleet.wait_registered(fleet.home)
    try:
        yield fleet
    finally:
        try:
            fleet.write_metrics()
        finally:
            driver.close()


def summary(samples: list[float]) -> dict[str, Any]:
    """Median, min, max (seconds, 3 decimals) and the samples of a latency series."""
    return {
        "median": round(statistics.median(samples), 3),
        "min": round(min(samples), 3),
        "max": round(max(samples), 3),
        "samples": [round(s, 3) for s in samples],
    }


def report(line: str) -> None:
    """A figure for the reader of `pytest -s` (stderr is not captured-and-hidden there)."""
    print(f"[figure] {line}", file=sys.stderr)


# -- fault-test helpers: units that note each launch, and what they ran where -------------

LAUNCHES = "/run/fleet-test-launches"


def unit(xfleet: str = "") -> str:
    """A long-running service that notes each launch in its machine's LAUNCHES file."""
    text = (
        "[Unit]\nDescription=fault test unit\n\n[Service]\n"
        f"ExecStart=/bin/sh -c 'echo %n >> {LAUNCHES}; exec sleep infinity'\n"
    )
    if xfleet:
        text += f"\n[X-Fleet]\n{xfleet.strip()}\n"
    return text


def spread(fleet: Fleet, count: int, prefix: str = "work") -> dict[str, MachineState]:
    names = [f"{prefix}-{i}.service" for i in range(count)]
    for name in names:
        fleet.start(name, unit())
    return {name: fleet.wait_running(name, timeout=30) for name in names}


def launches(fleet: Fleet) -> dict[str, int]:
    """How many times each unit was launched, over every live machine."""
    counts: dict[str, int] = {}
    for m in fleet.live():
        done = fleet.cluster.exec(m, ["cat", LAUNCHES])
        for name in done.stdout.split():
            counts[name] = counts.get(name, 0) + 1
    return counts


def single_pids(fleet: Fleet, names: list[str]) -> dict[str, tuple[str, int]]:
    """unit -> (machine, main pid), asserting each runs on exactly one machine."""
    seen = fleet.main_pids(names)
    for name, where in seen.items():
        assert len(where) == 1, f"{name} runs on {where}"
    return {name: next(iter(where.items())) for name, where in seen.items()}


def machine_leases(fleet: Fleet) -> dict[str, tuple[int, int]]:
    """machine name -> (lease, create revision) of its registration."""
    keys = fleet.driver.registry.keys
    found = {}
    for m in fleet.home:
        facts = fleet.driver.key_facts(keys.machine(m.machine_id))
        assert facts is not None, f"{m.name} is not registered"
        found[m.name] = (facts.lease, facts.create_revision)
    return found


def placements(fleet: Fleet, names: list[str]) -> dict[str, object]:
    keys = fleet.driver.registry.keys
    return {name: fleet.driver.key_facts(keys.placement(name)) for name in names}


def time_to_run(fleet: Fleet, name: str, timeout: float) -> float:
    """Start `name` and return the seconds until it runs (etcd and systemd agree)."""
    started = time.monotonic()
    fleet.start(name, unit())
    fleet.wait_running(name, timeout=timeout)
    return time.monotonic() - started


def fleetd_pids(fleet: Fleet) -> dict[str, int]:
    """machine name -> MainPID of fleet.service (0 when fleetd is not running)."""
    pids = {}
    for m in fleet.home:
        done = fleet.cluster.exec(m, ["systemctl", "show", "-p", "MainPID", "--value", "fleet"])
        pids[m.name] = int(done.stdout.strip() or 0)
    return pids
