"""The schema-aware registry: fleet's operations over the KV contract.

Written once against `KV`, so fleetd, fleetctl's etcd driver, the API and the simulator run the
same code on real etcd and on the in-memory fake.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import structlog

from fleetd.errors import (
    Conflict,
    InvalidInput,
    NotFound,
    NotLeader,
    UnitFileError,
)
from fleetd.model import (
    Cordon,
    Machine,
    Placement,
    Requirements,
    ScheduledUnit,
    TargetState,
    Unit,
    UnitState,
)
from fleetd.registry import codec, gc
from fleetd.registry.bodies import BodyCache
from fleetd.registry.codec import CorruptValue
from fleetd.registry.keys import SCHEMA_VERSION, Keys, normalize_prefix
from fleetd.registry.kv import (
    KV,
    MAX_TXN_OPS,
    Compare,
    Delete,
    KeyValue,
    Op,
    Put,
    TxnResult,
    WatchEvent,
)
from fleetd.registry.migrations import SchemaTooNew
from fleetd.registry.mirror import Mirror, Topic
from fleetd.unit.file import UnitFile, parse_unit
from fleetd.unit.names import validate_name
from fleetd.unit.xfleet import requirements as parse_requirements

log = structlog.get_logger("fleetd.registry")

# Fenced engine transactions sent at once (see `Registry.fenced`). One at a time, each waited
# for its own fsync, and moving 1,000 units off 100 dead machines took 0.53-1.46 s after the
# last lease expired (median 0.83 s over 10 runs), so "kill -> all moved launched" missed
# agent_ttl + 1 s in 2 of 3 runs; 4 at once: 0.20-0.73 s (median 0.45 s over 7). 16 at once
# did no better and kept etcd busier.
FENCED_IN_FLIGHT = 4


@dataclass(frozen=True, slots=True)
class LeaderToken:
    """Proof of leadership: the leader key's create revision fences every engine write."""

    machine_id: str
    lease: int
    create_revision: int


