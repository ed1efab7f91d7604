"""FakeUnitManager honours the UnitManager contract; name safety; systemd's path escaping."""

from __future__ import annotations

import asyncio
import gc
import time
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetd.errors import FleetError
from fleetd.systemd.fake import FakeUnitManager
from fleetd.systemd.manager import (
    NOT_FOUND,
    NoSuchUnitError,
    StateFeed,
    SystemdState,
    UnitManager,
    UnitManagerError,
    check_unit_name,
    escape_bus_label,
    read_unit_files,
    unescape_bus_label,
    unit_name_from_path,
    unit_object_path,
    unit_path,
)

LOADED = SystemdState("loaded", "inactive", "dead")
RUNNING = SystemdState("loaded", "active", "running")
FAILED = SystemdState("loaded", "failed", "failed")
TEXT = "[Service]\nExecStart=/bin/sleep 1000\n"


class Collector:
    """Reads a watch in a task. (Cancelling a pending anext() of an async generator, as
    wait_for does on timeout, would close the generator: so never time out on it.)"""

    def __init__(self, it: AsyncIterator[tuple[str, SystemdState]]) -> None:
        self.queue: asyncio.Queue[tuple[str, SystemdState] | None] = asyncio.Queue()
        self.task = asyncio.ensure_future(self._run(it))

    async def _run(self, it: AsyncIterator[tuple[str, SystemdState]]) -> None:
        async for item in it:
            await self.queue.put(item)
        await self.queue.put(None)  # the end

    async def next(self, n: int) -> list[tuple[str, SystemdState] | None]:
        return [await asyncio.wait_for(self.queue.get(), 1) for _ in range(n)]

    async def nothing_pending(self) -> bool:
        await asyncio.sleep(0.01)
        return self.queue.empty()


# -- the contract ----------------------------------------------------------------------------


def test_fake_is_a_unit_manager() -> None:
    assert isinstance(FakeUnitManager(), UnitManager)


async def test_lifecycle() -> None:
    m = FakeUnitManager()
    await m.load("a.service", TEXT, has_install=False)
    await m.reload()
    assert await m.states(["a.service"]) == {"a.service": LOADED}
    assert await m.unit_files() == {"a.service": TEXT}

    assert await m.start("a.service") == "done"
    assert (await m.states(["a.service"]))["a.service"] == RUNNING
    pid = await m.main_pid("a.service")
    assert pid > 0
    assert await m.start("a.service") == "done"  # already running: same process
    assert await m.main_pid("a.service") == pid

    assert await m.stop("a.service") == "done"
    assert await m.states(["a.service"]) == {"a.service": LOADED}
    assert await m.main_pid("a.service") == 0

    await m.start("a.service")
    await m.unload("a.service")  # stops it first
    assert await m.states(["a.service"]) == {"a.service": NOT_FOUND}
    assert await m.unit_files() == {}
    assert m.reloads == 1


async def test_states_of_many_and_unknown_units() -> None:
    m = FakeUnitManager()
    await m.load("a.service", TEXT, has_install=False)
    await m.load("b.socket", "[Socket]\n", has_install=False)
    await m.start("a.service")
    assert await m.states(["a.service", "b.socket", "nope.service"]) == {
        "a.service": RUNNING,
        "b.socket": LOADED,
        "nope.service": NOT_FOUND,
    }
    assert await m.states([]) == {}


async def test_pids_are_unique_across_instances() -> None:
    one, two = FakeUnitManager(), FakeUnitManager()
    for m in (one, two):
        await m.load("a.service", TEXT, has_install=False)
        await m.start("a.service")
    assert await one.main_pid("a.service") != await two.main_pid("a.service")


async def test_unknown_units_are_errors_like_systemd() -> None:
    m = FakeUnitManager()
    with pytest.raises(NoSuchUnitError, match="not found"):
        await m.start("nope.service")
    with pytest.raises(NoSuchUnitError, match="not loaded"):
        await m.stop("nope.service")
    await m.unload("nope.service")  # idempotent
    assert issubclass(NoSuchUnitError, FleetError)


