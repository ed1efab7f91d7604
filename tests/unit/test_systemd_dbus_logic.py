"""DBusUnitManager's own logic, without a bus: job waits, signal ordering, file writes.

The D-Bus round trips themselves are tested against real systemd in
tests/functional/test_systemd_dbus.py; here the call layer is replaced so the races that
are rare there (a JobRemoved read before the reply of the call that queued the job) can be
forced.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from fleetd.systemd import dbus as sd
from fleetd.systemd.manager import (
    StateFeed,
    SystemdState,
    UnitManager,
    UnitManagerError,
    unit_object_path,
)
from fleetd.unit.names import UNIT_NAME_MAX, validate_name

# Only fleetd.systemd.dbus imports dbus-fast; the tests borrow its import.
MessageType = sd.MessageType  # type: ignore[attr-defined]

JOB = "/org/freedesktop/systemd1/job/7"
RUNNING = SystemdState("loaded", "active", "running")


def manager(tmp_path: Path, **kw: Any) -> sd.DBusUnitManager:
    return sd.DBusUnitManager(tmp_path / "units", bus_address="unix:path=/nonexistent", **kw)


def test_is_a_unit_manager(tmp_path: Path) -> None:
    assert isinstance(manager(tmp_path), UnitManager)


# -- jobs ------------------------------------------------------------------------------------


async def test_job_removed_before_the_reply_is_not_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = manager(tmp_path)

    async def call(member: str, signature: str, body: list[Any], **_: Any) -> list[Any]:
        # dbus-fast read the reply and the signal in one go: the handler saw the signal
        # before this coroutine got the reply.
        m._on_job_removed([7, JOB, body[0], "done"])
        return [JOB]

    monkeypatch.setattr(m, "_manager_call", call)
    assert await asyncio.wait_for(m.start("a.service"), 1) == "done"
    assert m._early_results == {}
    assert m._queueing == {}


async def test_job_result_comes_from_job_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = manager(tmp_path)

    async def call(member: str, signature: str, body: list[Any], **_: Any) -> list[Any]:
        loop = asyncio.get_running_loop()
        loop.call_later(0.01, m._on_job_removed, [9, "/other/job", body[0], "canceled"])
        loop.call_later(0.02, m._on_job_removed, [7, JOB, body[0], "failed"])
        return [JOB]

    monkeypatch.setattr(m, "_manager_call", call)
    assert await asyncio.wait_for(m.stop("a.service"), 1) == "failed"
    await asyncio.sleep(0.02)
    assert m._job_waiters == {}


async def test_job_that_never_finishes_times_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = manager(tmp_path, job_timeout=0.05)

    async def call(member: str, signature: str, body: list[Any], **_: Any) -> list[Any]:
        return [JOB]

    monkeypatch.setattr(m, "_manager_call", call)
    with pytest.raises(UnitManagerError, match="did not finish"):
        await m.start("a.service")
    assert m._job_waiters == {}


async def test_a_job_that_never_finishes_fails_its_unit_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A start job that outlives job_timeout raises for its unit while the starts queued
    beside it finish: the wait holds no call slot, only its own future."""
    m = manager(tmp_path, job_timeout=0.2)
    jobs = {f"u{i}.service": f"/org/freedesktop/systemd1/job/{i}" for i in range(40)}
    finished: list[str] = []

    async def call(member: str, signature: str, body: list[Any], **_: Any) -> list[Any]:
        name = body[0]
        if name != "u0.service":  # every job but u0's ends at once
            asyncio.get_running_loop().call_soon(m._on_job_removed, [1, jobs[name], name, "done"])
        return [jobs[name]]

    async def start(name: str) -> str:
        result = await m.start(name)
        finished.append(name)
        return result

    monkeypatch.setattr(m, "_manager_call", call)
    results = await asyncio.wait_for(
        asyncio.gather(*(start(n) for n in jobs), return_exceptions=True), 2
    )
    hung, rest = results[0], results[1:]
    assert isinstance(hung, UnitManagerError)
    assert "StartUnit u0.service" in str(hung)
    assert "did not finish in 0.2s" in str(hung)
    assert rest == ["done"] * 39
    assert "u0.service" not in finished
    assert len(finished) == 39
    assert m._job_waiters == {}
    assert m._queueing == {}
    # systemd finishing the job after all is ignored; the next start works as usual.
    m._on_job_removed([1, jobs["u0.service"], "u0.service", "done"])
    monkeypatch.setattr(
        m,
        "_manager_call",
        lambda member, signature, body, **_: _reply_done(m, body[0], jobs[body[0]]),
    )
    assert await asyncio.wait_for(m.start("u0.service"), 1) == "done"


async def _reply_done(m: sd.DBusUnitManager, name: str, job: str) -> list[Any]:
    asyncio.get_running_loop().call_soon(m._on_job_removed, [2, job, name, "done"])
    return [job]