class Registry:
    def __init__(self, kv: KV, prefix: str = "/fleet/") -> None:
        self.kv = kv
        self.keys = Keys(normalize_prefix(prefix))
        # The process's one cache of parsed bodies and requirements (bodies.py).
        self.bodies = BodyCache()
        # Corrupt values skipped (see skip_corrupt): key -> error, and the revision logged.
        self.corrupt: dict[str, str] = {}
        self._corrupt_logged: dict[str, int] = {}
        # fleetctl turns the log line off and prints `corrupt` once, as plain warnings.
        self.log_corrupt = True

    def skip_corrupt(self, key: str, revision: int, error: str) -> None:
        """Note a stored value that does not decode and is skipped (read as absent).

        Logged once per key and revision: the engine and the agent read the same keys on
        every pass, and a line per pass would bury everything else. A new revision of the
        key (written again, still corrupt) is logged again.
        """
        self.corrupt[key] = error
        if self._corrupt_logged.get(key) == revision:
            return
        self._corrupt_logged[key] = revision
        if self.log_corrupt:
            log.warning("corrupt_value_skipped", key=key, error=error)

    def unit_of_record(self, key: str) -> str | None:
        """The unit whose desired-state record `key` is (None: not such a record)."""
        units = self.keys.units
        return key[len(units) :] if key.startswith(units) else None

    # ---- schema -------------------------------------------------------------------------

    async def ensure_schema(self) -> int:
        """The keyspace's schema version, written first if the keyspace has none.

        Raises SchemaTooNew for a keyspace of a newer release (or one this release cannot
        read); an older version is returned for the engine leader to migrate (migrations.py).
        """
        key = self.keys.schema
        result = await self.kv.txn(
            [Compare(key, "version", "==", 0)], [Put(key, str(SCHEMA_VERSION))]
        )
        if result.succeeded:
            return SCHEMA_VERSION
        current = await self.kv.get(key)
        found = current.value if current else "?"
        if not found.isdecimal():
            raise SchemaTooNew(
                f"etcd keyspace {self.keys.prefix} has an unreadable schema version {found!r} "
                f"(this release writes {SCHEMA_VERSION}): refusing to act on it"
            )
        if int(found) > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"etcd keyspace {self.keys.prefix} has schema version {found}, newer than "
                f"this release understands ({SCHEMA_VERSION}): upgrade fleet on this machine"
            )
        return int(found)

    # ---- unit bodies ----------------------------------------------------------------------

    async def get_body(self, hash_: str) -> UnitFile | None:
        cached = self.bodies.get(hash_)
        if cached is not None:
            return cached
        kv = await self.kv.get(self.keys.body(hash_))
        if kv is None:
            return None
        unit = parse_unit(kv.value)
        self.bodies.put(hash_, unit)
        return unit

    async def fetch_bodies(self, hashes: set[str]) -> dict[str, UnitFile]:
        """The bodies of `hashes` that exist and parse, through the cache: a listing's read.

        A lone miss is a single get (the common case of a long-lived cache after one new
        unit); more are read with one range of the bodies prefix, of which only those asked
        for are parsed. An unreadable body is skipped and logged (`skip_corrupt`): it hides
        its units, not the whole listing.
        """
        missing = [h for h in hashes if h not in self.bodies]
        if len(missing) == 1:
            (hash_,) = missing
            try:
                await self.get_body(hash_)
            except UnitFileError as e:
                self.skip_corrupt(self.keys.body(hash_), 0, str(e))  # its revision is unknown
        elif missing:
            kvs, _ = await self.body_records()
            self.absorb_bodies(kvs, set(missing))
        return {h: body for h in hashes if (body := self.bodies.get(h)) is not None}

    def absorb_bodies(self, kvs: Iterable[KeyValue], wanted: set[str]) -> None:
        """Parse into the cache the bodies among `kvs` (records of the bodies prefix, see
        `body_records`) whose hash is `wanted`."""
        prefix = self.keys.bodies
        for kv in kvs:
            hash_ = kv.key[len(prefix) :]
            if hash_ not in wanted or hash_ in self.bodies:
                continue
            try:
                self.bodies.put(hash_, parse_unit(kv.value))
            except UnitFileError as e:
                self.skip_corrupt(kv.key, kv.mod_revision, str(e))

    async def prefetch_bodies(self, hashes: Iterable[str]) -> None:
        """Bring the bodies of `hashes` into the cache, as few round trips as the KV allows
        (one per 128 with `get_many`), so the `get_body` calls that follow cost nothing.

        Only an optimisation: a body that is missing or does not parse is left out, and
        `get_body` then reports it exactly as it would have without the prefetch.
        """
        wanted = sorted({h for h in hashes if h not in self.bodies})
        if len(wanted) < 2:
            return
        found = await self.kv.get_many([self.keys.body(h) for h in wanted])
        for hash_ in wanted:
            kv = found.get(self.keys.body(hash_))
            if kv is None:
                continue
            try:
                self.bodies.put(hash_, parse_unit(kv.value))
            except UnitFileError:
                continue

    def cached_requirements(self, name: str, hash_: str) -> Requirements | None:
        return self.bodies.requirements(name, hash_)

    async def requirements(self, name: str, hash_: str) -> Requirements | None:
        """The [X-Fleet] requirements of unit `name` with body `hash_`, parsed once.

        None (and an error log) when the body is missing or its requirements do not parse:
        the engine leaves such a unit unplanned, the agent leaves it alone.
        """
        cached = self.bodies.requirements(name, hash_)
        if cached is not None:
            return cached
        body = await self.get_body(hash_)
        if body is None:
            log.error("unit_body_missing", unit=name, hash=hash_)
            return None
        try:
            reqs = parse_requirements(body, name)
        except UnitFileError as e:
            log.error("unit_requirements_invalid", unit=name, error=str(e))
            return None
        self.bodies.put_requirements(name, hash_, reqs)
        return reqs

    # ---- units (desired state, written by clients) ----------------------------------------

    async def get_unit(self, name: str) -> Unit | None:
        kv = await self.kv.get(self.keys.unit(name))
        return self._decode_unit(kv) if kv else None

    async def list_units(self) -> list[Unit]:
        return (await self.units_at())[0]

    async def units_at(self) -> tuple[list[Unit], int]:
        """Every unit, and the revision they were read at (to watch from)."""
        kvs, revision = await self.kv.range(self.keys.units)
        return [u for u in (self._decode_unit(kv) for kv in kvs) if u is not None], revision

    def _decode_unit(self, kv: KeyValue) -> Unit | None:
        name = self.keys.tail(kv.key, self.keys.units)
        try:
            hash_, state = codec.decode_desired(kv.value)
        except CorruptValue as e:
            self.skip_corrupt(kv.key, kv.mod_revision, str(e))
            return None
        return Unit(name, hash_, state)

    async def create_unit(
        self,
        name: str,
        unit: UnitFile,
        target_state: TargetState = TargetState.INACTIVE,
        *,
        replace: bool = False,
    ) -> bool:
        """Store a unit. Without `replace` it must not exist yet (returns False if it does).

        The body and the unit record go in one transaction, so no reader sees a unit whose
        body is missing. The body is written even when it exists already (a template
        instance, a re-submit): that moves its mod_revision, which is what lets the body
        collector's guarded delete see a concurrent reuse (gc.py, invariant 1.). A name fleet
        would refuse (`validate_name`) raises InvalidUnitName before anything is written: the
        CLI and the API check first, this is the last line.

        A body a replace leaves unnamed is collected by the engine leader's sweep (gc.py).
        """
        if replace:
            await self.create_units([(name, unit, target_state)])
            return True
        validate_name(name)
        unit_key = self.keys.unit(name)
        ops: list[Op] = [
            Put(self.keys.body(unit.hash), unit.serialize()),
            Put(unit_key, codec.encode_desired(unit.hash, target_state)),
        ]
        result = await self.kv.txn([Compare(unit_key, "version", "==", 0)], ops)
        if result.succeeded:
            self.bodies.put(unit.hash, unit)
        return result.succeeded

    async def create_units(self, units: Sequence[tuple[str, UnitFile, TargetState]]) -> None:
        """Store (create or overwrite) several units at once: all of them in one transaction
        when their bodies and records fit in one (64 units with bodies of their own, more
        when they share bodies), so a command's units land together or not at all; beyond
        that, one transaction per chunk. Each chunk puts the body of every record it writes
        (gc.py's invariant 1.), once: etcd refuses a transaction that names a key twice."""
        for name, _, _ in units:
            validate_name(name)
        chunks: list[list[Op]] = [[]]
        in_chunk: set[str] = set()  # bodies the current chunk puts
        for name, unit, state in units:
            record = Put(self.keys.unit(name), codec.encode_desired(unit.hash, state))
            body = Put(self.keys.body(unit.hash), unit.serialize())
            group = [record] if unit.hash in in_chunk else [body, record]
            if len(chunks[-1]) + len(group) > MAX_TXN_OPS:
                chunks.append([])
                in_chunk = set()
                group = [body, record]
            chunks[-1].extend(group)
            in_chunk.add(unit.hash)
        for chunk in chunks:
            if chunk:
                await self.kv.txn([], chunk)
        for _, unit, _ in units:
            self.bodies.put(unit.hash, unit)

    async def set_target_state(self, name: str, state: TargetState) -> None:
        """Change a unit's desired state; compare-and-swap so a concurrent replace is kept."""
        key = self.keys.unit(name)
        for _ in range(10):
            kv = await self.kv.get(key)
            if kv is None:
                raise NotFound(f"unit {name} does not exist")
            hash_, current = codec.decode_desired(kv.value)
            if current == state:
                return
            result = await self.kv.txn(
                [Compare(key, "mod", "==", kv.mod_revision)],
                [Put(key, codec.encode_desired(hash_, state))],
            )
            if result.succeeded:
                return
        raise Conflict(f"unit {name} kept changing while its state was being set")

    async def destroy_unit(self, name: str) -> bool:
        """Delete a unit's record; the engine then unschedules it. False if nothing was there.

        A body no unit names any more is collected by the engine leader's sweep (gc.py). A
        record whose value is corrupt is deleted all the same: that is how a user removes it.
        So, then (or when the record is gone), are the unit's other keys whose values are
        corrupt (placement, published states, schedule and global entries): the engine and
        the agents skip those, so no one else would ever delete them. Keys that decode are
        left to their owners, as before. Each corrupt key is deleted only at the revision
        read, so a value rewritten meanwhile is never lost. A sound record costs one read and
        one transaction, as in fleet: the leftovers are looked for only around a broken one.
        """
        key = self.keys.unit(name)
        for _ in range(10):
            old = await self.kv.get(key)
            corrupt = await self._corrupt_keys_of(name) if _broken(old) else {}
            guards = [Compare(k, "mod", "==", revision) for k, revision in corrupt.items()]
            deletes: list[Op] = [Delete(k) for k in corrupt]
            if old is None:
                if not corrupt:
                    return False  # no record, and nothing corrupt left behind
                # Only corrupt leftovers of a unit that is gone.
                result = await self.kv.txn([Compare(key, "version", "==", 0), *guards], deletes)
                if result.succeeded:
                    self._forget_corrupt(corrupt)
                    return True
                continue
            # Compare-and-swap: whether to look for corrupt leftovers was decided on the
            # value read, so the delete applies only to that value.
            result = await self.kv.txn(
                [Compare(key, "mod", "==", old.mod_revision), *guards], [Delete(key), *deletes]
            )
            if result.succeeded:
                self._forget_corrupt([key, *corrupt])
                return True
        raise Conflict(f"unit {name} kept changing while it was being destroyed")

    def _forget_corrupt(self, keys: Iterable[str]) -> None:
        for key in keys:
            self.corrupt.pop(key, None)
            self._corrupt_logged.pop(key, None)

    async def _corrupt_keys_of(self, name: str) -> dict[str, int]:
        """The keys besides units/<name> that belong to unit `name` and hold values that do
        not decode, with the revision each was read at."""
        keys = self.keys
        placement, global_, (state_kvs, _), (machine_kvs, _) = await asyncio.gather(
            self.kv.get(keys.placement(name)),
            self.kv.get(keys.global_unit(name)),
            self.kv.range(keys.unit_states(name)),
            self.kv.range(keys.machines),
        )
        # The schedule is per machine: look where a machine is registered or publishes.
        machine_ids = {keys.tail(kv.key, keys.machines) for kv in machine_kvs}
        machine_ids |= {keys.tail(kv.key, keys.unit_states(name)) for kv in state_kvs}
        scheduled = (
            await self.kv.get_many([keys.scheduled(m, name) for m in sorted(machine_ids)])
            if machine_ids
            else {}
        )
        found: dict[str, int] = {}

        def check(kv: KeyValue | None, decode: Callable[[str], object]) -> None:
            if kv is None:
                return
            try:
                decode(kv.value)
            except CorruptValue:
                found[kv.key] = kv.mod_revision

        check(placement, codec.decode_placement)
        check(global_, codec.decode_desired)
        for kv in scheduled.values():
            check(kv, codec.decode_desired)
        for kv in state_kvs:
            check(kv, lambda text: codec.decode_state(name, "", text))
        return found

    # ---- body garbage collection (the design and its proof: gc.py) -------------------------

    async def delete_orphaned_bodies(self, bodies: Mapping[str, int]) -> list[str]:
        """Of `bodies` (hash -> mod_revision, read BEFORE this call), delete those no unit
        record names now, each only if its mod_revision is unchanged; the hashes deleted.

        Guarded deletes go MAX_TXN_OPS at a time; a batch that loses its guard (some body was
        reused meanwhile) is retried one body at a time, so one reuse keeps only its body.
        """
        unit_kvs, _ = await self.kv.range(self.keys.units)
        try:
            referenced = gc.referenced_hashes(unit_kvs)
        except gc.UnreadableRecord as e:
            log.warning("body_sweep_skipped", reason=str(e))
            return []
        orphans = sorted(gc.orphaned_bodies(bodies, referenced).items())
        deleted: list[str] = []
        for start in range(0, len(orphans), MAX_TXN_OPS):
            batch = orphans[start : start + MAX_TXN_OPS]
            if len(batch) > 1 and await self._delete_bodies(batch):
                deleted += [h for h, _ in batch]
                continue
            for one in batch:
                if await self._delete_bodies([one]):
                    deleted.append(one[0])
        self.bodies.discard(deleted)  # no unit names them: nobody here needs them again
        return deleted

    async def _delete_bodies(self, bodies: Sequence[tuple[str, int]]) -> bool:
        result = await self.kv.txn(
            [Compare(self.keys.body(h), "mod", "==", mod) for h, mod in bodies],
            [Delete(self.keys.body(h)) for h, _ in bodies],
        )
        return result.succeeded

    # ---- machines ------------------------------------------------------------------------

    async def register_machine(self, machine: Machine, lease: int) -> bool:
        """Announce presence on `lease`. False if another live lease holds this machine id.

        Create-only, unless the key is already ours (same lease): that is a fleetd restart
        that kept its lease, not a duplicate machine.
        """
        key = self.keys.machine(machine.id)
        value = codec.encode_machine(machine)
        result = await self.kv.txn(
            [Compare(key, "version", "==", 0)],
            [Put(key, value, lease)],
        )
        if result.succeeded:
            return True
        existing = await self.kv.get(key)
        if existing is None:
            return await self.register_machine(machine, lease)
        if existing.lease != lease:
            return False
        if existing.value != value:
            await self.kv.txn(
                [Compare(key, "mod", "==", existing.mod_revision)], [Put(key, value, lease)]
            )
        return True

    async def list_machines(self) -> list[Machine]:
        kvs, _ = await self.kv.range(self.keys.machines)
        meta_kvs, _ = await self.kv.range(self.keys.machine_meta)
        return self._decode_machines(kvs, meta_kvs)

    def _decode_machines(
        self, kvs: Iterable[KeyValue], meta_kvs: Iterable[KeyValue]
    ) -> list[Machine]:
        dynamic = self._group_metadata(meta_kvs)
        machines = []
        for kv in kvs:
            try:
                machine = codec.decode_machine(kv.value)
            except CorruptValue as e:
                self.skip_corrupt(kv.key, kv.mod_revision, str(e))
                continue
            machines.append(machine.with_dynamic_metadata(dynamic.get(machine.id, {})))
        return machines

    async def dynamic_metadata(self) -> dict[str, dict[str, str]]:
        """Metadata set through the API (machine-meta/), by machine id, whether or not the
        machine is registered; without the machines' own (config) metadata."""
        meta_kvs, _ = await self.kv.range(self.keys.machine_meta)
        return self._group_metadata(meta_kvs)

    def _group_metadata(self, meta_kvs: Iterable[KeyValue]) -> dict[str, dict[str, str]]:
        """machine-meta/<id>/<key> records as {id: {key: value}}."""
        out: dict[str, dict[str, str]] = {}
        for kv in meta_kvs:
            machine_id, _, key = self.keys.tail(kv.key, self.keys.machine_meta).partition("/")
            out.setdefault(machine_id, {})[key] = kv.value
        return out

    async def set_machine_metadata(self, machine_id: str, key: str, value: str | None) -> None:
        meta_key = self.keys.machine_meta_key(machine_id, key)
        op: Op = Delete(meta_key) if value is None else Put(meta_key, value)
        await self.kv.txn([], [op])

    # ---- cordons (maintenance) ----------------------------------------------------------------

    async def cordon(self, cordon: Cordon) -> None:
        """Cordon (or, with `cordon.drain`, see `drain`) a machine; a second call replaces the
        first. A plain cordon over a drain gives its maintenance slot back, in the same
        transaction."""
        put = Put(self.keys.cordon(cordon.machine_id), codec.encode_cordon(cordon))
        await self._with_slots_freed(cordon.machine_id, [put])

    async def uncordon(self, machine_id: str) -> bool:
        """Make a machine schedulable again (ends a drain too, and frees its maintenance
        slot in the same transaction); False if it was not cordoned."""
        key = self.keys.cordon(machine_id)
        was = await self.kv.get(key)
        await self._with_slots_freed(machine_id, [Delete(key)])
        return was is not None

    async def _with_slots_freed(self, machine_id: str, ops: list[Op]) -> None:
        """`ops`, and the deletion of the slots `machine_id` holds, in one transaction (each
        slot guarded on still naming it; retried if another drain took one meanwhile)."""
        for _ in range(3):
            slots, _ = await self.kv.range(self.keys.maintenance)
            mine = [kv.key for kv in slots if kv.value == machine_id]
            guards = [Compare(key, "value", "==", machine_id) for key in mine]
            result = await self.kv.txn(guards, [*ops, *(Delete(key) for key in mine)])
            if result.succeeded:
                return
        await self.kv.txn([], ops)  # the slots kept changing: at least do what was asked

    async def maintenance_limit(self) -> int:
        """How many machines may drain at once (settings/maintenance-limit; 1 when unset)."""
        kv = await self.kv.get(self.keys.maintenance_limit)
        if kv is None:
            return 1
        if not kv.value.isdecimal() or int(kv.value) < 1:
            raise InvalidInput(
                f"{kv.key} is {kv.value!r}: it must be a whole number of machines, 1 or more"
            )
        return int(kv.value)

    async def drain(self, cordon: Cordon) -> str | None:
        """Start (or go on with) a drain, if a maintenance slot is free; None once it is
        recorded, else why not (naming the machines that hold the slots).

        The slot and the cordon are written in one transaction that requires the slot to be
        free, so two drains started at once cannot both take the last one.
        """
        machine_id = cordon.machine_id
        limit = await self.maintenance_limit()
        slots, _ = await self.kv.range(self.keys.maintenance)
        held = {kv.key: kv.value for kv in slots}
        put_cordon = Put(self.keys.cordon(machine_id), codec.encode_cordon(cordon))
        if machine_id in held.values():  # draining already: this is its slot
            await self.kv.txn([], [put_cordon])
            return None
        for slot in range(limit):
            key = self.keys.maintenance_slot(slot)
            if key in held:
                continue
            result = await self.kv.txn(
                [Compare(key, "version", "==", 0)], [Put(key, machine_id), put_cordon]
            )
            if result.succeeded:
                return None
        prefix = self.keys.maintenance
        others = sorted(
            v
            for k, v in held.items()
            if k[len(prefix) :].isdecimal() and int(k[len(prefix) :]) < limit
        )
        return (
            f"{len(others) or limit} machine(s) already in maintenance, the limit is {limit} "
            f"({', '.join(others) or 'slots taken meanwhile'}): uncordon one when it is done, "
            f"or raise {self.keys.maintenance_limit}"
        )

    async def cordons(self) -> dict[str, Cordon]:
        """Cordoned machines by id (registered or not: a cordon outlives a reboot)."""
        mirror = self.mirror([Topic.CORDONS])  # its decoder, as the engine's reads them
        await mirror.load()
        return mirror.cordons

    # ---- published unit states -------------------------------------------------------------

    async def publish_state(self, state: UnitState, lease: int) -> None:
        key = self.keys.state(state.name, state.machine_id)
        await self.kv.txn([], [Put(key, codec.encode_state(state), lease)])

    async def publish_states(self, states: Sequence[UnitState], lease: int) -> None:
        """Publish many states with as few transactions as etcd allows."""
        ops: list[Op] = [
            Put(self.keys.state(s.name, s.machine_id), codec.encode_state(s), lease) for s in states
        ]
        for start in range(0, len(ops), MAX_TXN_OPS):
            await self.kv.txn([], ops[start : start + MAX_TXN_OPS])

    async def states_of(self, pairs: Iterable[tuple[str, str]]) -> dict[tuple[str, str], UnitState]:
        """The published states of these (unit, machine) pairs that exist, in few round trips."""
        wanted = sorted(set(pairs))
        keys = [self.keys.state(unit, machine_id) for unit, machine_id in wanted]
        found = await self.kv.get_many(keys) if keys else {}
        out = {}
        for (unit, machine_id), key in zip(wanted, keys, strict=True):
            kv = found.get(key)
            if kv is None:
                continue
            try:
                out[(unit, machine_id)] = codec.decode_state(unit, machine_id, kv.value)
            except CorruptValue as e:
                self.skip_corrupt(kv.key, kv.mod_revision, str(e))
        return out

    async def remove_state(self, unit: str, machine_id: str) -> None:
        await self.kv.txn([], [Delete(self.keys.state(unit, machine_id))])

    async def list_states(
        self, unit: str | None = None, machine_id: str | None = None
    ) -> list[UnitState]:
        prefix = self.keys.unit_states(unit) if unit else self.keys.states
        kvs, _ = await self.kv.range(prefix)
        states = self._decode_states(kvs)
        if machine_id is not None:
            states = [s for s in states if s.machine_id == machine_id]
        return states

    def _decode_states(self, kvs: Iterable[KeyValue]) -> list[UnitState]:
        states = []
        for kv in kvs:
            unit, _, machine_id = self.keys.tail(kv.key, self.keys.states).rpartition("/")
            try:
                states.append(codec.decode_state(unit, machine_id, kv.value))
            except CorruptValue as e:
                self.skip_corrupt(kv.key, kv.mod_revision, str(e))
        return states

    # ---- schedule (engine-owned) -----------------------------------------------------------

    async def placements(self) -> dict[str, Placement]:
        kvs, _ = await self.kv.range(self.keys.placements)
        return self._decode_placements(kvs)

    async def placement(self, name: str) -> Placement | None:
        kv = await self.kv.get(self.keys.placement(name))
        if kv is None:
            return None
        try:
            machine, reason = codec.decode_placement(kv.value)
        except CorruptValue as e:
            self.skip_corrupt(kv.key, kv.mod_revision, str(e))  # as placements() does
            return None
        return Placement(name, machine, reason)

    def _decode_placements(self, kvs: Iterable[KeyValue]) -> dict[str, Placement]:
        out = {}
        for kv in kvs:
            name = self.keys.tail(kv.key, self.keys.placements)
            try:
                machine, reason = codec.decode_placement(kv.value)
            except CorruptValue as e:
                self.skip_corrupt(kv.key, kv.mod_revision, str(e))
                continue
            out[name] = Placement(name, machine, reason)
        return out

    async def machine_schedule(self, machine_id: str) -> tuple[list[ScheduledUnit], int]:
        """One machine's schedule and the revision it was read at (to watch from)."""
        prefix = self.keys.machine_schedule(machine_id)
        kvs, revision = await self.kv.range(prefix)
        return self._decode_schedule(kvs, machine_id, prefix), revision

    async def global_units(self) -> tuple[list[ScheduledUnit], int]:
        """Global units (machine_id ""), and the revision read at."""
        kvs, revision = await self.kv.range(self.keys.globals)
        return self._decode_schedule(kvs, "", self.keys.globals), revision

    def _decode_schedule(
        self, kvs: Iterable[KeyValue], machine_id: str, prefix: str
    ) -> list[ScheduledUnit]:
        out = []
        for kv in kvs:
            try:
                hash_, state = codec.decode_desired(kv.value)
            except CorruptValue as e:
                self.skip_corrupt(kv.key, kv.mod_revision, str(e))
                continue
            out.append(ScheduledUnit(self.keys.tail(kv.key, prefix), machine_id, hash_, state))
        return out

    async def full_schedule(self) -> list[ScheduledUnit]:
        kvs, _ = await self.kv.range(self.keys.schedule)
        out = []
        for kv in kvs:
            machine_id, _, name = self.keys.tail(kv.key, self.keys.schedule).partition("/")
            try:
                hash_, state = codec.decode_desired(kv.value)
            except CorruptValue as e:
                self.skip_corrupt(kv.key, kv.mod_revision, str(e))
                continue
            out.append(ScheduledUnit(name, machine_id, hash_, state))
        return out

    # ---- engine leadership and fenced writes ----------------------------------------------

    async def campaign(self, machine_id: str, lease: int) -> LeaderToken | None:
        """Try to become the engine leader on `lease`. None if someone else leads."""
        key = self.keys.leader
        result = await self.kv.txn(
            [Compare(key, "version", "==", 0)], [Put(key, machine_id, lease)]
        )
        current = await self.kv.get(key)
        if current is None:
            return None
        if result.succeeded or (current.value == machine_id and current.lease == lease):
            return LeaderToken(machine_id, lease, current.create_revision)
        return None

    async def leader(self) -> str | None:
        kv = await self.leader_record()
        return kv.value if kv else None

    async def leader_record(self) -> KeyValue | None:
        """The engine leader key as stored (its value is the leader's machine id)."""
        return await self.kv.get(self.keys.leader)

    # ---- leases, and etcd's own state -------------------------------------------------------

    async def grant_lease(self, ttl: int) -> int:
        return await self.kv.grant(ttl)

    async def keepalive(self, lease: int) -> int:
        """Renew `lease`: its remaining TTL, 0 if etcd no longer has it."""
        return await self.kv.keepalive(lease)

    async def revoke_lease(self, lease: int) -> None:
        await self.kv.revoke(lease)

    @property
    def raft_term(self) -> int:
        """etcd's raft term as last seen (kv.KV.raft_term)."""
        return self.kv.raft_term

    async def mute_members(self) -> list[str]:
        """etcd members that accept a connection but answer nothing (kv.KV.mute_members)."""
        return await self.kv.mute_members()

    async def current_revision(self) -> int:
        return await self.kv.current_revision()

    async def read_prefixes(self, prefixes: Sequence[str]) -> list[tuple[list[KeyValue], int]]:
        """Each prefix's records and revision, read at once (a mirror's reload)."""
        return list(await asyncio.gather(*(self.kv.range(p) for p in prefixes)))

    async def body_records(self) -> tuple[list[KeyValue], int]:
        """Every stored unit body, unparsed (a listing parses the ones it needs)."""
        return await self.kv.range(self.keys.bodies)

    async def machine_dynamic_metadata(self, machine_id: str) -> dict[str, str]:
        """The metadata set on `machine_id` through the API (machine-meta/), by key."""
        prefix = self.keys.machine_meta_of(machine_id)
        kvs, _ = await self.kv.range(prefix)
        return {self.keys.tail(kv.key, prefix): kv.value for kv in kvs}

    async def resign(self, token: LeaderToken) -> None:
        key = self.keys.leader
        await self.kv.txn([Compare(key, "create", "==", token.create_revision)], [Delete(key)])

    async def fenced(
        self, token: LeaderToken, ops: Sequence[Op], *, in_flight: int = FENCED_IN_FLIGHT
    ) -> None:
        """Apply engine writes only while `token` still leads; raise NotLeader otherwise.

        Chunked to etcd's per-transaction limit; each chunk is fenced on its own, so a
        deposed leader lands nothing once its leader key is gone (chunks in flight then may
        or may not have landed; a new leader reads what did). Up to `in_flight` chunks are
        sent at once, in no order: under load one chunk waited about 100 ms for etcd, and
        10,000 placements are 160 chunks. A caller that needs some writes to land before
        others makes two calls.
        """
        guard = Compare(self.keys.leader, "create", "==", token.create_revision)
        chunks = [ops[i : i + MAX_TXN_OPS] for i in range(0, len(ops), MAX_TXN_OPS)]
        if len(chunks) <= 1 or in_flight <= 1:
            results = [await self.kv.txn([guard], chunk) for chunk in chunks]
        else:
            slots = asyncio.Semaphore(in_flight)

            async def one(chunk: Sequence[Op]) -> TxnResult:
                async with slots:
                    return await self.kv.txn([guard], chunk)

            done = await asyncio.gather(*(one(c) for c in chunks), return_exceptions=True)
            errors = [r for r in done if isinstance(r, BaseException)]
            if errors:
                raise errors[0]
            results = [r for r in done if isinstance(r, TxnResult)]
        if not all(r.succeeded for r in results):
            raise NotLeader(f"engine leadership of {token.machine_id} was lost")

    # engine write helpers: build ops, apply them with `fenced`
    def op_schedule(self, unit: Unit, machine_id: str, reason: str = "") -> list[Op]:
        value = codec.encode_desired(unit.hash, unit.target_state)
        return [
            Put(self.keys.scheduled(machine_id, unit.name), value),
            Put(self.keys.placement(unit.name), codec.encode_placement(machine_id, reason)),
        ]

    def op_placed(self, name: str, machine_id: str, reason: str) -> list[Op]:
        return [Put(self.keys.placement(name), codec.encode_placement(machine_id, reason))]

    def op_unschedule(self, name: str, machine_id: str) -> list[Op]:
        return [Delete(self.keys.scheduled(machine_id, name))]

    def op_unplaced(self, name: str, reason: str) -> list[Op]:
        return [Put(self.keys.placement(name), codec.encode_placement(None, reason))]

    def op_forget_placement(self, name: str) -> list[Op]:
        return [Delete(self.keys.placement(name))]

    def op_global(self, unit: Unit) -> list[Op]:
        return [
            Put(
                self.keys.global_unit(unit.name), codec.encode_desired(unit.hash, unit.target_state)
            )
        ]

    def op_unglobal(self, name: str) -> list[Op]:
        return [Delete(self.keys.global_unit(name))]

    # ---- watches ---------------------------------------------------------------------------

    def watch(self, prefix: str, start_revision: int) -> AsyncGenerator[list[WatchEvent], None]:
        """A watch of `prefix`; outside the registry, follow it through a `Mirror` instead."""
        return self.kv.watch(prefix, start_revision)

    def watch_leader(self, start_revision: int) -> AsyncGenerator[list[WatchEvent], None]:
        """The engine leader key's events (a follower waits for it to go)."""
        return self.kv.watch(self.keys.leader, start_revision)

    def mirror(
        self,
        topics: Iterable[Topic],
        *,
        machine_id: str | None = None,
        check_names: bool = False,
        one_watch: bool = False,
    ) -> Mirror:
        """A copy of `topics` of this registry kept current by a watch (mirror.py)."""
        return Mirror(
            self, topics, machine_id=machine_id, check_names=check_names, one_watch=one_watch
        )


def _broken(record: KeyValue | None) -> bool:
    """A unit record that is missing or does not decode: its unit may have left corrupt keys
    that nothing else deletes."""
    if record is None:
        return True
    try:
        codec.decode_desired(record.value)
    except CorruptValue:
        return True
    return False
