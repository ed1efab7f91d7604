"""The engine's pure planner: from desired units and machines to engine-owned writes."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from fleetd.engine.plan import (
    DeleteGlobal,
    DeletePlacement,
    DeleteSchedule,
    EngineView,
    SetGlobal,
    SetPlacement,
    SetSchedule,
    plan,
)
from fleetd.model import Machine, Placement, Requirements, ScheduledUnit, TargetState, Unit

L, OFF, D = TargetState.LAUNCHED, TargetState.INACTIVE, TargetState.LOADED
H1, H2 = "1" * 40, "2" * 40


def view(
    units: dict[str, tuple[str, TargetState, Requirements]], machines: list[str]
) -> EngineView:
    return EngineView(
        units={n: Unit(n, h, s) for n, (h, s, _) in units.items()},
        requirements={n: r for n, (_, _, r) in units.items()},
        machines={m: Machine.make(m) for m in machines},
    )


def settle(v: EngineView) -> list[object]:
    writes, _ = plan(v)
    v.apply(writes)
    return list(writes)


def test_new_unit_is_scheduled_and_placed() -> None:
    v = view({"a.service": (H1, L, Requirements())}, ["m1", "m2"])
    writes = settle(v)
    assert writes == [
        SetSchedule(Unit("a.service", H1, L), "m1"),
        SetPlacement("a.service", "m1"),
    ]
    assert plan(v)[0] == []


def test_desired_state_change_rewrites_only_the_schedule_key() -> None:
    v = view({"a.service": (H1, L, Requirements())}, ["m1"])
    settle(v)
    v.units["a.service"] = Unit("a.service", H1, D)
    assert plan(v)[0] == [SetSchedule(Unit("a.service", H1, D), "m1")]


def test_replaced_body_rewrites_schedule_in_place() -> None:
    v = view({"a.service": (H1, L, Requirements())}, ["m1", "m2"])
    settle(v)
    v.units["a.service"] = Unit("a.service", H2, L)
    assert plan(v)[0] == [SetSchedule(Unit("a.service", H2, L), "m1")]


def test_inactive_unit_is_unscheduled_and_its_placement_dropped() -> None:
    v = view({"a.service": (H1, L, Requirements())}, ["m1"])
    settle(v)
    v.units["a.service"] = Unit("a.service", H1, OFF)
    writes, reasons = plan(v)
    assert writes == [
        DeleteSchedule("a.service", "m1", reasons["a.service"]),
        DeletePlacement("a.service"),
    ]
    assert "inactive" in reasons["a.service"]


def test_destroyed_unit_leaves_nothing() -> None:
    v = view({"a.service": (H1, L, Requirements())}, ["m1"])
    settle(v)
    del v.units["a.service"], v.requirements["a.service"]
    writes = settle(v)
    assert {type(w) for w in writes} == {DeleteSchedule, DeletePlacement}
    assert not v.schedule
    assert not v.placements


def test_lost_machine_moves_its_units_only() -> None:
    v = view({f"u{i}.service": (H1, L, Requirements()) for i in range(4)}, ["m1", "m2"])
    settle(v)
    before = {n: s.machine_id for n, s in v.schedule.items()}
    del v.machines["m1"]
    writes, reasons = plan(v)
    moved = {w.name for w in writes if isinstance(w, DeleteSchedule)}
    assert moved == {n for n, m in before.items() if m == "m1"}
    assert all("went away" in reasons[n] for n in moved)
    v.apply(writes)
    assert {s.machine_id for s in v.schedule.values()} == {"m2"}


def test_unplaceable_unit_records_reason_once() -> None:
    picky = Requirements(metadata=(("region", frozenset({"east"})),))
    v = view({"p.service": (H1, L, picky)}, ["m1"])
    writes = settle(v)
    assert len(writes) == 1
    only = writes[0]
    assert isinstance(only, SetPlacement)
    assert only.machine_id is None
    assert "region=east" in only.reason
    assert plan(v)[0] == []


def test_global_units_are_projected_not_scheduled() -> None:
    g = Requirements(is_global=True)
    v = view({"g.service": (H1, L, g)}, ["m1", "m2"])
    assert settle(v) == [SetGlobal(Unit("g.service", H1, L))]
    v.units["g.service"] = Unit("g.service", H1, OFF)
    assert settle(v) == [DeleteGlobal("g.service")]


@st.composite
def clusters(draw: st.DrawFn) -> EngineView:
    machines = [f"m{i}" for i in range(draw(st.integers(0, 4)))]
    units: dict[str, tuple[str, TargetState, Requirements]] = {}
    for i in range(draw(st.integers(0, 8))):
        state = draw(st.sampled_from([L, D, OFF]))
        reqs = Requirements(
            is_global=draw(st.booleans()),
            conflicts=("u*",) if draw(st.booleans()) else (),
            machine_id=draw(st.sampled_from([None, "m0", "m9"])),
        )
        units[f"u{i}.service"] = (H1, state, reqs)
    return view(units, machines)


@settings(max_examples=200, deadline=None)
@given(clusters(), st.data())
def test_planning_the_applied_result_yields_nothing(v: EngineView, data: st.DataObject) -> None:
    settle(v)
    assert plan(v)[0] == []
    # and again after a machine is lost or joins
    if v.machines and data.draw(st.booleans()):
        del v.machines[sorted(v.machines)[0]]
    else:
        v.machines["mz"] = Machine.make("mz")
    settle(v)
    assert plan(v)[0] == []
    for s in v.schedule.values():
        assert s.machine_id in v.machines
        assert v.units[s.name].target_state != OFF
        assert v.placements[s.name] == Placement(s.name, s.machine_id, "")


def test_scheduled_unit_record_is_exact() -> None:
    v = view({"a.service": (H1, D, Requirements())}, ["m1"])
    settle(v)
    assert v.schedule == {"a.service": ScheduledUnit("a.service", "m1", H1, D)}
