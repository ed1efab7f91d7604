"""Blocking until units reach a state (reference §1.5), and saying why when they cannot.

fleet's semantics: an *attempt* is a 2 s window polled every 250 ms; `--block-attempts=N`
allows N attempts, 0 means wait forever and `--no-block` (-1) means do not wait at all. The
first 250 ms are polled more often (FIRST_INTERVAL_SPLIT); the windows are fleet's.

Beyond fleet (its users' most common complaint: `start` hangs silently on a unit that cannot
be placed, peers #10): when the engine publishes a reason for not placing a unit, the reason
is printed to stderr as soon as it is seen (again only if it changes), and the command fails
once its attempts are used up. In wait-forever mode the reason is still shown, once.

This module prints nothing itself: the lines a wait has to show while it waits go to the
callbacks the command layer hands it (`say` for stdout, `warn` for stderr).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence

from fleetctl.client import ClusterClient
from fleetctl.output import machine_full_legend
from fleetd.model import TargetState
from fleetd.views import MachineView, StateView, UnitView

POLL_INTERVAL = 0.25  # fleet's poll period inside an attempt
ATTEMPT_SECONDS = 2.0  # fleet's defaultSleepTime window: one block attempt
FEW_UNITS = 4  # up to this many, poll each unit by name; beyond, one listing per poll

NO_BLOCK = -1

# Where a wait's lines go as they happen: one line, without its newline.
Say = Callable[[str], None]


def block_attempts(no_block: bool, attempts: int) -> int:
    """fleet's getBlockAttempts: -1 (no wait) with --no-block, N if N > 0, else 0 (forever)."""
    if no_block:
        return NO_BLOCK
    return max(attempts, 0)


# The first poll interval is split (50, 100, 100 ms of fleet's 250): a unit is usually placed
# and running within about 0.2 s of its submission, and was then seen only at the 250 ms poll.
# The polls after it, and so the attempt windows, are fleet's.
FIRST_INTERVAL_SPLIT = (0.2, 0.4, 0.4)


def _delays(attempts: int) -> Iterator[float]:
    """The sleep before each poll of `attempts` block attempts (0 before the first); endless
    for 0. The last poll falls where fleet's does, at (polls - 1) * POLL_INTERVAL."""
    polls: Iterable[int] = itertools.count()
    if attempts > 0:
        count = max(1, round(attempts * ATTEMPT_SECONDS / POLL_INTERVAL))
        if count < 2:
            yield 0.0
            return
        polls = range(count - 2)
    yield 0.0
    for share in FIRST_INTERVAL_SPLIT:
        yield POLL_INTERVAL * share
    for _ in polls:
        yield POLL_INTERVAL


async def _pause(delay: float) -> None:
    if delay:
        await asyncio.sleep(delay)


async def poll_until(check: Callable[[], Awaitable[bool]], attempts: int) -> bool:
    """Poll `check` as fleet polls (see `_delays`); True once it holds, False on timeout."""
    for delay in _delays(attempts):
        await _pause(delay)
        if await check():
            return True
    return False


class MachineCache:
    """Machines by id for legends, fetched lazily and refreshed once per unknown id."""

    def __init__(self, client: ClusterClient) -> None:
        self._client = client
        self._machines: dict[str, MachineView] | None = None
        self._refreshed_for: set[str] = set()

    async def all(self) -> Mapping[str, MachineView]:
        if self._machines is None:
            self._machines = {m.id: m for m in await self._client.machines()}
        return self._machines

    async def get(self, machine_id: str) -> MachineView | None:
        machines = await self.all()
        if machine_id not in machines and machine_id not in self._refreshed_for:
            self._refreshed_for.add(machine_id)
            self._machines = None
            machines = await self.all()
        return machines.get(machine_id)


async def fetch_units(client: ClusterClient, names: Sequence[str]) -> dict[str, UnitView]:
    """The named units that exist: by name when few (cheap), else one listing."""
    if len(names) <= FEW_UNITS:
        views = await asyncio.gather(*(client.unit(n) for n in names))
        return {v.name: v for v in views if v is not None}
    wanted = set(names)
    return {v.name: v for v in await client.units() if v.name in wanted}


