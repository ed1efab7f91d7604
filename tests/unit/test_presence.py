"""Presence: registration, adoption of the lease after a restart, and idle traffic."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fleetd.model import Machine
from fleetd.presence import Presence
from fleetd.registry.fake import FakeKV
from fleetd.registry.registry import Registry


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_idle_renewals_cost_one_keepalive_each() -> None:
    kv = FakeKV()
    presence = Presence(Registry(kv), lambda: Machine.make("m1"), ttl=30)
    await presence._register()
    before = dict(kv.stats)
    for _ in range(10):
        await presence._renew()
    spent = {k: v - before.get(k, 0) for k, v in kv.stats.items() if v != before.get(k, 0)}
    assert spent == {"keepalive": 10}


async def test_changed_machine_is_re_put_on_renew() -> None:
    kv = FakeKV()
    meta = {"region": "east"}
    presence = Presence(Registry(kv), lambda: Machine.make("m1", metadata=meta), ttl=30)
    await presence._register()
    meta["region"] = "west"
    await presence._renew()
    (m,) = await Registry(kv).list_machines()
    assert m.metadata_dict == {"region": "west"}


async def test_restarted_fleetd_adopts_its_live_lease(tmp_path: Path) -> None:
    kv = FakeKV()
    machine = Machine.make("m1")
    first = Presence(Registry(kv), lambda: machine, ttl=30, lease_file=tmp_path / "lease")
    await first._register()
    second = Presence(Registry(kv), lambda: machine, ttl=30, lease_file=tmp_path / "lease")
    await second._register()
    assert second.lease == first.lease
    assert kv.lease_count == 1


async def test_second_machine_with_same_id_is_refused(tmp_path: Path) -> None:
    kv = FakeKV()
    first = Presence(Registry(kv), lambda: Machine.make("m1"), ttl=30, lease_file=tmp_path / "a")
    await first._register()
    dup = Presence(
        Registry(kv), lambda: Machine.make("m1", "10.0.0.9"), ttl=30, lease_file=tmp_path / "b"
    )
    stop = asyncio.Event()
    task = asyncio.ensure_future(dup.run(stop))
    await asyncio.sleep(0.05)
    assert dup.refused_duplicate
    assert not dup.registered.is_set()
    assert kv.lease_count == 1  # the refused machine's lease was revoked, not leaked
    stop.set()
    await task


async def test_expired_lease_is_replaced_and_listeners_told() -> None:
    clock = Clock()
    kv = FakeKV(clock)
    presence = Presence(Registry(kv), lambda: Machine.make("m1"), ttl=5, clock=clock)
    seen: list[int] = []
    presence.on_lease_changed(seen.append)
    await presence._register()
    old = presence.lease
    clock.now += 10  # a partition longer than the TTL
    kv.expire_leases()
    await presence._renew()
    assert presence.lease != old
    assert seen == [old, presence.lease]
    assert [m.id for m in await Registry(kv).list_machines()] == ["m1"]


async def test_an_election_keeps_etcd_unsettled_while_a_member_is_mute() -> None:
    # Right after registering (no renewal yet): the election still counts.
    kv = FakeKV()
    presence = Presence(Registry(kv), lambda: Machine.make("m1"), ttl=3)
    await presence._register()
    assert presence.settled_since() is not None
    kv.mute = {"etcd-3:2379"}
    kv.elect()
    await presence._renew()
    await asyncio.sleep(0)  # the mute watch asks
    assert presence.settled_since() is None
    before = presence.clock()
    kv.mute.clear()
    deadline = presence.clock() + 5
    while presence.settled_since() is None:
        assert presence.clock() < deadline, "still unsettled after the member answered"
        await asyncio.sleep(0.05)
    settled = presence.settled_since()
    assert settled is not None
    assert settled >= before  # the grace counts from the member's answer, not the election


async def test_an_election_with_every_member_answering_settles_at_once() -> None:
    kv = FakeKV()
    presence = Presence(Registry(kv), lambda: Machine.make("m1"), ttl=3)
    await presence._register()
    await presence._renew()
    kv.elect()
    await presence._renew()
    for _ in range(5):
        await asyncio.sleep(0)
    assert presence.settled_since() is not None


async def test_a_member_mute_at_registration_keeps_etcd_unsettled() -> None:
    # A fleetd that starts while etcd's former leader is frozen saw no election, yet its
    # engine may lead when that member resumes and revokes.
    kv = FakeKV()
    kv.mute = {"etcd-1:2379"}
    presence = Presence(Registry(kv), lambda: Machine.make("m1"), ttl=3)
    await presence._register()
    for _ in range(3):
        await asyncio.sleep(0)
    assert presence.settled_since() is None
    kv.mute.clear()
    deadline = presence.clock() + 5
    while presence.settled_since() is None:
        assert presence.clock() < deadline, "still unsettled after the member answered"
        await asyncio.sleep(0.05)


async def test_registering_again_does_not_probe_the_members() -> None:
    # After a stall every machine registers again at once; each one probing every member then
    # would storm etcd as it recovers. A running fleetd follows the term instead.
    kv = FakeKV()
    presence = Presence(Registry(kv), lambda: Machine.make("m1"), ttl=3)
    await presence._register()
    await asyncio.sleep(0)  # the first registration's look
    asked: list[bool] = []
    real = kv.mute_members

    async def counted() -> list[str]:
        asked.append(True)
        return await real()

    kv.mute_members = counted  # type: ignore[method-assign]
    await kv.revoke(presence.lease)  # etcd expired it: presence registers again
    presence._lost_lease()
    await presence._register()
    for _ in range(3):
        await asyncio.sleep(0)
    assert asked == []
