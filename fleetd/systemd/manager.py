"""The agent's view of the local systemd: the `UnitManager` protocol and its value types.

Two implementations: `fleetd.systemd.dbus.DBusUnitManager` (real systemd over D-Bus) and
`fleetd.systemd.fake.FakeUnitManager` (in memory, for unit tests and the simulator).

Everything here is pure (no I/O) except `read_unit_files`, which both the D-Bus manager and
tests use to list the units directory.

Contract shared by both implementations:

- Names are checked by `check_unit_name` before anything touches the file system or systemd:
  the agent only ever writes inside its units directory.
- `start`/`stop` wait for systemd's job to finish and return its result (`"done"`, `"failed"`,
  `"canceled"`, `"timeout"`, `"dependency"`, `"skipped"`); they raise `UnitManagerError` only
  when the request itself fails (unknown unit, D-Bus error, no answer in time). A start job
  that is `"done"` means the unit was started; a `Type=simple` service whose binary then dies
  still reports `"done"`, and `watch`/`states` show the failure afterwards.
- `watch()` first yields the current state of every unit in the units directory, then every
  change of (LoadState, ActiveState, SubState) of those units; the snapshot taken after
  subscribing means no change can fall between a `states()` call and the watch. Changes a
  slow reader missed are coalesced (it gets each unit's newest state once). It is an async
  generator: read it from one task with `async for`; cancelling a pending `anext()` (as
  `asyncio.wait_for` does on timeout) closes it for good.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from fleetd.errors import FleetError
from fleetd.unit.names import UNIT_NAME_MAX  # 255 bytes: systemd's limit and NAME_MAX

log = logging.getLogger(__name__)

# The unit types the agent manages (fleet's systemd/manager.go lsUnitsDir): files of other
# types in the units directory are written and started if asked, but never reported back.
RECOGNIZED_UNIT_TYPES = frozenset(
    {"service", "socket", "timer", "path", "device", "mount", "automount"}
)
DEFAULT_UNITS_DIR = Path("/run/fleet/units")
UNIT_PATH_PREFIX = "/org/freedesktop/systemd1/unit/"

JOB_DONE = "done"
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


class UnitManagerError(FleetError):
    """systemd refused or failed a request, or a unit name would escape the units directory."""


class NoSuchUnitError(UnitManagerError):
    """systemd has no such unit (no unit file, or not loaded when asked to stop it)."""


@dataclass(frozen=True, slots=True)
class SystemdState:
    """A unit's state as systemd reports it (passed through unmodified, as fleet does).

    `main_pid` is 0 unless it was asked for (`UnitManager.main_pid`) and the unit has one.
    """

    load_state: str
    active_state: str
    sub_state: str
    main_pid: int = 0


# What systemd reports for a name it has no unit file for.
NOT_FOUND = SystemdState("not-found", "inactive", "dead")


@runtime_checkable
class UnitManager(Protocol):
    """The local systemd, as far as fleet's agent needs it. All names are full unit names."""

    units_dir: Path

    def unit_path(self, name: str) -> Path:
        """Where the unit file of `name` lives; UnitManagerError if it would escape."""
        ...

    async def load(self, name: str, text: str, *, has_install: bool) -> None:
        """Write the unit file, link it into systemd (runtime) and enable it if it has an
        [Install] section. On enable failure the unit is removed again and this raises."""
        ...

    async def unload(self, name: str) -> None:
        """Stop the unit; only if that worked, disable it, reset its failed state and delete
        its file. Raises if the stop failed (the file stays, so the next pass retries)."""
        ...

    async def reload(self) -> None:
        """systemd daemon-reload, so written or deleted unit files take effect."""
        ...

    async def start(self, name: str) -> str:
        """StartUnit(name, "replace"); wait for the job; return its result."""
        ...

    async def stop(self, name: str) -> str:
        """StopUnit(name, "replace"); wait for the job; return its result."""
        ...

    async def states(self, names: Iterable[str]) -> dict[str, SystemdState]:
        """The state of each named unit in one round trip (main_pid left 0)."""
        ...

    async def main_pid(self, name: str) -> int:
        """The unit's main process id, 0 if none (not running, or not a service)."""
        ...

    async def unit_files(self) -> dict[str, str]:
        """name -> text of every recognized unit file in the units directory."""
        ...

    def watch(self) -> AsyncIterator[tuple[str, SystemdState]]:
        """Current state of the units in the units directory, then their changes."""
        ...

    async def own_job_type(self, unit: str) -> str | None:
        """The type of the job pending on `unit` ("restart", "stop", ...), None if none.

        fleetd asks this about its own service on SIGTERM: "restart" means `systemctl
        restart fleet` (keep units running), "stop" means hand them over.
        """
        ...

    async def close(self) -> None:
        """Release the connection; running watches end."""
        ...


