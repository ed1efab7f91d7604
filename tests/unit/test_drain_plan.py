"""Cordon and drain in the engine's pure planner and scheduler (issue 18).

A cordoned machine keeps its units and takes no new one, and a unit that cannot be placed says
which machines are cordoned. A draining machine's units move make-before-break: the new copy is
scheduled while the old entry stays (a handoff), and the old entry goes only once the new copy
is active; PartitionPolicy=stop units leave first; a unit no other machine can take stays, with
its reason on the placement. A new leader reading the two entries finds the handoff again.
"""

from __future__ import annotations

import pytest

from fleetd.engine.plan import (
    BeginHandoff,
    DeleteSchedule,
    EndHandoff,
    EngineView,
    SetPlacement,
    SetSchedule,
    plan,
)
from fleetd.engine.scheduler import plan_schedule
from fleetd.engine.whatif import Action, hypothesis, predict
from fleetd.errors import InvalidInput, UnitFileError
from fleetd.model import (
    Cordon,
    Machine,
    PartitionPolicy,
    Placement,
    Requirements,
    ScheduledUnit,
    TargetState,
    Unit,
    UnitState,
)
from fleetd.unit.file import parse_unit
from fleetd.unit.xfleet import requirements, validate_options

L = TargetState.LAUNCHED
H1 = "1" * 40


def view(units: dict[str, Requirements], machines: list[str]) -> EngineView:
    return EngineView(
        units={n: Unit(n, H1, L) for n in units},
        requirements=dict(units),
        machines={m: Machine.make(m) for m in machines},
    )


def settle(v: EngineView) -> list[object]:
    writes, _ = plan(v)
    v.apply(writes)
    return list(writes)


def active(v: EngineView, name: str, machine_id: str) -> None:
    v.states[(name, machine_id)] = UnitState(name, machine_id, "loaded", "active", "running", H1)


def test_a_cordoned_machine_keeps_its_units_and_takes_no_new_one() -> None:
    v = view({"a.service": Requirements()}, ["m1", "m2"])
    settle(v)
    assert v.schedule["a.service"].machine_id == "m1"
    v.cordons["m1"] = Cordon("m1")
    v.cordons["m2"] = Cordon("m2")
    assert plan(v)[0] == []  # a.service stays
    v.units["b.service"] = Unit("b.service", H1, L)
    v.requirements["b.service"] = Requirements()
    writes = settle(v)
    assert writes == [SetPlacement("b.service", None, writes[0].reason)]  # type: ignore[attr-defined]
    assert v.placements["b.service"].reason == ("all 2 candidate machines are cordoned (m1, m2)")
    del v.cordons["m2"]
    assert settle(v)[0] == SetSchedule(Unit("b.service", H1, L), "m2")


def test_one_cordoned_machine_is_named_beside_other_reasons() -> None:
    reqs = {"a.service": Requirements(metadata=(("role", ("web",)),))}
    units = {n: Unit(n, H1, L) for n in reqs}
    machines = {
        "m1": Machine.make("m1", metadata={"role": "web"}),
        "m2": Machine.make("m2", metadata={"role": "db"}),
    }
    decided = plan_schedule(units, reqs, machines, {}, cordoned=frozenset({"m1"}))
    assert decided.unplaced["a.service"] == (
        "no machine can run it (2 machines): 1 fails MachineMetadata role=web, 1 is cordoned"
    )


def test_a_drain_starts_the_new_copy_before_the_old_one_stops() -> None:
    v = view({"a.service": Requirements()}, ["m1", "m2"])
    settle(v)
    v.cordons["m1"] = Cordon("m1", drain=True)
    writes = settle(v)
    assert BeginHandoff("a.service", "m1") in writes
    assert SetSchedule(Unit("a.service", H1, L), "m2") in writes
    assert not any(isinstance(w, DeleteSchedule) for w in writes)  # the old copy runs on
    assert v.handoffs == {"a.service": "m1"}
    assert settle(v) == []  # the new copy is not active yet: nothing to do
    active(v, "a.service", "m2")
    writes = settle(v)
    assert writes[:2] == [
        DeleteSchedule("a.service", "m1", "drained: active on m2"),
        EndHandoff("a.service"),
    ]
    assert v.handoffs == {}
    assert settle(v) == []


def test_a_stop_policy_unit_leaves_first() -> None:
    stop = Requirements(partition_policy=PartitionPolicy.STOP)
    v = view({"s.service": stop}, ["m1", "m2"])
    settle(v)
    v.cordons["m1"] = Cordon("m1", drain=True)
    writes = settle(v)
    assert writes[0] == DeleteSchedule("s.service", "m1", "machine m1 is draining")
    assert not any(isinstance(w, BeginHandoff) for w in writes)


def test_a_unit_no_other_machine_can_take_stays_with_its_reason() -> None:
    pinned = Requirements(machine_id="m1")
    v = view({"p.service": pinned, "a.service": Requirements()}, ["m1", "m2"])
    settle(v)
    v.cordons["m1"] = Cordon("m1", drain=True)
    settle(v)
    assert v.schedule["p.service"].machine_id == "m1"
    assert v.placements["p.service"].machine_id == "m1"
    assert "MachineID=m1" in v.placements["p.service"].reason
    assert "p.service" not in v.handoffs