async def test_unit_files_lists_recognized_types_only() -> None:
    m = FakeUnitManager()
    names = ["a.service", "b.socket", "c.timer", "d.path", "e.device", "f.mount"]
    names += ["g.automount", "h.target", "i.slice", "j.swap"]
    for name in names:
        await m.load(name, TEXT, has_install=False)
    assert sorted(await m.unit_files()) == names[:7]


async def test_install_section_enables_and_unload_disables() -> None:
    m = FakeUnitManager()
    await m.load("a.service", TEXT, has_install=True)
    await m.load("b.service", TEXT, has_install=False)
    assert m.enabled == {"a.service"}
    await m.unload("a.service")
    assert m.enabled == set()


async def test_failed_enable_leaves_nothing() -> None:
    m = FakeUnitManager(fail_enable={"a.service"})
    with pytest.raises(UnitManagerError, match=r"^Failed to enable systemd unit a\.service: "):
        await m.load("a.service", TEXT, has_install=True)
    assert await m.unit_files() == {}
    assert await m.states(["a.service"]) == {"a.service": NOT_FOUND}
    await m.load("a.service", TEXT, has_install=False)  # no [Install]: nothing to enable


async def test_failed_start_shows_failed_and_unload_resets() -> None:
    m = FakeUnitManager(fail_start={"a.service"})
    await m.load("a.service", TEXT, has_install=False)
    assert await m.start("a.service") == "failed"
    assert await m.states(["a.service"]) == {"a.service": FAILED}
    assert await m.main_pid("a.service") == 0
    assert await m.stop("a.service") == "done"
    assert await m.states(["a.service"]) == {"a.service": FAILED}  # stop keeps the failure
    await m.unload("a.service")
    assert await m.states(["a.service"]) == {"a.service": NOT_FOUND}
    m.fail_start.clear()  # knobs are plain sets
    await m.load("a.service", TEXT, has_install=False)
    assert await m.start("a.service") == "done"


async def test_failed_stop_keeps_the_unit_loaded() -> None:
    m = FakeUnitManager(fail_stop={"a.service"})
    await m.load("a.service", TEXT, has_install=False)
    await m.start("a.service")
    assert await m.stop("a.service") == "failed"
    with pytest.raises(UnitManagerError, match=r"could not stop a\.service"):
        await m.unload("a.service")
    assert "a.service" in await m.unit_files()
    assert await m.states(["a.service"]) == {"a.service": RUNNING}


async def test_failed_load_and_reload() -> None:
    m = FakeUnitManager(fail_load={"a.service"}, fail_reload=True)
    with pytest.raises(UnitManagerError):
        await m.load("a.service", TEXT, has_install=False)
    assert await m.unit_files() == {}
    with pytest.raises(UnitManagerError):
        await m.reload()


async def test_hung_start_raises_and_reads_activating() -> None:
    m = FakeUnitManager(hang_start={"a.service"})
    await m.load("a.service", TEXT, has_install=False)
    with pytest.raises(UnitManagerError, match=r"StartUnit a\.service: job did not finish"):
        await m.start("a.service")
    assert await m.states(["a.service"]) == {
        "a.service": SystemdState("loaded", "activating", "start")
    }
    m.hang_start.clear()
    assert await m.start("a.service") == "done"
    assert await m.states(["a.service"]) == {"a.service": RUNNING}


async def test_crash_shows_failed() -> None:
    m = FakeUnitManager()
    await m.load("a.service", TEXT, has_install=False)
    await m.start("a.service")
    m.crash("a.service")
    assert await m.states(["a.service"]) == {"a.service": FAILED}


async def test_own_job_type() -> None:
    m = FakeUnitManager()
    assert await m.own_job_type("fleet.service") is None
    m.jobs["fleet.service"] = "restart"
    assert await m.own_job_type("fleet.service") == "restart"


async def test_record_and_latency() -> None:
    m = FakeUnitManager(record=True, latency=0.001)
    await m.load("a.service", TEXT, has_install=False)
    await m.reload()
    await m.start("a.service")
    assert m.calls == [("load", "a.service"), ("reload", ""), ("start", "a.service")]
    assert FakeUnitManager().calls == []  # not recorded unless asked