def check_unit_name(name: str) -> str:
    """Return `name` if it is safe as a file name inside the units directory, else raise.

    This is a safety net below fleet's own name validation (fleetd.unit.names): whatever
    reaches the agent, it must not be able to write or delete outside its directory.
    """
    if not isinstance(name, str) or not name:
        raise UnitManagerError("unit name must be a non-empty string")
    length = len(name.encode("utf-8", "surrogatepass"))  # NAME_MAX counts bytes
    if length > UNIT_NAME_MAX:
        raise UnitManagerError(f"unit name too long ({length} > {UNIT_NAME_MAX} bytes)")
    if "/" in name or ".." in name or name.startswith("."):
        raise UnitManagerError(f"refusing unit name {name!r}: it could escape the units directory")
    if _CONTROL_CHARS.search(name):
        raise UnitManagerError(f"refusing unit name {name!r}: it contains control characters")
    return name


def unit_path(units_dir: Path, name: str) -> Path:
    """`units_dir/name` after `check_unit_name`, proven to be a direct child of units_dir."""
    path = units_dir / check_unit_name(name)
    if path.parent != units_dir or path.name != name:
        raise UnitManagerError(f"refusing unit name {name!r}: it escapes {units_dir}")
    return path


def unit_type(name: str) -> str:
    """The type suffix of a unit name ("service" for "a@1.service"), "" if none."""
    _, dot, suffix = name.rpartition(".")
    return suffix if dot else ""


def is_recognized(name: str) -> bool:
    return unit_type(name) in RECOGNIZED_UNIT_TYPES


def _unit_file_entries(units_dir: Path) -> list[os.DirEntry[str]]:
    """The recognized unit files (regular files, not symlinks) directly in `units_dir`."""
    try:
        entries = list(os.scandir(units_dir))
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        if entry.name.startswith("."):
            continue  # our own temporary files
        if entry.is_file(follow_symlinks=False) and is_recognized(entry.name):
            found.append(entry)
        else:
            log.debug("Found unrecognized file in %s, ignoring", entry.path)
    return found


def unit_file_names(units_dir: Path) -> set[str]:
    return {entry.name for entry in _unit_file_entries(units_dir)}


def read_unit_files(units_dir: Path) -> dict[str, str]:
    """name -> text of the recognized unit files in `units_dir` ({} if it does not exist).

    Synchronous on purpose: the directory is on /run (tmpfs) and holds at most a few hundred
    small files, so a thread hop would cost more than the reads.
    """
    files: dict[str, str] = {}
    for entry in _unit_file_entries(units_dir):
        try:
            with open(entry.path, encoding="utf-8") as f:
                files[entry.name] = f.read()
        except FileNotFoundError:
            continue  # deleted between listing and reading: it is gone, so skip it
    return files


# --- systemd's D-Bus object path escaping (src/basic/bus-label.c) ------------------------
# Every byte that is not an ASCII letter or digit (and a leading digit) becomes "_xx" with
# two lowercase hex digits; the empty string is "_". The D-Bus manager needs the reverse to
# name the unit a PropertiesChanged signal is about, without a GetUnit round trip.

_LABEL_SAFE = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_HEX = "0123456789abcdefABCDEF"


