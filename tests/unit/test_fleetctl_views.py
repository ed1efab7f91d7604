"""fleetd.views: currentState and the API v1 shapes, and how few requests the loads make."""

from __future__ import annotations

import pytest
from test_fleetctl_harness import GLOBAL, HELLO, M1, M2

from fleetd.errors import InvalidInput
from fleetd.model import Machine, Placement, TargetState, Unit, UnitState
from fleetd.registry import codec
from fleetd.registry.fake import FakeKV
from fleetd.registry.kv import Put
from fleetd.registry.registry import Registry
from fleetd.unit.file import UnitFile, parse_unit
from fleetd.unit.xfleet import requirements
from fleetd.views import (
    MachineView,
    StateView,
    UnitView,
    build_unit_views,
    load_machine_views,
    load_state_views,
    load_unit_view,
    load_unit_views,
    machine_from_api,
    machine_to_api,
    state_from_api,
    state_to_api,
    unit_from_api,
    unit_to_api,
)

BODY = parse_unit(HELLO)
GLOBAL_BODY = parse_unit(GLOBAL)


def state(name: str, machine: str, agent: TargetState) -> UnitState:
    return UnitState(name, machine, "loaded", "active", "running", BODY.hash, agent)


@pytest.mark.parametrize(
    ("placement", "states", "expected"),
    [
        (None, [], ("inactive", None, "")),  # not placed
        (Placement("u.service", None, "no room"), [], ("inactive", None, "no room")),
        (Placement("u.service", M1), [], ("inactive", M1, "")),  # placed, agent not reported
        (
            Placement("u.service", M1),
            [state("u.service", M1, TargetState.LOADED)],
            ("loaded", M1, ""),
        ),
        (
            Placement("u.service", M1),
            [state("u.service", M1, TargetState.LAUNCHED)],
            ("launched", M1, ""),
        ),
        # only the placed machine's state counts (e.g. the old machine after a move)
        (
            Placement("u.service", M1),
            [state("u.service", M2, TargetState.LAUNCHED)],
            ("inactive", M1, ""),
        ),
    ],
)
def test_current_state(
    placement: Placement | None, states: list[UnitState], expected: tuple[str, str | None, str]
) -> None:
    unit = Unit("u.service", BODY.hash, TargetState.LAUNCHED)
    placements = {"u.service": placement} if placement else {}
    (view,) = build_unit_views([unit], {BODY.hash: BODY}, placements, states)
    assert (view.current_state, view.machine_id, view.reason) == expected
    assert (view.desired_state, view.is_global, view.hash) == ("launched", False, BODY.hash)


def test_global_units_have_no_current_state_or_machine() -> None:
    unit = Unit("g.service", GLOBAL_BODY.hash, TargetState.LAUNCHED)
    placement = {"g.service": Placement("g.service", None, "ignored")}
    states = [state("g.service", M1, TargetState.LAUNCHED)]
    (view,) = build_unit_views([unit], {GLOBAL_BODY.hash: GLOBAL_BODY}, placement, states)
    assert (view.is_global, view.current_state, view.machine_id, view.reason) == (
        True,
        None,
        None,
        "",
    )


def test_units_sorted_and_missing_bodies_skipped() -> None:
    units = [Unit("b.service", BODY.hash), Unit("a.service", BODY.hash), Unit("c.service", "x")]
    views = build_unit_views(units, {BODY.hash: BODY}, {}, [])
    assert [v.name for v in views] == ["a.service", "b.service"]


# ---- API v1 JSON -----------------------------------------------------------------------------


def test_unit_api_shape_omits_empty_and_sorts_keys() -> None:
    view = UnitView(
        name="hello.service",
        options=UnitFile.from_options(
            [
                {"section": "Unit", "name": "Description", "value": "Hello World"},
                {"section": "Service", "name": "Empty", "value": ""},
            ]
        ).options,
        desired_state="launched",
        current_state=None,
        machine_id=None,
        is_global=False,
        hash="",
    )
    api = unit_to_api(view)
    assert list(api) == ["desiredState", "name", "options"]
    assert api["options"] == [
        {"name": "Description", "section": "Unit", "value": "Hello World"},
        {"name": "Empty", "section": "Service"},  # fleet omits an empty value
    ]
    back = unit_from_api(api)
    assert back.options == view.options
    assert back.hash == UnitFile(view.options).hash
    assert (back.current_state, back.machine_id, back.reason) == (None, None, "")


def test_unit_from_api_derives_globality_and_reads_reason() -> None:
    obj = {
        "name": "g.service",
        "desiredState": "launched",
        "currentState": "inactive",
        "options": [{"section": "X-Fleet", "name": "Global", "value": "true"}],
        "reason": "whatever",
    }
    view = unit_from_api(obj)
    assert view.is_global
    assert view.reason == "whatever"
    assert unit_to_api(view)["reason"] == "whatever"


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("plain.service", [("Unit", "Description", "d"), ("Service", "ExecStart", "/bin/true")]),
        ("x.service", [("X-Fleet", "MachineMetadata", "a=b"), ("X-Fleet", "Conflicts", "y*")]),
        ("g.service", [("X-Fleet", "Global", "yes")]),
        ("g.service", [("X-Fleet", "Global", "true"), ("X-Fleet", "Global", "false")]),
        # the specifier expands to the instance: global only through the full parse
        ("g@on.service", [("X-Fleet", "Global", "%i")]),
        ("g.service", [("x-fleet", "Global", "true")]),  # section names are case-sensitive
        ("u.service", [("Unit", "Description", "caf\u00e9 \u2603"), ("Service", "Empty", "")]),
    ],
)
def test_unit_from_api_matches_the_full_parse(
    name: str, options: list[tuple[str, str, str]]
) -> None:
    """The listing fast path (direct options, no requirements parse without Global=) gives
    exactly what UnitFile.from_options and requirements() give."""
    entries = [{"section": s, "name": n, "value": v} for s, n, v in options]
    api = [{k: v for k, v in e.items() if v} for e in entries]  # as fleet omits empty values
    view = unit_from_api({"name": name, "desiredState": "inactive", "options": api})
    body = UnitFile.from_options(entries)
    assert view.options == body.options
    assert view.hash == body.hash
    assert view.is_global == requirements(body, name).is_global


