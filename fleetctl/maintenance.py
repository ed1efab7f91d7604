"""cordon, uncordon and drain (beyond fleet): taking a machine out of service.

`cordon` records that a machine gets no new units (it keeps what it runs); `uncordon` undoes
it. `drain` cordons with drain set: the engine leader then moves the machine's non-global units
elsewhere, each started on its new machine before its old copy stops (PartitionPolicy=stop
units stop first), so a drained singleton is never down. The moving is the engine's, recorded
in etcd, so it goes on if fleetctl is killed or the engine fails over; `drain` run again shows
where it stands. fleetctl only waits: until no non-global unit runs on the machine (exit 0),
or until `--deadline`, when it names each unit left and why (exit 1).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import click

from fleetctl.client import ClusterClient
from fleetctl.command import FleetCommand, run, say, warn
from fleetctl.completion import complete_machines
from fleetctl.errors import CommandFailed
from fleetd.config_values import parse_positive_duration
from fleetd.engine.whatif import resolve_machines
from fleetd.errors import ConfigError, InvalidInput
from fleetd.model import Cordon, Placement
from fleetd.views import MachineView, StateView, UnitView

POLL_INTERVAL = 0.5
DEFAULT_DEADLINE = "10m"


async def resolve_machine(client: ClusterClient, prefix: str) -> MachineView:
    """The one registered machine whose id starts with `prefix` (the rule `plan --kill` uses),
    or a clear error."""
    machines = {m.id: m for m in await client.machines()}
    try:
        (machine_id,) = resolve_machines([prefix], machines)
    except InvalidInput as e:
        raise CommandFailed(str(e)) from None
    return machines[machine_id]


@dataclass(frozen=True)
class DrainStatus:
    """Where a drain stands: the non-global units still running on the machine, and why."""

    left: dict[str, str]  # unit -> what it waits for

    @property
    def done(self) -> bool:
        return not self.left


def drain_status(
    machine_id: str,
    units: Sequence[UnitView],
    states: Sequence[StateView],
    placements: dict[str, Placement],
    *,
    include_global: bool = False,
) -> DrainStatus:
    """A unit is left while it is placed on the machine or a copy of it runs there (the old
    copy of a move waits for the new one to be active); a global unit only with
    `include_global`, while its copy there runs."""
    local = {u.name: u for u in units if include_global or not u.is_global}
    running_here = {s.name for s in states if s.machine_id == machine_id and s.name in local}
    left: dict[str, str] = {}
    for name in sorted(
        running_here | {n for n, p in placements.items() if p.machine_id == machine_id}
    ):
        if name not in local:
            continue
        placement = placements.get(name)
        if local[name].is_global:
            left[name] = "global unit: stopping here"
        elif placement is not None and placement.machine_id == machine_id:
            left[name] = placement.reason or "waiting for the engine to move it"
        elif placement is not None and placement.machine_id:
            left[name] = f"starting on {placement.machine_id[:8]}; stops here once active there"
        elif placement is not None and placement.reason:
            left[name] = placement.reason
        else:
            left[name] = "stopping"
    return DrainStatus(left)


async def wait_for_drain(
    client: ClusterClient,
    machine_id: str,
    deadline: float,
    show: Callable[[str], None],
    poll: float = POLL_INTERVAL,
    *,
    include_global: bool = False,
) -> DrainStatus:
    """Poll until the machine runs no non-global unit or `deadline` (monotonic) passes,
    showing each unit as it leaves."""
    before: dict[str, str] | None = None
    while True:
        units, states = await asyncio.gather(
            client.units(), client.unit_states(machine_id=machine_id)
        )
        # A unit's view carries its placement: its machine, and the reason it is not placed
        # or (a drain) why it stays.
        placements = {u.name: Placement(u.name, u.machine_id, u.reason) for u in units}
        status = drain_status(machine_id, units, states, placements, include_global=include_global)
        if before is None:
            show(f"{len(status.left)} units to move off {machine_id}")
        else:
            for name in sorted(before.keys() - status.left.keys()):
                where = placements.get(name)
                target = f" to {where.machine_id}" if where and where.machine_id else ""
                show(f"moved {name}{target} ({len(status.left)} left)")
        before = status.left
        if status.done or time.monotonic() >= deadline:
            return status
        await asyncio.sleep(poll)


def _deadline(text: str) -> float:
    try:
        return parse_positive_duration(text)
    except ConfigError as e:
        raise click.BadParameter(str(e), param_hint="'--deadline'") from None


@click.command("cordon", cls=FleetCommand, short_help="Give a machine no new units.")
@click.option("--reason", default="", help="Why, shown in list-machines and reasons.")
@click.argument("machine", shell_complete=complete_machines)
def cordon(reason: str, machine: str) -> None:
    """Cordon MACHINE (an ID or a unique prefix): it keeps its units but gets no new ones."""

    async def work(client: ClusterClient) -> int:
        found = await resolve_machine(client, machine)
        await client.cordon(Cordon(found.id, reason=reason, since=time.time()))
        say(f"Machine {found.id} cordoned")
        return 0

    run(work)


@click.command("uncordon", cls=FleetCommand, short_help="Make a machine schedulable again.")
@click.argument("machine", shell_complete=complete_machines)
def uncordon(machine: str) -> None:
    """Uncordon MACHINE: it takes new units again (a drain in progress ends)."""

    async def work(client: ClusterClient) -> int:
        found = await resolve_machine(client, machine)
        if not await client.uncordon(found.id):
            raise CommandFailed(f"machine {found.id} is not cordoned")
        say(f"Machine {found.id} uncordoned")
        return 0

    run(work)


@click.command("drain", cls=FleetCommand, short_help="Move every unit off a machine.")
@click.option(
    "--deadline",
    default=DEFAULT_DEADLINE,
    show_default=True,
    help="How long to wait for the machine to be empty (Go duration, e.g. 90s, 5m).",
)
@click.option("--no-wait", is_flag=True, help="Start the drain and return at once.")
@click.option(
    "--include-global", is_flag=True, help="Stop the machine's global units too (they do not move)."
)
@click.option("--reason", default="", help="Why, shown in list-machines.")
@click.argument("machine", shell_complete=complete_machines)
def drain(deadline: str, no_wait: bool, include_global: bool, reason: str, machine: str) -> None:
    """Cordon MACHINE and move its non-global units elsewhere, each started on its new machine
    before it stops here (PartitionPolicy=stop units stop first). Waits until the machine is
    empty; a unit no other machine can run is left running and named."""
    seconds = _deadline(deadline)

    async def work(client: ClusterClient) -> int:
        found = await resolve_machine(client, machine)
        now = time.time()
        since = found.cordon.since if found.cordon is not None and found.cordon.drain else now
        await client.cordon(
            Cordon(
                found.id,
                reason=reason,
                since=since,
                drain=True,
                deadline=now + seconds,
                include_global=include_global,
            )
        )
        if no_wait:
            say(f"Machine {found.id} draining")
            return 0
        status = await wait_for_drain(
            client, found.id, time.monotonic() + seconds, warn, include_global=include_global
        )
        if status.done:
            say(f"Machine {found.id} drained")
            return 0
        lines = [f"  {name}: {why}" for name, why in status.left.items()]
        raise CommandFailed(
            f"Machine {found.id} not drained after {deadline}: {len(status.left)} units left\n"
            + "\n".join(lines)
        )

    run(work)