def escape_bus_label(text: str) -> str:
    if not text:
        return "_"
    out = []
    for i, byte in enumerate(text.encode("utf-8")):
        if byte in _LABEL_SAFE and not (i == 0 and 0x30 <= byte <= 0x39):
            out.append(chr(byte))
        else:
            out.append(f"_{byte:02x}")
    return "".join(out)


def unescape_bus_label(label: str) -> str:
    """Inverse of `escape_bus_label`; raises ValueError on a malformed label.

    Runs once per PropertiesChanged signal, hence split() rather than a char loop.
    """
    if label == "_":
        return ""
    head, *escaped = label.split("_")
    out = bytearray(head.encode("ascii"))
    for part in escaped:
        if len(part) < 2 or part[0] not in _HEX or part[1] not in _HEX:
            raise ValueError(f"malformed escape in bus label {label!r}")
        out.append(int(part[:2], 16))
        out += part[2:].encode("ascii")
    return out.decode("utf-8")


def unit_object_path(name: str) -> str:
    """systemd's object path of a unit, e.g. /org/freedesktop/systemd1/unit/a_2eservice."""
    return UNIT_PATH_PREFIX + escape_bus_label(name)


def unit_name_from_path(path: str) -> str | None:
    """The unit name of a unit object path; None for other paths or malformed labels."""
    if not path.startswith(UNIT_PATH_PREFIX):
        return None
    label = path[len(UNIT_PATH_PREFIX) :]
    if not label or "/" in label:
        return None
    try:
        return unescape_bus_label(label)
    except (ValueError, UnicodeDecodeError):
        return None


class StateFeed:
    """One watcher's queue of unit state changes, coalesced per unit.

    Producers `put` states as signals arrive; the consumer gets each unit's latest state once
    per change. Memory is bounded by the number of units, however slow the consumer: a unit
    that changed five times while nobody looked is reported once, in its newest state.
    """

    __slots__ = ("_closed", "_dirty", "_error", "_event", "_gone", "_latest", "_sent")

    def __init__(self) -> None:
        self._latest: dict[str, SystemdState] = {}
        self._sent: dict[str, SystemdState] = {}
        self._dirty: dict[str, None] = {}  # insertion-ordered set of changed names
        self._gone: set[str] = set()  # forgotten while a change was still queued
        self._event = asyncio.Event()
        self._closed = False
        self._error: BaseException | None = None

    def latest(self, name: str) -> SystemdState | None:
        return self._latest.get(name)

    def put(self, name: str, state: SystemdState) -> None:
        self._gone.discard(name)
        if self._closed or self._latest.get(name) == state:
            return
        self._latest[name] = state
        self._dirty[name] = None
        self._event.set()

    def forget(self, name: str) -> None:
        """Drop a unit that left the units directory, once its last change was taken."""
        if name in self._dirty:
            self._gone.add(name)
        else:
            self._drop(name)

    def _drop(self, name: str) -> None:
        self._latest.pop(name, None)
        self._sent.pop(name, None)

    def close(self, error: BaseException | None = None) -> None:
        """End the feed: the consumer gets what is queued, then `error` (or the end)."""
        self._closed = True
        self._error = self._error or error
        self._event.set()

    async def changes(self) -> list[tuple[str, SystemdState]]:
        """Wait for real changes; [] once closed and drained (or raise the closing error)."""
        while True:
            if not self._dirty:
                if self._closed:
                    if self._error is not None:
                        raise self._error
                    return []
                self._event.clear()
                await self._event.wait()
                continue
            batch = []
            for name in self._dirty:
                state = self._latest[name]
                if self._sent.get(name) != state:  # changed and changed back: nothing new
                    self._sent[name] = state
                    batch.append((name, state))
            self._dirty.clear()
            for name in self._gone:
                self._drop(name)
            self._gone.clear()
            if batch:
                return batch

    async def stream(self) -> AsyncIterator[tuple[str, SystemdState]]:
        while batch := await self.changes():
            for item in batch:
                yield item
