"""A randomized fault soak on the real cluster: a seeded sequence of faults under a stream of
submissions, with an invariant check after every step and at the end.

Faults are drawn from: etcd paused (SIGSTOP, 0.5-3x agent_ttl), its raft leader paused
(0.5-2x agent_ttl), etcd stopped and started again;
a machine killed (then booted again), rebooted, or partitioned (then healed); a fleetd
SIGKILLed; the engine leader's fleetd SIGKILLed. Before each fault one or two units are
submitted (PartitionPolicy keep, every third one stop). After each step the checker waits for
convergence and asserts:

- every keep unit runs, on exactly one machine; every submission exists exactly once;
- a stop unit never ran on two machines at any sample (sampled while waiting, about 2 Hz);
- no machine is missing from the registry;
- an etcd-side fault (pause of etcd or of its raft leader, restart) moved and restarted nothing.

The seed is printed (FLEET_SOAK_SEED replays it), with restarts, moves and two-copy seconds per
fault kind. `test_fault_soak_short` runs in CI (8 faults); `test_fault_soak` is the long form
(marked `soak`; FLEET_SOAK_FAULTS, default 30), run with `FLEET_SOAK=1 pytest -m soak`.

The cluster of test_faults.py (3 machines, a 3-member etcd, agent_ttl 10 s), fleetd as deployed
(Restart=always, RestartSec=2s: a SIGKILLed fleetd is back well within its lease).
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from fleet_cluster import Cluster, MachineState
from fleet_helpers import Fleet, eventually, fleet_on, report, unit

AGENT_TTL = 10.0
KINDS = [
    "etcd_pause",
    "etcd_leader_pause",
    "etcd_restart",
    "machine_kill",
    "machine_reboot",
    "partition",
    "fleetd_kill",
    "leader_kill",
]
ETCD_SIDE = {"etcd_pause", "etcd_leader_pause", "etcd_restart"}
pytestmark = pytest.mark.parametrize(
    "cluster",
    [{"n": 3, "agent_ttl": f"{AGENT_TTL:g}s", "etcd_members": 3}],  # test_faults.py's
    indirect=True,
    ids=["3-machines-3-etcd"],
)
CONVERGE = 3 * AGENT_TTL + 60  # the slowest step: a machine killed, its units moved, rebooted


@dataclass
class Figures:
    faults: Counter[str] = field(default_factory=Counter)
    moves: Counter[str] = field(default_factory=Counter)
    restarts: Counter[str] = field(default_factory=Counter)
    two_copy_seconds: Counter[str] = field(default_factory=Counter)


class Soak:
    def __init__(self, fleet: Fleet, seed: int) -> None:
        self.fleet = fleet
        self.cluster: Cluster = fleet.cluster
        self.rng = random.Random(seed)
        self.seed = seed
        self.keep: list[str] = []
        self.stop: list[str] = []
        self.figures = Figures()
        self.kind = ""
        self.serial = 0

    # -- the stream of submissions ---------------------------------------------------------

    def submit(self) -> None:
        for _ in range(self.rng.choice((1, 2))):
            self.serial += 1
            stop = self.serial % 3 == 0
            name = f"soak{self.seed % 1000}-{self.serial}{'-stop' if stop else ''}.service"
            self.fleet.start(name, unit("PartitionPolicy=stop" if stop else ""))
            (self.stop if stop else self.keep).append(name)

    # -- sampling ------------------------------------------------------------------------------

    def where(self) -> dict[str, dict[str, int]]:
        """unit -> {machine name: main pid} over every live machine, one systemctl call each."""
        return self.fleet.main_pids([*self.keep, *self.stop])

    def sample_for(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.sample()
            time.sleep(0.5)

    def sample(self) -> dict[str, dict[str, int]]:
        seen = self.where()
        twice = [n for n in self.stop if len(seen.get(n, {})) > 1]
        if twice:
            self.figures.two_copy_seconds[self.kind] += 1  # about one sample per 0.5 s
        assert not twice, f"PartitionPolicy=stop units on two machines at once: {twice}"
        return seen

    def converge(self) -> dict[str, dict[str, int]]:
        """Wait until every home machine is registered and every unit runs exactly once."""
        wanted = {m.machine_id for m in self.fleet.home}

        def settled() -> dict[str, dict[str, int]] | None:
            seen = self.sample()
            registered = self.fleet.registered()
            if registered != wanted:
                return None
            if all(len(seen.get(n, {})) == 1 for n in [*self.keep, *self.stop]):
                return seen
            return None

        return eventually(
            settled,
            CONVERGE,
            lambda: f"convergence after {self.kind} (seed {self.seed}): {self.where()}",
            poll=0.5,
        )

    # -- faults --------------------------------------------------------------------------------

    def machine(self) -> MachineState:
        return self.rng.choice(self.fleet.home)

    def leader_machine(self) -> MachineState:
        leader = eventually(self.fleet.driver.leader, 30, "an engine leader")
        return next(m for m in self.fleet.home if m.machine_id == leader)

    def kill_fleetd(self, m: MachineState) -> None:
        self.cluster.exec(m, ["systemctl", "kill", "--signal=KILL", "fleet"], check=True)

    def inject(self, kind: str) -> None:
        cluster = self.cluster
        if kind == "etcd_pause":
            cluster.pause_etcd()
            try:
                self.sample_for(self.rng.uniform(0.5, 3.0) * AGENT_TTL)
            finally:
                cluster.resume_etcd()
        elif kind == "etcd_leader_pause":
            leader = eventually(cluster.etcd_leader, 15, "an etcd leader")
            cluster.pause_etcd([leader])
            try:
                self.sample_for(self.rng.uniform(0.5, 2.0) * AGENT_TTL)
            finally:
                cluster.resume_etcd([leader])
        elif kind == "etcd_restart":
            cluster.stop_etcd()
            cluster.start_etcd()
        elif kind == "machine_kill":
            m = self.machine()
            cluster.kill(m)
            self.sample_for(AGENT_TTL)
            cluster.restart(m)
        elif kind == "machine_reboot":
            cluster.restart(self.machine())
        elif kind == "partition":
            m = self.machine()
            cluster.partition(m)
            try:
                self.sample_for(1.5 * AGENT_TTL)
            finally:
                cluster.heal(m)
        elif kind == "fleetd_kill":
            self.kill_fleetd(self.machine())
        elif kind == "leader_kill":
            self.kill_fleetd(self.leader_machine())
        else:
            raise AssertionError(kind)

    def step(self, kind: str) -> None:
        self.kind = kind
        self.figures.faults[kind] += 1
        self.submit()
        before = self.converge()
        self.inject(kind)
        # Let what the fault set off happen (a lease running out, a move) before checking.
        self.sample_for(AGENT_TTL)
        after = self.converge()
        moved = [n for n in before if before[n].keys() != after[n].keys()]
        restarted = [
            n for n in before if before[n].keys() == after[n].keys() and before[n] != after[n]
        ]
        self.figures.moves[kind] += len(moved)
        self.figures.restarts[kind] += len(restarted)
        if kind in ETCD_SIDE:
            assert not moved, f"{kind} moved {moved} (seed {self.seed})"
            keep_restarted = [n for n in restarted if n in self.keep]
            assert not keep_restarted, f"{kind} restarted {keep_restarted} (seed {self.seed})"

    def journals(self, since: float) -> str:
        """Every machine's fleetd journal since `since` (host clock), for a failure report."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))
        parts = []
        for m in self.fleet.live():
            done = self.cluster.exec(
                m, ["journalctl", "-u", "fleet", "--since", stamp, "-o", "cat", "--no-pager"]
            )
            parts.append(f"== {m.name} ({m.machine_id})\n{done.stdout[-20000:]}")
        return "\n".join(parts)

    def run(self, faults: int) -> None:
        kinds = [KINDS[i % len(KINDS)] for i in range(faults)]
        self.rng.shuffle(kinds)  # every kind at least once when faults >= len(KINDS)
        started = time.monotonic()
        for i, kind in enumerate(kinds):
            began = time.time()
            try:
                self.step(kind)
            except BaseException:
                print(f"[soak] seed {self.seed} step {i + 1}/{faults}: {kind} FAILED", flush=True)
                print(self.journals(began - 5), flush=True)
                raise
            print(f"[soak] seed {self.seed} step {i + 1}/{faults}: {kind} ok", flush=True)
        final = self.converge()
        submitted = [*self.keep, *self.stop]
        assert len(set(submitted)) == len(submitted)
        assert set(self.fleet.driver.units()) >= set(submitted), "a submission was lost"
        assert all(len(final[n]) == 1 for n in submitted)
        self.report(time.monotonic() - started)

    def report(self, seconds: float) -> None:
        f = self.figures
        per_kind: dict[str, dict[str, float]] = {}
        for kind in sorted(f.faults):
            per_kind[kind] = {
                "faults": f.faults[kind],
                "moves": f.moves[kind],
                "restarts": f.restarts[kind],
                "two_copy_seconds": f.two_copy_seconds[kind] * 0.5,
            }
        self.fleet.record(f"soak_seed_{self.seed}", {"seconds": round(seconds, 1), **per_kind})
        report(
            f"soak seed {self.seed}: {sum(f.faults.values())} faults, "
            f"{len(self.keep) + len(self.stop)} units, {seconds:.0f} s; "
            + "; ".join(
                f"{k}: {v['faults']}x, {v['moves']} moves, {v['restarts']} restarts, "
                f"{v['two_copy_seconds']:g} two-copy s"
                for k, v in per_kind.items()
            )
        )