async def test_closed_manager_refuses() -> None:
    m = FakeUnitManager()
    await m.close()
    with pytest.raises(UnitManagerError, match="closed"):
        await m.start("a.service")


# -- watch -------------------------------------------------------------------------------------


async def test_watch_yields_current_states_then_changes() -> None:
    m = FakeUnitManager()
    await m.load("a.service", TEXT, has_install=False)
    await m.load("b.service", TEXT, has_install=False)
    await m.start("b.service")
    await m.load("c.target", "[Unit]\n", has_install=False)  # not a recognized type
    w = Collector(m.watch())
    assert sorted(await w.next(2)) == [("a.service", LOADED), ("b.service", RUNNING)]  # type: ignore[type-var]
    assert await w.nothing_pending()

    await m.start("a.service")
    assert await w.next(1) == [("a.service", RUNNING)]
    await m.stop("a.service")
    assert await w.next(1) == [("a.service", LOADED)]
    await m.load("d.service", TEXT, has_install=False)
    assert await w.next(1) == [("d.service", LOADED)]
    await m.start("c.target")
    assert await w.nothing_pending()
    await m.close()
    assert await w.next(1) == [None]  # the watch ends with the manager


async def test_watch_coalesces_for_a_slow_consumer() -> None:
    m = FakeUnitManager()
    it = m.watch()
    first = asyncio.ensure_future(anext(it))
    await asyncio.sleep(0)  # the watch is now waiting
    await m.load("a.service", TEXT, has_install=False)
    assert await first == ("a.service", LOADED)
    for _ in range(5):  # nobody reads meanwhile
        await m.start("a.service")
        await m.stop("a.service")
    await m.start("a.service")
    w = Collector(it)
    assert await w.next(1) == [("a.service", RUNNING)]
    assert await w.nothing_pending()
    await m.stop("a.service")
    await m.start("a.service")  # changed and changed back: nothing new to say
    assert await w.nothing_pending()


async def test_watch_says_nothing_after_unload() -> None:
    m = FakeUnitManager()
    await m.load("a.service", TEXT, has_install=False)
    await m.start("a.service")
    w = Collector(m.watch())
    assert await w.next(1) == [("a.service", RUNNING)]
    await m.unload("a.service")
    assert await w.next(1) == [("a.service", LOADED)]  # the stop, then silence
    assert await w.nothing_pending()


async def test_two_watchers_see_the_same() -> None:
    m = FakeUnitManager()
    one, two = Collector(m.watch()), Collector(m.watch())
    await asyncio.sleep(0)
    await m.load("a.service", TEXT, has_install=False)
    assert await one.next(1) == await two.next(1) == [("a.service", LOADED)]


# -- StateFeed ---------------------------------------------------------------------------------


async def test_feed_close_with_error_after_draining() -> None:
    feed = StateFeed()
    feed.put("a.service", LOADED)
    feed.close(UnitManagerError("lost"))
    feed.put("b.service", LOADED)  # after close: dropped
    assert await feed.changes() == [("a.service", LOADED)]
    with pytest.raises(UnitManagerError, match="lost"):
        await feed.changes()


async def test_feed_forget_keeps_memory_bounded() -> None:
    feed = StateFeed()
    feed.put("a.service", RUNNING)
    feed.forget("a.service")  # queued: still delivered, then dropped
    assert await feed.changes() == [("a.service", RUNNING)]
    assert feed.latest("a.service") is None
    feed.put("a.service", RUNNING)  # back: reported again, as new
    assert await feed.changes() == [("a.service", RUNNING)]