async def test_other_clients_jobs_are_not_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = manager(tmp_path)

    async def call(member: str, signature: str, body: list[Any], **_: Any) -> list[Any]:
        m._on_job_removed([3, "/someone/elses/job", body[0], "done"])
        m._on_job_removed([4, JOB, body[0], "done"])
        return [JOB]

    monkeypatch.setattr(m, "_manager_call", call)
    await m.start("a.service")
    m._on_job_removed([5, "/job/of/a/unit/nobody/waits/for", "b.service", "done"])
    assert m._early_results == {}


async def test_lost_connection_fails_waiting_jobs_and_ends_watches(tmp_path: Path) -> None:
    m = manager(tmp_path)
    waiter: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    m._job_waiters[JOB] = waiter
    feed = StateFeed()
    m._feeds.add(feed)
    m._on_lost(UnitManagerError("lost the D-Bus connection to systemd"))
    with pytest.raises(UnitManagerError, match="lost"):
        await waiter
    with pytest.raises(UnitManagerError, match="lost"):
        await feed.changes()


# -- signals and snapshots -------------------------------------------------------------------


def message(kind: MessageType, body: list[Any], **fields: Any) -> Any:
    """A D-Bus message as the manager reads it: its type, its body and the fields it looks at."""
    return SimpleNamespace(message_type=kind, body=body, **fields)


def signal(path: str, interface: str, member: str, body: list[Any]) -> Any:
    return message(
        MessageType.SIGNAL, body, path=path, interface=interface, member=member, reply_serial=None
    )


def props(name: str, **values: str) -> Any:
    changed = {k: SimpleNamespace(value=v) for k, v in values.items()}
    path = unit_object_path(name)
    return signal(path, sd.PROPS_IFACE, "PropertiesChanged", [sd.UNIT_IFACE, changed, []])


def snapshot_reply(serial: int, rows: list[tuple[str, str, str, str]]) -> Any:
    body = [[(n, "", load, active, sub, "", "/", 0, "", "/") for n, load, active, sub in rows]]
    return message(MessageType.METHOD_RETURN, body, reply_serial=serial, path=None, member=None)


def watching(tmp_path: Path, *names: str) -> tuple[sd.DBusUnitManager, StateFeed]:
    m = manager(tmp_path)
    m._known = set(names)
    feed = StateFeed()
    m._feeds.add(feed)
    return m, feed


async def test_properties_changed_of_watched_units_only(tmp_path: Path) -> None:
    m, feed = watching(tmp_path, "a.service")
    m._snapshot_serials.add(11)
    m._on_message(snapshot_reply(11, [("a.service", "loaded", "inactive", "dead")]))
    m._on_message(props("a.service", ActiveState="active", SubState="running"))
    m._on_message(props("other.service", ActiveState="failed", SubState="failed"))
    m._on_message(props("a.service", Description="not a state"))
    bad = props("a.service", ActiveState="failed")
    bad.path = "/org/freedesktop/systemd1/unit/bad_zz"
    m._on_message(bad)
    assert await feed.changes() == [("a.service", RUNNING)]


async def test_snapshot_reply_is_applied_in_message_order(tmp_path: Path) -> None:
    """A signal read before the snapshot's reply is older than it; one after is newer."""
    m, feed = watching(tmp_path, "a.service")
    m._snapshot_serials.add(12)
    m._on_message(props("a.service", ActiveState="activating", SubState="start"))
    m._on_message(snapshot_reply(12, [("a.service", "loaded", "active", "running")]))
    assert await feed.changes() == [("a.service", RUNNING)]
    m._on_message(snapshot_reply(99, [("a.service", "loaded", "failed", "failed")]))
    assert feed.latest("a.service") == RUNNING  # not our snapshot: ignored


async def test_reload_and_unit_new_ask_for_a_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m, _feed = watching(tmp_path, "a.service", "b.service")
    asked: list[list[str]] = []

    async def call(path: str, iface: str, member: str, sig: str, body: list[Any], **_: Any) -> Any:
        asked.append(body[0])
        return [[]]

    monkeypatch.setattr(m, "_call", call)
    manager_signal = (sd.MANAGER_PATH, sd.MANAGER_IFACE)
    m._on_message(signal(*manager_signal, "Reloading", [True]))  # started: nothing yet
    await asyncio.sleep(0.01)
    assert asked == []
    m._on_message(signal(*manager_signal, "Reloading", [False]))
    await asyncio.sleep(0.01)
    assert asked == [["a.service", "b.service"]]
    m._on_message(signal(*manager_signal, "UnitNew", ["b.service", "/x"]))
    m._on_message(signal(*manager_signal, "UnitNew", ["unwatched.service", "/y"]))
    await asyncio.sleep(0.01)
    assert asked == [["a.service", "b.service"], ["b.service"]]