@pytest.fixture(scope="module")
def fleet(cluster: Cluster) -> Iterator[Fleet]:
    with fleet_on(cluster, AGENT_TTL, "tests/functional/test_soak.py") as fleet:
        try:
            yield fleet
        finally:
            restore(fleet)
            fleet.cleanup()


def restore(fleet: Fleet) -> None:
    """etcd running, every home machine up and unpartitioned, with fleetd running."""
    cluster = fleet.cluster
    cluster.resume_etcd()
    cluster.start_etcd()
    for m in fleet.home:
        if not m.running:
            cluster.restart(m)
        elif m.partitioned:
            cluster.heal(m)
    fleet.wait_registered(fleet.home, timeout=AGENT_TTL + 60)


def seed() -> int:
    given = os.environ.get("FLEET_SOAK_SEED")
    chosen = int(given) if given else random.SystemRandom().randrange(1, 1_000_000)
    print(f"[soak] seed {chosen} (FLEET_SOAK_SEED={chosen} replays it)", flush=True)
    return chosen


def soak(fleet: Fleet, faults: int, chosen: Callable[[], int] = seed) -> None:
    try:
        Soak(fleet, chosen()).run(faults)
    finally:
        restore(fleet)
        fleet.cleanup()


@pytest.mark.timeout(900)  # 8 steps of at most about a minute each
def test_fault_soak_short(fleet: Fleet) -> None:
    soak(fleet, 8)


@pytest.mark.soak
@pytest.mark.timeout(int(os.environ.get("FLEET_SOAK_FAULTS", "30")) * 120)
@pytest.mark.skipif(os.environ.get("FLEET_SOAK") != "1", reason="the long soak: FLEET_SOAK=1")
def test_fault_soak(fleet: Fleet) -> None:
    soak(fleet, int(os.environ.get("FLEET_SOAK_FAULTS", "30")))