def test_a_new_leader_finds_a_handoff_from_the_two_entries() -> None:
    v = view({"a.service": Requirements()}, ["m1", "m2"])
    v.cordons["m1"] = Cordon("m1", drain=True)
    v.placements = {"a.service": Placement("a.service", "m2")}
    extra = v.adopt_schedule(
        [
            ScheduledUnit("a.service", "m1", H1, L),
            ScheduledUnit("a.service", "m2", H1, L),
        ]
    )
    assert extra == []
    assert v.schedule["a.service"].machine_id == "m2"
    assert v.handoffs == {"a.service": "m1"}
    active(v, "a.service", "m2")
    assert DeleteSchedule("a.service", "m1", "drained: active on m2") in settle(v)


def test_a_destroyed_unit_ends_its_handoff() -> None:
    v = view({"a.service": Requirements()}, ["m1", "m2"])
    settle(v)
    v.cordons["m1"] = Cordon("m1", drain=True)
    settle(v)
    del v.units["a.service"], v.requirements["a.service"]
    writes = settle(v)
    assert DeleteSchedule("a.service", "m1", "unit destroyed") in writes
    assert DeleteSchedule("a.service", "m2", "unit no longer exists") in writes
    assert v.handoffs == {}


def test_a_budget_lets_stop_policy_instances_leave_one_at_a_time() -> None:
    budgeted = Requirements(partition_policy=PartitionPolicy.STOP, min_available=2)
    names = ["web@1.service", "web@2.service", "web@3.service"]
    v = view(dict.fromkeys(names, budgeted), ["m1", "m2"])
    for name in names:  # all three on m1
        v.schedule[name] = ScheduledUnit(name, "m1", H1, L)
        v.placements[name] = Placement(name, "m1")
    v.cordons["m1"] = Cordon("m1", drain=True)
    v.active_instances = {"web@.service": 3}
    writes = settle(v)
    stopped = [w for w in writes if isinstance(w, DeleteSchedule)]
    assert stopped == [DeleteSchedule("web@1.service", "m1", "machine m1 is draining")]
    for name in names[1:]:
        assert v.schedule[name].machine_id == "m1"
        assert v.placements[name].reason == (
            "waiting for the disruption budget: MinAvailable=2 for web@.service, 2 active"
        )
    v.active_instances = {"web@.service": 2}  # web@1 stopped, not yet active elsewhere
    assert not [w for w in settle(v) if isinstance(w, DeleteSchedule)]


def test_min_available_is_read_and_bad_values_are_refused_by_name() -> None:
    body = parse_unit("[Service]\nExecStart=/bin/true\n\n[X-Fleet]\nMinAvailable=2\n")
    assert requirements(body, "web@1.service").min_available == 2
    bad = parse_unit("[Service]\nExecStart=/bin/true\n\n[X-Fleet]\nMinAvailable=two\n")
    with pytest.raises(UnitFileError, match="MinAvailable"):
        validate_options(bad)


def test_plan_drain_predicts_the_moves_and_names_what_cannot_leave() -> None:
    v = view(
        {
            "a.service": Requirements(),
            "s.service": Requirements(partition_policy=PartitionPolicy.STOP),
            "p.service": Requirements(machine_id="m1"),
        },
        ["m1", "m2"],
    )
    v.cordons["m2"] = Cordon("m2")  # all three go to m1 ...
    settle(v)
    del v.cordons["m2"]  # ... and m2 takes new units again
    assert {s.machine_id for s in v.schedule.values()} == {"m1"}
    prediction = predict(v, hypothesis(v, [], drain=["m1"]))
    outcomes = {u.name: u for u in prediction.units}
    assert outcomes["a.service"].action is Action.MOVE
    assert outcomes["a.service"].after == "m2"
    assert outcomes["s.service"].action is Action.MOVE
    assert outcomes["p.service"].action is Action.STUCK
    assert "MachineID=m1" in outcomes["p.service"].reason
    assert [u.name for u in prediction.unplaced] == ["p.service"]
    assert prediction.drain == ("m1",)
    with pytest.raises(InvalidInput, match="both killed and drained"):
        hypothesis(v, [], kill=["m1"], drain=["m1"])


def test_a_unit_that_is_not_running_moves_without_a_handoff() -> None:
    v = view({"l.service": Requirements()}, ["m1", "m2"])
    v.units["l.service"] = Unit("l.service", H1, TargetState.LOADED)
    settle(v)
    v.cordons["m1"] = Cordon("m1", drain=True)
    writes = settle(v)
    assert DeleteSchedule("l.service", "m1", "machine m1 is draining") in writes
    assert v.handoffs == {}


def test_a_unit_stopped_during_its_handoff_ends_it() -> None:
    v = view({"a.service": Requirements()}, ["m1", "m2"])
    settle(v)
    v.cordons["m1"] = Cordon("m1", drain=True)
    settle(v)
    assert v.handoffs == {"a.service": "m1"}
    v.units["a.service"] = Unit("a.service", H1, TargetState.LOADED)  # fleetctl stop
    writes = settle(v)
    assert DeleteSchedule("a.service", "m1", "target state loaded") in writes
    assert v.handoffs == {}