@pytest.mark.parametrize(
    "options",
    [[{"section": "Unit", "name": "A", "value": None}], [{"section": "U", "name": "\udc80"}]],
)
def test_unit_from_api_refuses_bad_options(options: list[object]) -> None:
    with pytest.raises(InvalidInput):
        unit_from_api({"name": "x.service", "options": options})


@pytest.mark.parametrize(
    "bad",
    [[], {"name": 3}, {"name": "x", "options": "no"}, {"name": "x", "options": [1]}],
)
def test_unit_from_api_rejects_garbage(bad: object) -> None:
    with pytest.raises(InvalidInput):
        unit_from_api(bad)


def test_state_and_machine_api_shapes() -> None:
    state_view = StateView("a.service", M1, "abc", "loaded", "active", "running")
    assert state_to_api(state_view) == {
        "hash": "abc",
        "machineID": M1,
        "name": "a.service",
        "systemdActiveState": "active",
        "systemdLoadState": "loaded",
        "systemdSubState": "running",
    }
    assert state_from_api(state_to_api(state_view)) == state_view
    failed = StateView(
        "a.service", M1, "abc", "", "", "", failed_task="load", error="No space left on device"
    )
    assert state_to_api(failed) == {
        "error": "No space left on device",
        "failedTask": "load",
        "hash": "abc",
        "machineID": M1,
        "name": "a.service",
    }
    assert state_from_api(state_to_api(failed)) == failed
    machine = MachineView(M1, "10.0.0.1", {"az": "b"})
    assert machine_to_api(machine) == {"id": M1, "metadata": {"az": "b"}, "primaryIP": "10.0.0.1"}
    assert machine_to_api(MachineView(M2)) == {"id": M2}
    assert machine_from_api(machine_to_api(machine)) == machine
    with pytest.raises(InvalidInput):
        machine_from_api({"id": "x", "metadata": {"a": 1}})


# ---- registry loads --------------------------------------------------------------------------


async def _cluster(units: int) -> tuple[FakeKV, Registry]:
    kv = FakeKV()
    registry = Registry(kv)
    lease = await kv.grant(60)
    await registry.register_machine(Machine.make(M1, "10.0.0.1"), lease)
    for i in range(units):
        name = f"u{i:03}.service"
        body = parse_unit(f"[Service]\nExecStart=/bin/sleep {i % 5}\n")
        await registry.create_unit(name, body, TargetState.LAUNCHED)
        placement = codec.encode_placement(M1)
        await kv.txn([], [Put(registry.keys.placement(name), placement)])
        published = UnitState(name, M1, "loaded", "active", "running", body.hash)
        await registry.publish_state(published, lease)
    return kv, registry


async def test_load_unit_views_reads_each_prefix_once() -> None:
    kv, _ = await _cluster(50)
    registry = Registry(kv)  # a reader's: nothing cached yet
    kv.stats.clear()
    views = await load_unit_views(registry)
    assert len(views) == 50
    assert all(v.current_state == "loaded" and v.machine_id == M1 for v in views)
    # units, placements, states and bodies: one range each, whatever the number of units
    assert (kv.stats["range"], kv.stats["get"]) == (4, 0)
    assert len(registry.bodies) == 5
    kv.stats.clear()
    await load_unit_views(registry)
    assert (kv.stats["range"], kv.stats["get"]) == (3, 0)  # bodies come from the cache


async def test_load_one_unit_machines_and_states() -> None:
    _, registry = await _cluster(2)
    view = await load_unit_view(registry, "u001.service")
    assert view is not None
    assert (view.name, view.current_state, view.machine_id) == ("u001.service", "loaded", M1)
    assert await load_unit_view(registry, "nope.service") is None
    assert await load_machine_views(registry) == [MachineView(M1, "10.0.0.1", {})]
    states = await load_state_views(registry, unit="u001.service")
    assert [(s.name, s.machine_id, s.active) for s in states] == [("u001.service", M1, "active")]
    assert len(await load_state_views(registry)) == 2
    assert await load_state_views(registry, machine_id=M2) == []


async def test_a_corrupt_body_hides_only_its_units() -> None:
    kv, registry = await _cluster(6)
    bad = parse_unit("[Service]\nExecStart=/bin/sleep 0\n").hash
    await kv.txn([], [Put(registry.keys.body(bad), "[Broken\n")])
    views = await load_unit_views(Registry(kv))  # a reader's (the writer caches what it wrote)
    assert sorted(v.name for v in views) == [
        "u001.service",
        "u002.service",
        "u003.service",
        "u004.service",
    ]
    fresh = Registry(kv)  # the writer's registry still caches the good body it wrote
    assert await load_unit_view(fresh, "u000.service") is None
    assert await load_unit_view(fresh, "u001.service") is not None