# -- names and paths ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        "",
        ".",
        "..",
        "../evil.service",
        "a/b.service",
        "/etc/passwd",
        "a/../../b.service",
        "x\0.service",
        "new\nline.service",
        ".hidden.service",
        "a..b.service",
        "x" * 256,
    ],
)
async def test_unsafe_names_are_refused_everywhere(bad: str) -> None:
    with pytest.raises(UnitManagerError):
        check_unit_name(bad)
    with pytest.raises(UnitManagerError):
        unit_path(Path("/run/fleet/units"), bad)
    m = FakeUnitManager()
    for call in (
        lambda: m.load(bad, TEXT, has_install=False),
        lambda: m.start(bad),
        lambda: m.stop(bad),
        lambda: m.unload(bad),
        lambda: m.states([bad]),
    ):
        with pytest.raises(UnitManagerError):
            await call()
    assert m.files == {}


@pytest.mark.parametrize(
    "good", ["a.service", "foo@1.service", "foo@.service", "a-b_c:d\\x2d.mount", "x" * 255]
)
def test_safe_names_stay_inside(good: str) -> None:
    assert unit_path(Path("/run/fleet/units"), good) == Path("/run/fleet/units") / good


def test_read_unit_files(tmp_path: Path) -> None:
    (tmp_path / "a.service").write_text("A")
    (tmp_path / "b.timer").write_text("B")
    (tmp_path / "c.target").write_text("C")  # not a recognized type
    (tmp_path / ".a.service.tmp").write_text("half")  # our own temporary file
    (tmp_path / "d.service").mkdir()  # not a file
    (tmp_path / "e.service").symlink_to(tmp_path / "a.service")  # not ours
    assert read_unit_files(tmp_path) == {"a.service": "A", "b.timer": "B"}
    assert read_unit_files(tmp_path / "missing") == {}


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("dbus.service", "dbus_2eservice"),
        ("systemd-journald.service", "systemd_2djournald_2eservice"),
        ("foo@1.service", "foo_401_2eservice"),
        ("1.service", "_31_2eservice"),  # a leading digit is escaped
        ("a1.service", "a1_2eservice"),
        ("", "_"),
        ("ü.service", "_c3_bc_2eservice"),  # UTF-8, byte by byte
    ],
)
def test_bus_label_escaping_matches_systemd(name: str, label: str) -> None:
    assert escape_bus_label(name) == label
    assert unescape_bus_label(label) == name


@given(st.text(min_size=0, max_size=40))
def test_bus_label_round_trip(text: str) -> None:
    label = escape_bus_label(text)
    assert all(c.isascii() and (c.isalnum() or c == "_") for c in label)
    assert unescape_bus_label(label) == text


def test_unit_name_from_path() -> None:
    assert unit_name_from_path(unit_object_path("a@b.service")) == "a@b.service"
    assert unit_name_from_path("/org/freedesktop/systemd1/unit/a_2eservice") == "a.service"
    assert unit_name_from_path("/org/freedesktop/systemd1/job/42") is None
    assert unit_name_from_path("/org/freedesktop/systemd1/unit/") is None
    assert unit_name_from_path("/org/freedesktop/systemd1/unit/a/b") is None
    assert unit_name_from_path("/org/freedesktop/systemd1/unit/bad_zz") is None
    assert unit_name_from_path("/org/freedesktop/systemd1/unit/trunc_2") is None
    assert unit_name_from_path("/org/freedesktop/systemd1/unit/_ff") is None  # not UTF-8


# -- scale -------------------------------------------------------------------------------------


async def test_a_thousand_fakes_with_ten_units_each_are_cheap() -> None:
    """The simulator's load: correctness here; the figures are printed, not asserted."""
    gc.collect()
    tracemalloc.start()
    t0 = time.perf_counter()
    fakes = [FakeUnitManager() for _ in range(1000)]
    names = [f"u{i}.service" for i in range(10)]
    for m in fakes:
        for name in names:
            await m.load(name, TEXT, has_install=False)
            await m.start(name)
    states = [await m.states(names) for m in fakes]
    elapsed = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert all(s == dict.fromkeys(names, RUNNING) for s in states)
    print(f"1000 fakes x 10 units: {elapsed * 1000:.0f} ms, peak {peak / 2**20:.1f} MiB")
    assert peak < 64 * 2**20  # a generous bound: catches a leak, not a slowdown