async def test_unit_new_of_a_unit_seen_loaded_asks_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """systemd sends UnitNew from its bus queue, often after the reply of the snapshot that
    loaded the unit. Asking again then looped: a snapshot of every unit not started yet after
    every few starts (46,000 names to start 1,000 units, systemd at 90 % of a core). A unit
    already seen loaded is not asked about again; one not seen loaded still is."""
    m, feed = watching(tmp_path, "a.service", "b.service", "c.service")
    asked: list[list[str]] = []

    async def call(path: str, iface: str, member: str, sig: str, body: list[Any], **_: Any) -> Any:
        asked.append(body[0])
        return [[]]

    monkeypatch.setattr(m, "_call", call)
    m._snapshot_serials.add(13)
    m._on_message(
        snapshot_reply(
            13,
            [
                ("a.service", "loaded", "inactive", "dead"),
                ("b.service", "not-found", "inactive", "dead"),
            ],
        )
    )
    manager_signal = (sd.MANAGER_PATH, sd.MANAGER_IFACE)
    for name in ("a.service", "b.service", "c.service"):
        m._on_message(signal(*manager_signal, "UnitNew", [name, "/x"]))
    await asyncio.sleep(0.01)
    assert asked == [["b.service", "c.service"]]
    # A second feed that has not seen a.service loaded yet still needs its snapshot.
    m._feeds.add(StateFeed())
    m._on_message(signal(*manager_signal, "UnitNew", ["a.service", "/x"]))
    await asyncio.sleep(0.01)
    assert asked == [["b.service", "c.service"], ["a.service"]]
    assert feed.latest("a.service") == SystemdState("loaded", "inactive", "dead")


# -- files and names ---------------------------------------------------------------------------


def test_write_atomically_0644_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "units" / "a.service"
    old = os.umask(0o077)
    try:
        sd._write_atomically(path, "[Service]\n")
    finally:
        os.umask(old)
    assert path.read_text() == "[Service]\n"
    assert path.stat().st_mode & 0o777 == 0o644
    assert sorted(os.listdir(path.parent)) == ["a.service"]  # no temporary file left


def test_write_atomically_the_longest_valid_name(tmp_path: Path) -> None:
    """A 255-byte name (UNIT_NAME_MAX, what fleetctl and the API accept) leaves no room for
    ".<name>.tmp" under NAME_MAX: the write must still work, with no temporary file left."""
    name = "a" * (UNIT_NAME_MAX - len(".service")) + ".service"
    validate_name(name)  # the clients' check lets it in
    path = tmp_path / "units" / name
    sd._write_atomically(path, "[Service]\n")
    assert path.read_text() == "[Service]\n"
    assert os.listdir(path.parent) == [name]


def test_write_atomically_replaces_a_symlink_instead_of_following_it(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    units = tmp_path / "units"
    units.mkdir()
    (units / "a.service").symlink_to(victim)
    sd._write_atomically(units / "a.service", "[Service]\n")
    assert victim.read_text() == "precious"
    assert not (units / "a.service").is_symlink()


def test_write_atomically_a_broken_units_dir_symlink_is_a_unit_manager_error(
    tmp_path: Path,
) -> None:
    units = tmp_path / "units"
    units.symlink_to(tmp_path / "gone")  # dangling
    with pytest.raises(UnitManagerError, match=r"cannot write unit file .*a\.service"):
        sd._write_atomically(units / "a.service", "[Service]\n")
    assert not (tmp_path / "gone").exists()


def test_write_atomically_a_full_run_is_a_unit_manager_error_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    units = tmp_path / "units"
    units.mkdir()
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, fd: int) -> None:
            self.f = real_fdopen(fd, "w")

        def __enter__(self) -> Full:
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.close()

        def write(self, text: str) -> int:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: Full(fd))
    with pytest.raises(UnitManagerError, match="No space left on device"):
        sd._write_atomically(units / "a.service", "[Service]\n")
    assert os.listdir(units) == []  # neither the unit nor its temporary file


async def test_unsafe_names_never_reach_disk_or_bus(tmp_path: Path) -> None:
    m = manager(tmp_path)
    for bad in ("../evil.service", "a/b.service", "..", "x\0.service", ""):
        with pytest.raises(UnitManagerError, match="unit name"):
            await m.load(bad, "x", has_install=False)
        for call in (m.start, m.stop, m.unload, m.main_pid, m.own_job_type):
            with pytest.raises(UnitManagerError, match="unit name"):
                await call(bad)
    assert not (tmp_path / "units").exists()
    assert not (tmp_path / "evil.service").exists()


async def test_no_bus_is_a_clear_error_and_a_failed_load_leaves_nothing(tmp_path: Path) -> None:
    m = manager(tmp_path)
    with pytest.raises(UnitManagerError, match="cannot connect to the system D-Bus"):
        await m.load("a.service", "[Service]\n", has_install=False)
    assert list((tmp_path / "units").iterdir()) == []
    assert await m.states([]) == {}  # nothing to ask: no connection needed
    await m.close()
    with pytest.raises(UnitManagerError, match="closed"):
        await m.states(["a.service"])


def test_user_bus_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DBUS_SESSION_BUS_ADDRESS", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert sd.user_bus_address() == "unix:path=/run/user/1000/bus"
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", "unix:path=/elsewhere")
    assert sd.user_bus_address() == "unix:path=/elsewhere"
