"""fleetctl cordon, uncordon and drain against the in-memory cluster (both drivers' logic).

Bad input changes nothing: an unknown or ambiguous machine prefix, a bad --deadline. A second
drain beyond the maintenance limit is refused, naming the machine that holds the slot.
"""

from __future__ import annotations

import pytest
from test_fleetctl_harness import Cluster, run

from fleetctl.client import RegistryClient
from fleetctl.maintenance import drain_status
from fleetd.errors import Conflict
from fleetd.model import Cordon, Machine, Placement
from fleetd.registry.fake import FakeKV
from fleetd.registry.kv import Put
from fleetd.registry.registry import Registry
from fleetd.views import StateView, UnitView

M1 = "1" * 32
M2 = "2" * 32


async def cluster() -> tuple[FakeKV, Registry, RegistryClient]:
    kv = FakeKV()
    registry = Registry(kv)
    lease = await kv.grant(60)
    for machine_id in (M1, M2):
        assert await registry.register_machine(Machine.make(machine_id), lease)
    return kv, registry, RegistryClient(registry)


async def test_a_second_drain_beyond_the_limit_is_refused_by_name() -> None:
    kv, registry, client = await cluster()
    await client.cordon(Cordon(M1, drain=True))
    await client.cordon(Cordon(M1, drain=True))  # again: it holds the slot already
    with pytest.raises(Conflict, match=f"already in maintenance, the limit is 1 \\({M1}\\)"):
        await client.cordon(Cordon(M2, drain=True))
    assert set(await registry.cordons()) == {M1}  # the refused drain wrote nothing
    assert await client.uncordon(M1)  # frees the slot
    await client.cordon(Cordon(M2, drain=True))
    await kv.txn([], [Put(registry.keys.maintenance_limit, "2")])
    await client.cordon(Cordon(M1, drain=True))
    assert set(await registry.cordons()) == {M1, M2}


async def test_a_corrupt_limit_is_named() -> None:
    kv, registry, client = await cluster()
    await kv.txn([], [Put(registry.keys.maintenance_limit, "lots")])
    with pytest.raises(Exception, match="maintenance-limit is 'lots'"):
        await client.cordon(Cordon(M1, drain=True))
    assert await registry.cordons() == {}


async def test_cordon_needs_a_registered_machine() -> None:
    _, registry, client = await cluster()
    with pytest.raises(Exception, match="is not registered"):
        await client.cordon(Cordon("9" * 32))
    assert await registry.cordons() == {}


def _unit(name: str, machine: str | None, is_global: bool = False) -> UnitView:
    return UnitView(name, (), "launched", "launched", machine, is_global, "h" * 40)


def _state(name: str, machine: str) -> StateView:
    return StateView(name, machine, "h" * 40, "loaded", "active", "running")


def test_drain_status_names_what_is_left_and_why() -> None:
    units = [_unit("a.service", M2), _unit("b.service", M1), _unit("g.service", None, True)]
    states = [_state("a.service", M1), _state("b.service", M1), _state("g.service", M1)]
    placements = {
        "a.service": Placement("a.service", M2),
        "b.service": Placement("b.service", M1, "MachineID=111: machine 111 is cordoned"),
    }
    status = drain_status(M1, units, states, placements)
    assert status.left == {
        "a.service": f"starting on {M2[:8]}; stops here once active there",
        "b.service": "MachineID=111: machine 111 is cordoned",
    }  # the global unit is not waited for
    assert drain_status(M1, units, [], {}).done


@pytest.fixture
def harness(monkeypatch: pytest.MonkeyPatch) -> Cluster:
    cluster = Cluster().install(monkeypatch)
    cluster.add_machine(M1, "10.0.0.1")
    cluster.add_machine(M2, "10.0.0.2")
    return cluster


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["cordon", "9"], 1, 'no machine matches ID prefix "9"'),
        (["drain", ""], 1, "empty machine ID"),
        (["drain", M1, "--deadline", "soon"], 2, "--deadline"),
        (["drain", M1, "--deadline", "-5s"], 2, "--deadline"),
        (["uncordon", M1], 1, f"machine {M1} is not cordoned"),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(
    harness: Cluster, args: list[str], code: int, message: str
) -> None:
    before = harness.kv.dump("")
    result = harness.invoke(*args)
    assert result.exit_code == code, result.output
    assert message in result.output
    assert harness.kv.dump("") == before


def test_an_ambiguous_prefix_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    cluster = Cluster().install(monkeypatch)
    cluster.add_machine("ab" + "1" * 30)
    cluster.add_machine("ab" + "2" * 30)
    result = cluster.invoke("cordon", "ab")
    assert result.exit_code == 1
    assert 'machine ID prefix "ab" is ambiguous: it matches 2 machines' in result.output


def test_cordon_shows_in_list_machines_and_uncordon_undoes_it(harness: Cluster) -> None:
    assert harness.invoke("cordon", M1[:6], "--reason", "disk swap").exit_code == 0
    listed = harness.invoke("list-machines", "--fields", "machine,schedulable,cordon", "--full")
    assert f"{M1}\tcordoned\tdisk swap" in listed.output
    assert f"{M2}\ttrue\t" in listed.output
    default = harness.invoke("list-machines", "--full")
    assert default.output.splitlines()[0].split() == ["MACHINE", "IP", "METADATA"]
    assert harness.invoke("uncordon", M1[:6]).exit_code == 0
    assert run(harness.registry.cordons()) == {}


def test_drain_no_wait_records_the_drain(harness: Cluster) -> None:
    result = harness.invoke("drain", M2[:4], "--no-wait")
    assert result.exit_code == 0, result.output
    assert run(harness.registry.cordons())[M2].drain


async def test_a_plain_cordon_over_a_drain_gives_the_slot_back() -> None:
    _, registry, client = await cluster()
    await client.cordon(Cordon(M1, drain=True))
    await client.cordon(Cordon(M1))  # cordoned, no longer draining
    await client.cordon(Cordon(M2, drain=True))  # the slot is free again
    slots, _ = await registry.kv.range(registry.keys.maintenance)
    assert [kv.value for kv in slots] == [M2]
