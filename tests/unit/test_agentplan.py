"""fleetd.agent.plan: fleet's per-unit task table, task order, desired state and invariants."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetd.agent.plan import (
    REASON_FILES_CHANGED,
    REASON_HASH_CHANGED,
    REASON_NOT_DESIRED,
    REASON_NOT_LOADED,
    REASON_WANT_LAUNCHED,
    REASON_WANT_LOADED,
    CurrentUnit,
    DesiredUnit,
    Task,
    TaskKind,
    apply_tasks,
    desired_for_machine,
    plan_tasks,
)
from fleetd.model import Machine, Requirements, ScheduledUnit, TargetState, Unit

OLD = "0" * 40
NEW = "1" * 40
INACTIVE = TargetState.INACTIVE
LOADED = TargetState.LOADED
LAUNCHED = TargetState.LAUNCHED
UNLOAD, LOAD, RELOAD, STOP, START = TaskKind


def test_task_kind_order_is_fleets() -> None:
    assert [kind.value for kind in (UNLOAD, LOAD, RELOAD, STOP, START)] == [1, 2, 3, 4, 5]


# fleet's calculateTasksForUnit, one row per case: (desired, current) -> task kinds for the unit.
TABLE = [
    pytest.param(None, None, [], id="absent-absent"),
    pytest.param(None, (OLD, LOADED), [UNLOAD], id="absent-loaded"),
    pytest.param(None, (OLD, LAUNCHED), [UNLOAD], id="absent-launched"),
    pytest.param((OLD, INACTIVE), (OLD, LAUNCHED), [UNLOAD], id="inactive-launched"),
    pytest.param((OLD, INACTIVE), None, [], id="inactive-absent"),
    pytest.param((OLD, LOADED), None, [LOAD], id="loaded-absent"),
    pytest.param((OLD, LAUNCHED), None, [LOAD, START], id="launched-absent"),
    pytest.param((NEW, LOADED), (OLD, LOADED), [UNLOAD, LOAD], id="hash-differs-loaded"),
    pytest.param(
        (NEW, LAUNCHED), (OLD, LAUNCHED), [UNLOAD, LOAD, START], id="hash-differs-launched"
    ),
    pytest.param((NEW, LOADED), (OLD, LAUNCHED), [UNLOAD, LOAD], id="hash-differs-stopping"),
    pytest.param((OLD, LAUNCHED), (OLD, LOADED), [START], id="launched-loaded"),
    pytest.param((OLD, LOADED), (OLD, LAUNCHED), [STOP], id="loaded-launched"),
    pytest.param((OLD, LOADED), (OLD, LOADED), [], id="equal-loaded"),
    pytest.param((OLD, LAUNCHED), (OLD, LAUNCHED), [], id="equal-launched"),
    pytest.param((OLD, LAUNCHED), (OLD, INACTIVE), [LOAD, START], id="after-restart-launched"),
    pytest.param((OLD, LOADED), (OLD, INACTIVE), [LOAD], id="after-restart-loaded"),
]


@pytest.mark.parametrize(("desired", "current", "kinds"), TABLE)
def test_tasks_for_one_unit(
    desired: tuple[str, TargetState] | None,
    current: tuple[str, TargetState] | None,
    kinds: list[TaskKind],
) -> None:
    want = {} if desired is None else {"u.service": DesiredUnit("u.service", *desired)}
    have = {} if current is None else {"u.service": CurrentUnit("u.service", *current)}
    tasks = plan_tasks(want, have)
    assert [t.kind for t in tasks if t.kind != RELOAD] == kinds
    assert all(t.unit == "u.service" for t in tasks if t.kind != RELOAD)
    # A daemon-reload follows exactly when unit files were written or removed.
    has_files = bool({UNLOAD, LOAD} & set(kinds))
    assert [t for t in tasks if t.kind == RELOAD] == (
        [Task(RELOAD, "", REASON_FILES_CHANGED)] if has_files else []
    )


def test_reasons() -> None:
    desired = {
        "load.service": DesiredUnit("load.service", OLD, LAUNCHED),
        "new.service": DesiredUnit("new.service", NEW, LOADED),
        "start.service": DesiredUnit("start.service", OLD, LAUNCHED),
        "stop.service": DesiredUnit("stop.service", OLD, LOADED),
    }
    current = {
        "new.service": CurrentUnit("new.service", OLD, LOADED),
        "start.service": CurrentUnit("start.service", OLD, LOADED),
        "stop.service": CurrentUnit("stop.service", OLD, LAUNCHED),
        "gone.service": CurrentUnit("gone.service", OLD, LAUNCHED),
    }
    assert plan_tasks(desired, current) == [
        Task(UNLOAD, "gone.service", REASON_NOT_DESIRED),
        Task(UNLOAD, "new.service", REASON_HASH_CHANGED),
        Task(LOAD, "load.service", REASON_NOT_LOADED),
        Task(LOAD, "new.service", REASON_HASH_CHANGED),
        Task(RELOAD, "", REASON_FILES_CHANGED),
        Task(STOP, "stop.service", REASON_WANT_LOADED),
        Task(START, "load.service", REASON_NOT_LOADED),
        Task(START, "start.service", REASON_WANT_LAUNCHED),
    ]


def test_no_reload_without_file_changes() -> None:
    desired = {"a.service": DesiredUnit("a.service", OLD, LAUNCHED)}
    current = {"a.service": CurrentUnit("a.service", OLD, LOADED)}
    assert plan_tasks(desired, current) == [Task(START, "a.service", REASON_WANT_LAUNCHED)]


def test_apply_tasks_models_the_executor() -> None:
    desired = {"a.service": DesiredUnit("a.service", NEW, LAUNCHED)}
    current = {
        "a.service": CurrentUnit("a.service", OLD, LAUNCHED),
        "b.service": CurrentUnit("b.service", OLD, LOADED),
    }
    after = apply_tasks(current, desired, plan_tasks(desired, current))
    assert after == {"a.service": CurrentUnit("a.service", NEW, LAUNCHED)}


# --- invariants --------------------------------------------------------------------------------

NAMES = ["a.service", "b.service", "c@1.service", "c@2.service", "d.socket"]
unit_hash = st.sampled_from([OLD, NEW])


@st.composite
def desired_units(draw: st.DrawFn) -> dict[str, DesiredUnit]:
    names = draw(st.sets(st.sampled_from(NAMES)))
    state = st.sampled_from([LOADED, LAUNCHED, INACTIVE])
    return {n: DesiredUnit(n, draw(unit_hash), draw(state)) for n in sorted(names)}


@st.composite
def current_units(draw: st.DrawFn) -> dict[str, CurrentUnit]:
    names = draw(st.sets(st.sampled_from(NAMES)))
    state = st.sampled_from([LOADED, LAUNCHED, LAUNCHED, INACTIVE])
    return {n: CurrentUnit(n, draw(unit_hash), draw(state)) for n in sorted(names)}


@settings(max_examples=500)
@given(desired_units(), current_units())
def test_applying_the_plan_reaches_desired_and_replanning_is_empty(
    desired: dict[str, DesiredUnit], current: dict[str, CurrentUnit]
) -> None:
    tasks = plan_tasks(desired, current)
    after = apply_tasks(current, desired, tasks)
    assert after == {
        name: CurrentUnit(name, unit.hash, unit.target_state)
        for name, unit in desired.items()
        if unit.target_state != INACTIVE
    }
    assert plan_tasks(desired, after) == []


@settings(max_examples=500)
@given(desired_units(), current_units())
def test_task_order(desired: dict[str, DesiredUnit], current: dict[str, CurrentUnit]) -> None:
    tasks = plan_tasks(desired, current)
    assert tasks == sorted(tasks, key=lambda t: (t.kind, t.unit))
    per_unit = [(t.kind, t.unit) for t in tasks]
    assert len(per_unit) == len(set(per_unit)), "one task of each kind per unit at most"
    reloads = [t for t in tasks if t.kind == RELOAD]
    assert len(reloads) == (1 if any(t.kind in (UNLOAD, LOAD) for t in tasks) else 0)
    assert not tasks or tasks[0].kind != RELOAD
    for task in tasks:
        if task.kind == START and task.unit not in current:
            assert (LOAD, task.unit) in per_unit, "a unit is loaded before it is started"


# --- desired state for one machine -------------------------------------------------------------

HERE = Machine.make("m1", metadata={"role": "web"})
NO_REQUIREMENTS = Requirements()


def scheduled(name: str, machine_id: str = "m1", state: TargetState = LAUNCHED) -> ScheduledUnit:
    return ScheduledUnit(name, machine_id, OLD, state)


def global_unit(
    name: str, req: Requirements = NO_REQUIREMENTS, state: TargetState = LAUNCHED
) -> tuple[str, tuple[Unit, Requirements]]:
    return name, (Unit(name, NEW, state), dataclasses.replace(req, is_global=True))


def test_desired_takes_this_machines_schedule_only() -> None:
    entries = [
        scheduled("a.service"),
        scheduled("b.service", "m2"),
        scheduled("c.service", state=INACTIVE),
        scheduled("d.service", state=LOADED),
    ]
    assert desired_for_machine(HERE, entries, {}, {}) == {
        "a.service": DesiredUnit("a.service", OLD, LAUNCHED),
        "d.service": DesiredUnit("d.service", OLD, LOADED),
    }


def test_desired_global_units_by_metadata_and_state() -> None:
    globals_ = dict(
        [
            global_unit("all.service"),
            global_unit("web.service", Requirements(metadata=(("role", frozenset({"web"})),))),
            global_unit("db.service", Requirements(metadata=(("role", frozenset({"db"})),))),
            global_unit("off.service", state=INACTIVE),
        ]
    )
    assert desired_for_machine(HERE, [], globals_, {}) == {
        "all.service": DesiredUnit("all.service", NEW, LAUNCHED),
        "web.service": DesiredUnit("web.service", NEW, LAUNCHED),
    }


def test_desired_conflicts_resolved_by_name_first_wins() -> None:
    # fleet functional/scheduling_test.go TestScheduleGlobalConflicts: alphabetical, first wins.
    globals_ = dict(
        [
            global_unit("conflict.0.service", Requirements(conflicts=("conflict*",))),
            global_unit("conflict.1.service", Requirements(conflicts=("conflict*",))),
            global_unit("z.service"),
        ]
    )
    entries = [scheduled("a.service"), scheduled("y.service")]
    requirements = {"y.service": Requirements(conflicts=("z.service",))}
    assert sorted(desired_for_machine(HERE, entries, globals_, requirements)) == [
        "a.service",
        "conflict.0.service",
        "y.service",
    ]


def test_desired_global_wins_a_name_that_is_also_scheduled() -> None:
    globals_ = dict([global_unit("a.service")])
    assert desired_for_machine(HERE, [scheduled("a.service")], globals_, {}) == {
        "a.service": DesiredUnit("a.service", NEW, LAUNCHED)
    }