async def fetch_states(client: ClusterClient, names: Sequence[str]) -> list[StateView]:
    if len(names) <= FEW_UNITS:
        per_unit = await asyncio.gather(*(client.unit_states(unit=n) for n in names))
        return [s for states in per_unit for s in states]
    wanted = set(names)
    return [s for s in await client.unit_states() if s.name in wanted]


async def _runs_expected_body(
    client: ClusterClient, view: UnitView, expect_hash: Mapping[str, str]
) -> bool:
    """After --replace, the old body's state does not count: wait for the new hash to run."""
    wanted = expect_hash.get(view.name)
    if wanted is None:
        return True
    states = await client.unit_states(unit=view.name, machine_id=view.machine_id)
    return any(s.hash == wanted for s in states)


async def wait_for_states(
    client: ClusterClient,
    names: Sequence[str],
    target: TargetState,
    attempts: int,
    machines: MachineCache,
    expect_hash: Mapping[str, str] | None = None,
    *,
    say: Say,
    warn: Say,
) -> dict[str, str]:
    """Wait until every named (non-global) unit's currentState is `target`.

    Says `Unit <n> <state>[ on <machine legend>]` for each as it arrives (`say`: stdout), and
    warns of placement reasons as they are seen (`warn`: stderr). Returns fleet-worded errors
    by unit, for the units that did not make it.
    """
    expect_hash = expect_hash or {}
    pending = list(dict.fromkeys(names))
    reasons: dict[str, str] = {}
    errors: dict[str, str] = {}
    for delay in _delays(attempts):
        await _pause(delay)
        views = await fetch_units(client, pending)
        still = []
        for name in pending:
            view = views.get(name)
            if view is None:
                errors[name] = f"unit {name} no longer exists"
                continue
            if view.current_state == target.value and await _runs_expected_body(
                client, view, expect_hash
            ):
                say(await _arrival(view, machines))
                continue
            # A placed unit's reason is why a drain leaves it where it is, not a failure.
            if view.reason and view.machine_id is None and reasons.get(name) != view.reason:
                reasons[name] = view.reason
                warn(f"Unit {name} cannot be placed: {view.reason}")
            still.append(name)
        pending = still
        if not pending:
            return errors
    for name in pending:
        errors[name] = f"timed out waiting for unit {name} to report state {target}"
    return errors


async def _arrival(view: UnitView, machines: MachineCache) -> str:
    """fleet's line for a unit that reached its state: `Unit <n> <state>[ on <legend>]`."""
    message = f"Unit {view.name} {view.current_state or ''}"
    if view.machine_id:
        machine = await machines.get(view.machine_id)
        if machine is not None:
            legend = machine_full_legend(machine.id, machine.primary_ip, False)
            message = f"{message} on {legend}"
    return message


def _active(states: Iterable[StateView], name: str, wanted_hash: str | None) -> str | None:
    """None when `name` is active and loaded; else a description of what systemd says."""
    seen = "not reported by any machine yet"
    for state in states:
        if state.name != name or (wanted_hash is not None and state.hash != wanted_hash):
            continue
        if state.active == "active" and state.load == "loaded":
            return None
        seen = f"{state.load}/{state.active}/{state.sub}"
    return seen


async def wait_for_active(
    client: ClusterClient,
    names: Sequence[str],
    attempts: int,
    expect_hash: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """After `launched`, wait for systemd to report the units active (start only).

    fleet gave this one 2 s window even in wait-forever mode and then failed (§9.4); here it
    uses the same attempts as the state wait. A unit systemd reports `failed` fails at once,
    so wait-forever cannot hang on a unit that crashed.
    """
    expect_hash = expect_hash or {}
    pending = list(dict.fromkeys(names))
    errors: dict[str, str] = {}
    last: dict[str, str] = {}
    for delay in _delays(attempts):
        await _pause(delay)
        states = await fetch_states(client, pending)
        still = []
        for name in pending:
            seen = _active(states, name, expect_hash.get(name))
            if seen is None:
                continue
            if "/failed/" in seen:
                errors[name] = f"unit {name} failed in systemd ({seen})"
                continue
            last[name] = seen
            still.append(name)
        pending = still
        if not pending:
            return errors
    for name in pending:
        errors[name] = f"Failed to find an active unit {name} (systemd: {last[name]})"
    return errors
