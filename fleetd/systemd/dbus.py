"""`UnitManager` over systemd's D-Bus API, with dbus-fast (the only module importing it).

Every call is a raw `Message` to org.freedesktop.systemd1 (no introspection, no proxies: one
round trip per call). The signatures used (systemd's org.freedesktop.systemd1(5)):

  Manager (/org/freedesktop/systemd1, org.freedesktop.systemd1.Manager)
    LinkUnitFiles(as files, b runtime, b force) -> a(sss) changes
    EnableUnitFiles(as files, b runtime, b force) -> (b carries_install_info, a(sss) changes)
    DisableUnitFiles(as files, b runtime) -> a(sss) changes
    Reload() -> ()                       replies once the reload has finished
    StartUnit(s name, s mode) -> o job   StopUnit(s name, s mode) -> o job
    ResetFailedUnit(s name) -> ()
    ListUnitsByNames(as names) -> a(ssssssouso)
        (name, description, load, active, sub, following, unit path, job id, job type, job path)
    ListJobs() -> a(usssoo)              (id, unit, type, state, job path, unit path)
    Subscribe() -> ()                    without it systemd emits no unit PropertiesChanged
    signal JobRemoved(u id, o job, s unit, s result)
    signal Reloading(b active)           false = a daemon-reload just finished
    signal UnitNew(s id, o unit)
  Unit objects (/org/freedesktop/systemd1/unit/<escaped name>)
    org.freedesktop.DBus.Properties.Get(s interface, s property) -> v
        used for org.freedesktop.systemd1.Service MainPID (u)
    signal org.freedesktop.DBus.Properties.PropertiesChanged(s interface, a{sv} changed,
        as invalidated), with interface org.freedesktop.systemd1.Unit for ActiveState/SubState

CPU: fleet's agent burned CPU polling and parsing D-Bus at 500+ units. Here nothing polls:
- job completion comes from JobRemoved, state changes from PropertiesChanged;
- one match rule covers all unit objects (path_namespace) and asks the bus to deliver only
  the Unit interface's changes (arg0), not the Service/Socket/... ones that follow each; one
  rule per unit would also hit dbus-daemon's per-connection limit on match rules;
- signals are filtered by decoding the unit name from the object path, before anything else;
- LoadState is a "const" property in systemd (never in PropertiesChanged): it is refreshed
  with one ListUnitsByNames for all watched units after each daemon-reload, and for one unit
  when systemd loads it (UnitNew).

Ordering: replies and signals from systemd arrive in the order systemd sent them, and the
message handler sees every message synchronously in that order. So the replies of snapshot
calls are applied in the handler too: a snapshot can never overwrite a newer signal, nor a
signal older than the snapshot overwrite it. A JobRemoved that arrives before the reply of
the StartUnit that queued the job (same read) is kept until that reply is looked at.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

from fleetd.systemd.manager import (
    DEFAULT_UNITS_DIR,
    UNIT_PATH_PREFIX,
    NoSuchUnitError,
    StateFeed,
    SystemdState,
    UnitManagerError,
    check_unit_name,
    is_recognized,
    read_unit_files,
    unit_file_names,
    unit_name_from_path,
    unit_object_path,
    unit_path,
)
from fleetd.unit.names import UNIT_NAME_MAX

log = logging.getLogger(__name__)

SYSTEMD = "org.freedesktop.systemd1"
MANAGER_PATH = "/org/freedesktop/systemd1"
MANAGER_IFACE = "org.freedesktop.systemd1.Manager"
UNIT_IFACE = "org.freedesktop.systemd1.Unit"
SERVICE_IFACE = "org.freedesktop.systemd1.Service"
PROPS_IFACE = "org.freedesktop.DBus.Properties"
# Also systemd's answer to StopUnit of a unit that is not loaded and not running.
NO_SUCH_UNIT = "org.freedesktop.systemd1.NoSuchUnit"

# At most this many calls outstanding on the connection. dbus-fast (like dbus-next, its
# issue #153) drops the connection when a write hits EAGAIN, and a few hundred concurrent
# small messages do fill a unix socket's send buffer (each costs a whole skb).
MAX_CALLS_IN_FLIGHT = 32

_MATCH_JOB_REMOVED = (
    f"type='signal',sender='{SYSTEMD}',path='{MANAGER_PATH}',"
    f"interface='{MANAGER_IFACE}',member='JobRemoved'"
)
_MATCH_WATCH = (
    f"type='signal',sender='{SYSTEMD}',interface='{PROPS_IFACE}',member='PropertiesChanged',"
    f"path_namespace='{UNIT_PATH_PREFIX.rstrip('/')}',arg0='{UNIT_IFACE}'",
    f"type='signal',sender='{SYSTEMD}',path='{MANAGER_PATH}',"
    f"interface='{MANAGER_IFACE}',member='Reloading'",
    f"type='signal',sender='{SYSTEMD}',path='{MANAGER_PATH}',"
    f"interface='{MANAGER_IFACE}',member='UnitNew'",
)


class SystemdCallError(UnitManagerError):
    """systemd answered a call with a D-Bus error; `error_name` says which."""

    def __init__(self, member: str, args: str, error_name: str, text: str) -> None:
        super().__init__(f"systemd {member}({args}) failed: {text} [{error_name}]")
        self.error_name = error_name


def user_bus_address() -> str:
    """The user's bus: $DBUS_SESSION_BUS_ADDRESS, else $XDG_RUNTIME_DIR/bus, as systemctl
    --user does (dbus-fast's own fallback wants an X11 display)."""
    if address := os.environ.get("DBUS_SESSION_BUS_ADDRESS"):
        return address
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
    return f"unix:path={runtime}/bus"


class DBusUnitManager:
    """systemd on the system bus (or the user's bus with `user=True`).

    Connects lazily on the first call and again after the connection is lost; `close()`
    when done. `job_timeout` bounds the wait for a start/stop job and for a daemon-reload
    (systemd's default stop timeout is 90 s); `call_timeout` bounds every other call.
    """

    def __init__(
        self,
        units_dir: Path = DEFAULT_UNITS_DIR,
        user: bool = False,
        *,
        job_timeout: float = 120.0,
        call_timeout: float = 25.0,
        bus_address: str | None = None,
    ) -> None:
        self.units_dir = units_dir
        self.user = user
        self.job_timeout = job_timeout
        self.call_timeout = call_timeout
        self._address = bus_address or (user_bus_address() if user else None)
        self._conn: MessageBus | None = None
        self._connect_lock = asyncio.Lock()
        self._watch_lock = asyncio.Lock()
        self._in_flight = asyncio.Semaphore(MAX_CALLS_IN_FLIGHT)
        # Jobs we wait for: job path -> future of its result.
        self._job_waiters: dict[str, asyncio.Future[str]] = {}
        # Units with a StartUnit/StopUnit reply outstanding -> how many.
        self._queueing: dict[str, int] = {}
        # JobRemoved seen for such a unit before its job path was known: job -> (unit, result).
        self._early_results: dict[str, tuple[str, str]] = {}
        self._feeds: set[StateFeed] = set()
        self._watching = False  # match rules + Subscribe done on the current connection
        self._known: set[str] | None = None  # recognized units in units_dir, once watched
        self._snapshot_serials: set[int] = set()
        self._refresh_names: set[str] = set()
        # Names in the ListUnitsByNames call in flight: asking about a unit systemd has
        # garbage-collected (loaded, inactive, unreferenced) loads it again, which emits
        # UnitNew before the reply. That UnitNew is our own doing and the reply that follows
        # has the state; refreshing on it again looped forever (load, UnitNew, refresh, GC,
        # load...), kept systemd at 100% CPU and starved its job queue at ~100 inactive units.
        self._snapshotting: set[str] = set()
        self._refresh_task: asyncio.Task[None] | None = None
        self._loss_task: asyncio.Task[None] | None = None
        self._closed = False

    # -- the protocol -----------------------------------------------------------------------

    def unit_path(self, name: str) -> Path:
        return unit_path(self.units_dir, name)

    async def load(self, name: str, text: str, *, has_install: bool) -> None:
        path = self.unit_path(name)
        _write_atomically(path, text)
        try:
            changes = await self._manager_call("LinkUnitFiles", "asbb", [[str(path)], True, True])
        except UnitManagerError:
            _remove_file(path)  # a failed load leaves nothing behind
            raise
        log.debug("linked %s: %s", name, changes[0])
        if has_install:
            try:
                await self._manager_call("EnableUnitFiles", "asbb", [[str(path)], True, True])
            except UnitManagerError as e:
                await self._remove_quietly(name, path)
                raise UnitManagerError(f"Failed to enable systemd unit {name}: {e}") from e
        if self._known is not None and is_recognized(name):
            # No snapshot now: asking systemd about a unit it has not loaded makes it
            # rescan every unit directory (~30 ms per unit here). The daemon-reload that
            # follows loads reports it (Reloading, then one snapshot of all watched units).
            self._known.add(name)

    async def unload(self, name: str) -> None:
        path = self.unit_path(name)
        try:
            result = await self.stop(name)
        except NoSuchUnitError:
            result = "done"  # not loaded in systemd: nothing runs, nothing to stop
        if result != "done":
            raise UnitManagerError(f"could not stop {name} (job {result}); it stays loaded")
        # NoSuchUnit from either: never linked, or already cleaned up; unload is idempotent.
        with contextlib.suppress(NoSuchUnitError):
            await self._manager_call("DisableUnitFiles", "asb", [[name], True])
        with contextlib.suppress(NoSuchUnitError):
            await self._manager_call("ResetFailedUnit", "s", [name])
        _remove_file(path)
        self._forget(name)

    async def reload(self) -> None:
        await self._manager_call("Reload", "", [], max_wait=self.job_timeout)

    async def start(self, name: str) -> str:
        return await self._run_job("StartUnit", name)

    async def stop(self, name: str) -> str:
        return await self._run_job("StopUnit", name)

    async def states(self, names: Iterable[str]) -> dict[str, SystemdState]:
        wanted = list(names)
        if not wanted:
            return {}
        for name in wanted:
            check_unit_name(name)  # names go to systemd: same safety rules as for files
        rows = await self._manager_call("ListUnitsByNames", "as", [wanted])
        return dict(_parse_unit_rows(rows[0]))

    async def main_pid(self, name: str) -> int:
        check_unit_name(name)
        if not name.endswith(".service"):
            return 0  # only services have a main process
        body = await self._call(
            unit_object_path(name), PROPS_IFACE, "Get", "ss", [SERVICE_IFACE, "MainPID"]
        )
        return int(body[0].value)

    async def unit_files(self) -> dict[str, str]:
        return read_unit_files(self.units_dir)

    async def own_job_type(self, unit: str) -> str | None:
        check_unit_name(unit)
        (jobs,) = await self._manager_call("ListJobs", "", [])
        for _id, job_unit, job_type, _state, _job, _unit_path in jobs:
            if job_unit == unit:
                return str(job_type)
        return None

    def watch(self) -> AsyncIterator[tuple[str, SystemdState]]:
        return self._watch()

    async def close(self) -> None:
        self._closed = True
        conn, self._conn = self._conn, None
        if self._refresh_task is not None:
            self._refresh_task.cancel()
        if conn is not None:
            conn.disconnect()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(_disconnected(conn), 5)
        self._on_lost(None)

    # -- connection ---------------------------------------------------------------------------

    async def _bus(self) -> MessageBus:
        conn = self._conn
        if conn is not None and conn.connected:
            return conn
        async with self._connect_lock:
            if self._closed:
                raise UnitManagerError("the systemd connection is closed")
            if self._conn is None or not self._conn.connected:
                self._conn = await self._connect()
            return self._conn

    async def _connect(self) -> MessageBus:
        bus_type = BusType.SESSION if self.user else BusType.SYSTEM
        conn = MessageBus(bus_address=self._address, bus_type=bus_type)
        try:
            await asyncio.wait_for(conn.connect(), self.call_timeout)
        except Exception as e:
            which = "user" if self.user else "system"
            raise UnitManagerError(f"cannot connect to the {which} D-Bus: {e}") from e
        conn.add_message_handler(self._on_message)
        self._watching = False
        try:
            await self._add_match(conn, _MATCH_JOB_REMOVED)
        except UnitManagerError:
            conn.disconnect()
            raise
        # Watches and job waits of a lost connection end with an error; the next call
        # connects again and starts clean.
        self._loss_task = asyncio.get_running_loop().create_task(self._notice_loss(conn))
        return conn

    async def _notice_loss(self, conn: MessageBus) -> None:
        with contextlib.suppress(Exception):
            await _disconnected(conn)
        if self._conn is conn:
            self._conn = None
            self._on_lost(UnitManagerError("lost the D-Bus connection to systemd"))

    def _on_lost(self, error: UnitManagerError | None) -> None:
        """Fail what waits on the connection: job waiters and watches."""
        err = error or UnitManagerError("the systemd connection is closed")
        for fut in self._job_waiters.values():
            if not fut.done():
                fut.set_exception(err)
        self._job_waiters.clear()
        self._early_results.clear()
        for feed in self._feeds:
            feed.close(error)
        self._feeds.clear()
        self._watching = False
        self._snapshot_serials.clear()

    async def _add_match(self, conn: MessageBus, rule: str) -> None:
        await self._send(conn, _bus_message("AddMatch", "s", [rule]), "AddMatch", rule)

    # -- calls ----------------------------------------------------------------------------------

    async def _manager_call(
        self, member: str, signature: str, body: list[Any], *, max_wait: float | None = None
    ) -> list[Any]:
        return await self._call(MANAGER_PATH, MANAGER_IFACE, member, signature, body, max_wait)

    async def _call(
        self,
        path: str,
        interface: str,
        member: str,
        signature: str,
        body: list[Any],
        max_wait: float | None = None,
        serial_hook: set[int] | None = None,
    ) -> list[Any]:
        conn = await self._bus()
        msg = Message(
            destination=SYSTEMD,
            path=path,
            interface=interface,
            member=member,
            signature=signature,
            body=body,
        )
        if serial_hook is not None:
            # Give the message its serial now so the handler can recognize the reply.
            msg.serial = conn.next_serial()
            serial_hook.add(msg.serial)
        try:
            return await self._send(conn, msg, member, _short_args(body), max_wait)
        finally:
            if serial_hook is not None:
                serial_hook.discard(msg.serial)

    async def _send(
        self, conn: MessageBus, msg: Message, member: str, args: str, max_wait: float | None = None
    ) -> list[Any]:
        limit = max_wait or self.call_timeout
        try:
            async with self._in_flight:
                reply = await asyncio.wait_for(conn.call(msg), limit)
        except TimeoutError:
            raise UnitManagerError(
                f"systemd did not answer {member}({args}) in {limit:g}s"
            ) from None
        except UnitManagerError:
            raise
        except Exception as e:  # whatever the transport raises: disconnects, bad replies
            raise UnitManagerError(f"D-Bus call {member}({args}) failed: {e}") from e
        if reply.message_type is MessageType.ERROR:
            raise _error_from(reply, member, args)
        return list(reply.body)

    async def _remove_quietly(self, name: str, path: Path) -> None:
        """Undo a half-done load: drop the link (and enablement), delete the file."""
        try:
            await self._manager_call("DisableUnitFiles", "asb", [[name], True])
        except UnitManagerError as e:
            log.warning("could not disable %s after failed enable: %s", name, e)
        _remove_file(path)

    # -- jobs -------------------------------------------------------------------------------

    async def _run_job(self, member: str, name: str) -> str:
        """Queue a job with mode "replace" and wait for its JobRemoved; return the result."""
        check_unit_name(name)
        self._queueing[name] = self._queueing.get(name, 0) + 1
        try:
            (job,) = await self._manager_call(member, "ss", [name, "replace"])
            early = self._early_results.pop(job, None)
            if early is not None:
                return early[1]
            # No await between the reply and this line: the JobRemoved cannot slip through.
            waiter = asyncio.get_running_loop().create_future()
            self._job_waiters[job] = waiter
        finally:
            self._done_queueing(name)
        try:
            return await asyncio.wait_for(waiter, self.job_timeout)
        except TimeoutError:
            raise UnitManagerError(
                f"{member} {name}: job {job} did not finish in {self.job_timeout:g}s"
            ) from None
        finally:
            self._job_waiters.pop(job, None)

    def _done_queueing(self, name: str) -> None:
        left = self._queueing[name] - 1
        if left:
            self._queueing[name] = left
            return
        del self._queueing[name]
        # Results of other clients' jobs on this unit, kept just in case: drop them.
        stale = [job for job, (unit, _) in self._early_results.items() if unit == name]
        for job in stale:
            del self._early_results[job]

    def _on_job_removed(self, body: list[Any]) -> None:
        _id, job, unit, result = body
        waiter = self._job_waiters.pop(job, None)
        if waiter is not None:
            if not waiter.done():
                waiter.set_result(result)
        elif unit in self._queueing:
            self._early_results[job] = (unit, result)

    # -- watching -------------------------------------------------------------------------

    async def _watch(self) -> AsyncIterator[tuple[str, SystemdState]]:
        feed = StateFeed()
        await self._start_watching()
        self._feeds.add(feed)
        try:
            self._request_refresh(None)  # the initial snapshot, for every feed
            async for item in feed.stream():
                yield item
        finally:
            self._feeds.discard(feed)

    async def _start_watching(self) -> None:
        conn = await self._bus()
        if self._known is None:
            self._known = unit_file_names(self.units_dir)
        async with self._watch_lock:  # two watches starting at once subscribe once
            if self._watching:
                return
            await asyncio.gather(*(self._add_match(conn, rule) for rule in _MATCH_WATCH))
            await self._manager_call("Subscribe", "", [])
            self._watching = True

    def _forget(self, name: str) -> None:
        if self._known is not None:
            self._known.discard(name)
        for feed in self._feeds:
            feed.forget(name)

    def _request_refresh(self, names: set[str] | None) -> None:
        """Re-read LoadState etc. of `names` (None: all watched units) in the background."""
        if not self._feeds or self._known is None:
            return
        self._refresh_names |= self._known if names is None else names & self._known
        if self._refresh_task is None or self._refresh_task.done():
            self._refresh_task = asyncio.get_running_loop().create_task(self._refresh())

    async def _refresh(self) -> None:
        # One call at a time; names asked for meanwhile go into the next call.
        while self._refresh_names and self._feeds:
            names, self._refresh_names = sorted(self._refresh_names), set()
            self._snapshotting = set(names)
            try:
                # The reply is applied by the message handler (see _on_message), in order.
                await self._call(
                    MANAGER_PATH, MANAGER_IFACE, "ListUnitsByNames", "as", [names],
                    serial_hook=self._snapshot_serials,
                )  # fmt: skip
            except UnitManagerError as e:
                for feed in self._feeds:
                    feed.close(e)
                return
            finally:
                self._snapshotting = set()

    def _on_message(self, msg: Message) -> None:
        """Sees every incoming message first, synchronously and in order (dbus-fast)."""
        kind = msg.message_type
        if kind is MessageType.SIGNAL:
            member = msg.member
            if member == "PropertiesChanged":
                self._on_properties_changed(msg)
            elif msg.path == MANAGER_PATH and msg.interface == MANAGER_IFACE:
                self._on_manager_signal(member, msg.body)
        elif kind is MessageType.METHOD_RETURN and msg.reply_serial in self._snapshot_serials:
            for name, state in _parse_unit_rows(msg.body[0]):
                self._publish(name, state)

    def _on_manager_signal(self, member: str | None, body: list[Any]) -> None:
        if member == "JobRemoved":
            self._on_job_removed(body)
        elif member == "Reloading" and not body[0]:
            self._request_refresh(None)  # LoadState of every unit may have changed
        elif (
            member == "UnitNew"
            and self._known is not None
            and body[0] in self._known
            and body[0] not in self._snapshotting  # loaded by our own snapshot: see __init__
            and not self._seen_loaded(body[0])
        ):
            self._request_refresh({body[0]})

    def _seen_loaded(self, name: str) -> bool:
        """Whether every feed already holds `name` as loaded: then its UnitNew says nothing new
        (ActiveState and SubState come in PropertiesChanged; a changed file is read by the
        daemon-reload that follows every load, and Reloading refreshes all).

        systemd sends UnitNew from its bus queue, often after the reply of the snapshot that
        loaded the unit, where `_snapshotting` no longer covers it. Refreshing on it asked
        again about every unit not started yet; systemd had garbage-collected them meanwhile,
        loaded them again and sent UnitNew again: a snapshot of ~950 units after every 16
        starts, 46,000 names in all to start 1,000 units, and systemd at 90 % of a core.
        """
        for feed in self._feeds:
            state = feed.latest(name)
            if state is None or state.load_state != "loaded":
                return False
        return True

    def _on_properties_changed(self, msg: Message) -> None:
        if not self._feeds or self._known is None:
            return
        name = unit_name_from_path(msg.path or "")
        if name is None or name not in self._known:
            return
        changed = msg.body[1]
        active = changed.get("ActiveState")
        sub = changed.get("SubState")
        if active is None and sub is None:
            return
        for feed in self._feeds:
            last = feed.latest(name)
            if last is None:
                # No LoadState to go with it yet (LoadState is never in these signals):
                # a snapshot of this unit, answered after this signal, has all three.
                self._request_refresh({name})
                continue
            feed.put(
                name,
                SystemdState(
                    last.load_state,
                    active.value if active is not None else last.active_state,
                    sub.value if sub is not None else last.sub_state,
                ),
            )

    def _publish(self, name: str, state: SystemdState) -> None:
        if self._known is not None and name in self._known:
            for feed in self._feeds:
                feed.put(name, state)


# -- helpers ---------------------------------------------------------------------------------


async def _disconnected(conn: MessageBus) -> None:
    # dbus-fast leaves this one method unannotated.
    await conn.wait_for_disconnect()  # type: ignore[no-untyped-call]


def _bus_message(member: str, signature: str, body: list[Any]) -> Message:
    return Message(
        destination="org.freedesktop.DBus",
        path="/org/freedesktop/DBus",
        interface="org.freedesktop.DBus",
        member=member,
        signature=signature,
        body=body,
    )


def _parse_unit_rows(rows: list[Any]) -> Iterable[tuple[str, SystemdState]]:
    """ListUnitsByNames rows -> (name, state); main_pid is not part of them."""
    for row in rows:
        yield row[0], SystemdState(row[2], row[3], row[4])


def _error_from(reply: Message, member: str, args: str) -> UnitManagerError:
    name = reply.error_name or "org.freedesktop.DBus.Error.Failed"
    text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else name
    if name == NO_SUCH_UNIT:
        return NoSuchUnitError(f"systemd {member}({args}): {text}")
    return SystemdCallError(member, args, name, text)


def _short_args(body: list[Any]) -> str:
    text = ", ".join(repr(a) for a in body)
    return text if len(text) <= 200 else text[:197] + "..."


def _write_atomically(path: Path, text: str) -> None:
    """Write `path` (0644) so systemd never reads half a file: temp file, then rename.

    The temporary name starts with "." so `read_unit_files` never mistakes it for a unit. A
    name near UNIT_NAME_MAX (255 bytes, NAME_MAX) has no room for ".<name>.tmp": its
    temporary file is named after a digest of the name instead.
    Every OSError (a full /run, the units directory a broken symlink or read-only) becomes a
    UnitManagerError naming the file: the agent fails that one unit's load, nothing else.
    """
    tmp_name = f".{path.name}.tmp"
    if len(tmp_name.encode("utf-8", "surrogateescape")) > UNIT_NAME_MAX:
        digest = hashlib.sha1(path.name.encode("utf-8", "surrogateescape")).hexdigest()
        tmp_name = f".{digest}.tmp"
    tmp = path.with_name(tmp_name)
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # the umask may have taken bits away
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise UnitManagerError(f"cannot write unit file {path}: {e}") from e


def _remove_file(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as e:
        raise UnitManagerError(f"cannot remove unit file {path}: {e}") from e


if TYPE_CHECKING:
    from fleetd.systemd.manager import UnitManager

    _conforms: UnitManager = DBusUnitManager()
