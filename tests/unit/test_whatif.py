"""What-if (fleetd/engine/whatif.py): the engine's planner on a changed copy of the cluster.

The central property: a prediction of killing machines is exactly what `plan()` does when
those machines are really removed from the view, table-driven over the constraint kinds and
checked with Hypothesis on random clusters. Then the outcomes' wording (unplaceable units
with the scheduler's reasons), plans of new units, and `explain`'s table and fixes.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetd.engine.plan import EngineView, plan
from fleetd.engine.whatif import (
    Action,
    Explanation,
    Hypothesis,
    Prediction,
    Result,
    Start,
    copy_view,
    explain,
    explanation_from_api,
    explanation_to_api,
    hypothesis,
    predict,
    prediction_from_api,
    prediction_to_api,
    resolve_machines,
    settle,
)
from fleetd.errors import InvalidInput, NotFound
from fleetd.model import Machine, Requirements, TargetState, Unit
from fleetd.unit.file import UnitFile, parse_unit

L, OFF, D = TargetState.LAUNCHED, TargetState.INACTIVE, TargetState.LOADED
H = "1" * 40
WEB = (("role", frozenset({"web"})),)
DB = (("role", frozenset({"db"})),)


def cluster(
    units: dict[str, Requirements],
    machines: dict[str, dict[str, str]],
    *,
    states: dict[str, TargetState] | None = None,
) -> EngineView:
    """A settled view: the units planned and applied once, as a running engine leaves it."""
    states = states or {}
    view = EngineView(
        units={n: Unit(n, H, states.get(n, L)) for n in units},
        requirements=dict(units),
        machines={m: Machine.make(m, metadata=md) for m, md in machines.items()},
    )
    settled, _ = settle(view)
    return settled


def schedule_of(view: EngineView) -> dict[str, str]:
    return {n: s.machine_id for n, s in view.schedule.items()}


def really_removed(view: EngineView, machines: set[str]) -> EngineView:
    """What the engine does when the machines' leases expire: plan without them, apply."""
    actual = copy_view(view)
    for machine_id in machines:
        del actual.machines[machine_id]
    writes, _ = plan(actual)
    actual.apply(writes)
    return actual


def changed(before: EngineView, after: EngineView) -> dict[str, str | None]:
    old, new = schedule_of(before), schedule_of(after)
    return {n: new.get(n) for n in old.keys() | new.keys() if old.get(n) != new.get(n)}


def predicted(p: Prediction) -> dict[str, str | None]:
    return {u.name: u.after for u in p.units if u.action is not Action.STAY}


# ---- kill: the prediction is what plan() really does ----------------------------------------

THREE = {"m1": {"role": "web"}, "m2": {"role": "web"}, "m3": {"role": "db"}}
SCENARIOS = {
    "plain units spread": (
        {f"u{i}.service": Requirements() for i in range(7)},
        THREE,
    ),
    "metadata": (
        {
            "web1.service": Requirements(metadata=WEB),
            "web2.service": Requirements(metadata=WEB),
            "db.service": Requirements(metadata=DB),
        },
        THREE,
    ),
    "MachineID pins": (
        {"pinned.service": Requirements(machine_id="m2"), "free.service": Requirements()},
        THREE,
    ),
    "conflicting instances": (
        {f"web@{i}.service": Requirements(conflicts=("web@*.service",)) for i in range(1, 4)},
        THREE,
    ),
    "MachineOf pair": (
        {
            "db.service": Requirements(),
            "app.service": Requirements(machine_of=("db.service",)),
            "other.service": Requirements(),
        },
        THREE,
    ),
    "global units": (
        {
            "everywhere.service": Requirements(is_global=True),
            "web-only.service": Requirements(is_global=True, metadata=WEB),
            "a.service": Requirements(),
            "b.service": Requirements(conflicts=("everywhere.service",)),
        },
        THREE,
    ),
    "Replaces": (
        {
            "v1.service": Requirements(),
            "v2.service": Requirements(replaces=("v1.service",)),
            "x.service": Requirements(),
        },
        THREE,
    ),
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_killing_a_machine_predicts_what_plan_does_without_it(scenario: str) -> None:
    units, machines = SCENARIOS[scenario]
    view = cluster(units, machines)
    for machine_id in sorted(view.machines):
        prediction = predict(view, Hypothesis(kill=frozenset({machine_id})))
        actual = really_removed(view, {machine_id})
        assert predicted(prediction) == changed(view, actual), (scenario, machine_id)
        assert prediction.kill == (machine_id,)
        assert prediction.pending == 0
        # Every unit that ran on the machine is accounted for: moved, or placed nowhere.
        gone = {n for n, m in schedule_of(view).items() if m == machine_id}
        assert gone <= {u.name for u in prediction.units}


@st.composite
def views(draw: st.DrawFn) -> EngineView:
    machines = {
        f"m{i}": draw(st.sampled_from([{}, {"role": "web"}, {"role": "db"}]))
        for i in range(draw(st.integers(1, 5)))
    }
    units = {}
    for i in range(draw(st.integers(0, 10))):
        name = f"u{i}.service"
        units[name] = Requirements(
            is_global=draw(st.booleans()) and i % 4 == 0,
            conflicts=("u*",) if draw(st.booleans()) else (),
            machine_id=draw(st.sampled_from([None, None, "m0", "m9"])),
            metadata=draw(st.sampled_from([(), (), WEB, DB])),
        )
        if units[name].is_global:
            units[name] = Requirements(is_global=True, metadata=units[name].metadata)
    states = {n: draw(st.sampled_from([L, L, D, OFF])) for n in units}
    return cluster(units, machines, states=states)


@given(views(), st.data())
@settings(max_examples=150, deadline=None)
def test_any_kill_predicts_exactly_what_plan_does(view: EngineView, data: st.DataObject) -> None:
    kill = set(data.draw(st.sets(st.sampled_from(sorted(view.machines)), max_size=3)))
    before = copy_view(view)
    prediction = predict(view, Hypothesis(kill=frozenset(kill)))
    assert view == before  # the view it was given is left as it was
    actual = really_removed(view, kill)
    assert predicted(prediction) == changed(view, actual)
    assert all(u.action is not Action.STAY for u in prediction.units)  # only changes listed
    # Unplaceable units are those the engine would leave without a machine.
    unplaced = {n for n, p in actual.placements.items() if p.machine_id is None}
    assert {u.name for u in prediction.unplaced} <= unplaced
    # Globals: what ran on a killed machine stops there, nothing else starts or stops.
    for g in prediction.globals:
        assert (g.action, g.machine_id in kill) == ("stop", True)


# ---- the outcomes' words --------------------------------------------------------------------


def test_units_that_would_run_nowhere_say_why() -> None:
    view = cluster(
        {
            "db.service": Requirements(metadata=DB),
            "pinned.service": Requirements(machine_id="m1"),
            "web@1.service": Requirements(conflicts=("web@*",)),
            "web@2.service": Requirements(conflicts=("web@*",)),
            "web@3.service": Requirements(conflicts=("web@*",)),
        },
        THREE,
    )
    assert schedule_of(view)["db.service"] == "m3"
    on_m1 = {n for n, m in schedule_of(view).items() if m == "m1"}
    assert "pinned.service" in on_m1
    p = predict(view, Hypothesis(kill=frozenset({"m1", "m3"})))
    outcomes = {u.name: u for u in p.units}
    db = outcomes["db.service"]
    assert (db.action, db.before, db.after) == (Action.UNPLACED, "m3", None)
    assert db.reason == "machine m3 went away; no machine has metadata role=db (machines: 1)"
    pinned = outcomes["pinned.service"]
    assert pinned.action is Action.UNPLACED
    assert pinned.reason.endswith("MachineID=m1 is not a registered machine")
    web = [u for u in p.units if u.name.startswith("web@") and u.action is Action.UNPLACED]
    assert len(web) == 2  # three instances that conflict, one machine left
    assert all("conflicting unit" in u.reason for u in web)
    assert len(p.unplaced) == 4


def test_a_kill_that_moves_nothing_predicts_nothing() -> None:
    view = cluster({"a.service": Requirements(machine_id="m1")}, THREE)
    p = predict(view, Hypothesis(kill=frozenset({"m2"})))
    assert (p.units, p.globals, p.unplaced) == ((), (), [])


def test_global_units_stop_with_their_machine() -> None:
    view = cluster(
        {
            "g.service": Requirements(is_global=True),
            "gw.service": Requirements(is_global=True, metadata=WEB),
        },
        THREE,
    )
    p = predict(view, Hypothesis(kill=frozenset({"m1"})))
    assert [(g.name, g.machine_id, g.action, g.reason) for g in p.globals] == [
        ("g.service", "m1", "stop", "its machine goes away"),
        ("gw.service", "m1", "stop", "its machine goes away"),
    ]
    assert p.units == ()


def test_an_unknown_machine_is_refused() -> None:
    view = cluster({}, THREE)
    with pytest.raises(InvalidInput, match="machine m9 does not exist"):
        predict(view, Hypothesis(kill=frozenset({"m9"})))


def test_the_prediction_starts_from_what_the_engine_converges_to() -> None:
    view = cluster({"a.service": Requirements()}, THREE)
    view.units["late.service"] = Unit("late.service", H, L)  # not planned by the engine yet
    p = predict(view, Hypothesis(kill=frozenset({"m3"})))
    assert p.pending == 2  # its schedule and placement
    assert "late.service" not in {u.name for u in p.units}  # not blamed on the kill


# ---- plan of units to start -----------------------------------------------------------------


def start(view: EngineView, *starts: Start, kill: tuple[str, ...] = ()) -> Prediction:
    return predict(view, hypothesis(view, starts, kill))


def body(x_fleet: str = "") -> UnitFile:
    text = "[Service]\nExecStart=/bin/true\n" + (f"\n[X-Fleet]\n{x_fleet}\n" if x_fleet else "")
    return parse_unit(text)


def test_new_units_land_on_the_least_loaded_machine_or_say_why_not() -> None:
    view = cluster({"a.service": Requirements(), "b.service": Requirements()}, THREE)
    p = start(
        view,
        Start("new.service", body()),
        Start("db2.service", body("MachineMetadata=role=db")),
        Start("nowhere.service", body("MachineMetadata=role=cache")),
    )
    outcomes = {u.name: u for u in p.units}
    # By name: db2 takes m3 (the one db machine); then every machine runs one unit and the
    # tie goes to the lowest id.
    assert (outcomes["db2.service"].action, outcomes["db2.service"].after) == (Action.PLACE, "m3")
    assert (outcomes["new.service"].action, outcomes["new.service"].after) == (Action.PLACE, "m1")
    nowhere = outcomes["nowhere.service"]
    assert (nowhere.action, nowhere.before, nowhere.after) == (Action.UNPLACED, None, None)
    assert nowhere.reason == "no machine has metadata role=cache (machines: 3)"
    assert set(outcomes) == {"new.service", "db2.service", "nowhere.service"}  # a, b stay put


def test_starting_a_running_unit_changes_nothing_and_says_so() -> None:
    view = cluster({"a.service": Requirements()}, THREE)
    p = start(view, Start("a.service"))
    assert [(u.name, u.action, u.before, u.after) for u in p.units] == [
        ("a.service", Action.STAY, "m1", "m1")
    ]
    stopped = cluster({"b.service": Requirements()}, THREE, states={"b.service": OFF})
    p = start(stopped, Start("b.service"))
    assert [(u.name, u.action, u.after) for u in p.units] == [("b.service", Action.PLACE, "m1")]


def test_what_else_would_move_is_listed() -> None:
    # v1 on m1, x on m2: v2 (Replaces=v1) gets m1 (a tie, to the lowest id; the replaced unit
    # counts in its load) and v1 moves away, as the scheduler's Replaces rule says.
    view = cluster(
        {"v1.service": Requirements(), "x.service": Requirements()}, {"m1": {}, "m2": {}}
    )
    assert schedule_of(view) == {"v1.service": "m1", "x.service": "m2"}
    p = start(view, Start("v2.service", body("Replaces=v1.service")))
    assert [(u.name, u.action, u.before, u.after, u.reason) for u in p.units] == [
        ("v1.service", Action.MOVE, "m1", "m2", "replaced by v2.service"),
        ("v2.service", Action.PLACE, None, "m1", ""),
    ]
    actual = copy_view(view)
    change = hypothesis(view, [Start("v2.service", body("Replaces=v1.service"))])
    actual.units["v2.service"], actual.requirements["v2.service"] = change.units["v2.service"]
    writes, _ = plan(actual)
    actual.apply(writes)
    assert predicted(p) == changed(view, actual)


def test_a_new_global_unit_starts_on_every_matching_machine() -> None:
    view = cluster({}, THREE)
    p = start(view, Start("g.service", body("Global=true\nMachineMetadata=role=web")))
    assert [(g.name, g.machine_id, g.action) for g in p.globals] == [
        ("g.service", "m1", "start"),
        ("g.service", "m2", "start"),
    ]
    assert [(u.name, u.action) for u in p.units] == [("g.service", Action.GLOBAL)]
    p = start(view, Start("g.service", body("Global=true\nMachineMetadata=role=x")))
    assert [(u.action, u.reason) for u in p.units] == [
        (Action.UNPLACED, "no machine has metadata role=x (machines: 3)")
    ]


def test_plan_and_kill_together() -> None:
    view = cluster({"a.service": Requirements()}, {"m1": {}, "m2": {}})
    p = start(view, Start("b.service", body()), kill=("m1",))
    assert {u.name: (u.action, u.after) for u in p.units} == {
        "a.service": (Action.MOVE, "m2"),
        "b.service": (Action.PLACE, "m2"),
    }


def test_bad_hypotheses_are_refused() -> None:
    view = cluster({"a.service": Requirements()}, THREE)
    with pytest.raises(InvalidInput, match="given twice"):
        hypothesis(view, [Start("a.service"), Start("a.service")])
    with pytest.raises(InvalidInput, match=r'cannot activate template "t@\.service"'):
        hypothesis(view, [Start("t@.service", body())])
    with pytest.raises(InvalidInput, match="does not exist and no unit file was given"):
        hypothesis(view, [Start("nope.service")])
    # A body's [X-Fleet] is read as the engine reads it; checking it (strictly, or with
    # --allow-unknown-options) is the caller's, as before a write (fleetctl, the API).
    unit, reqs = hypothesis(view, [Start("x.service", body("MachineMetadata=role"))]).units[
        "x.service"
    ]
    assert (unit.target_state, reqs) == (L, Requirements())


@pytest.mark.parametrize(
    ("prefixes", "expected"),
    [
        (["m1"], {"m1"}),
        (["ab"], {"abc1"}),
        (["abc1", "ab"], {"abc1"}),
        (["x1", "x2"], {"x1", "x2"}),  # exact ids win over longer ids they prefix
    ],
)
def test_machine_prefixes(prefixes: list[str], expected: set[str]) -> None:
    assert resolve_machines(prefixes, ["m1", "abc1", "x1", "x12", "x2"]) == expected


@pytest.mark.parametrize(
    ("prefix", "message"),
    [
        ("zz", 'no machine matches ID prefix "zz"'),
        ("x", 'machine ID prefix "x" is ambiguous: it matches 3 machines (x1, x12, x2)'),
        ("", "empty machine ID"),
    ],
)
def test_unknown_and_ambiguous_prefixes(prefix: str, message: str) -> None:
    with pytest.raises(InvalidInput) as e:
        resolve_machines([prefix], ["m1", "x1", "x12", "x2"])
    assert str(e.value) == message


# ---- explain --------------------------------------------------------------------------------


def cells(e: Explanation) -> dict[str, dict[str, tuple[str, str]]]:
    return {
        m.machine_id: {c.constraint: (c.result.value, c.detail) for c in m.checks}
        for m in e.machines
    }


def test_why_a_unit_with_metadata_and_conflicts_is_not_placed() -> None:
    web = Requirements(metadata=WEB, conflicts=("web@*",))
    view = cluster(
        {"web@1.service": web, "web@2.service": web},
        {"m1": {"role": "web"}, "m2": {"role": "db"}, "m3": {}},
    )
    e = explain(view, "web@2.service")
    assert (e.machine_id, e.predicted) == (None, None)
    assert e.reason.startswith("no machine can run it (3 machines)")
    table = cells(e)
    assert table["m1"]["Conflicts"] == (
        "fail",
        "runs web@1.service (web@2.service conflicts with web@*)",
    )
    assert table["m1"]["MachineMetadata"] == ("pass", "")
    assert table["m2"]["MachineMetadata"] == ("fail", "role=web wanted, has role=db")
    assert table["m3"]["MachineMetadata"] == ("fail", "role=web wanted, has no role")
    assert table["m3"]["MachineID"] == ("none", "")
    assert not any(m.fits for m in e.machines)
    smallest, *others = e.fixes
    assert (smallest.change, smallest.machines) == (
        "add metadata role=web to one more machine",
        ("m3",),
    )
    assert [f.change for f in others] == [
        "remove Conflicts=web@* from web@2.service",
        "change metadata to role=web (now role=db) on one more machine",
        "destroy or stop the conflicting unit web@1.service",
    ]


def test_why_names_the_smallest_change_first() -> None:
    # m1 needs two metadata keys, m2 one unit stopped: stopping one unit is one change.
    need = (("role", frozenset({"web"})), ("disk", frozenset({"ssd"})))
    view = cluster(
        {
            "blocker.service": Requirements(machine_id="m2"),
            "x.service": Requirements(metadata=need, conflicts=("blocker.service",)),
        },
        {"m1": {}, "m2": {"role": "web", "disk": "ssd"}},
    )
    e = explain(view, "x.service")
    assert [(f.change, f.machines, f.changes) for f in e.fixes] == [
        ("remove Conflicts=blocker.service from x.service", ("m2",), 1),
        ("destroy or stop the conflicting unit blocker.service", ("m2",), 1),
        ("add metadata disk=ssd role=web to one more machine", ("m1",), 2),
    ]


def test_why_a_pinned_unit_is_not_placed() -> None:
    view = cluster({"p.service": Requirements(machine_id="gone")}, THREE)
    e = explain(view, "p.service")
    assert e.reason == "MachineID=gone is not a registered machine"
    assert {t["MachineID"][0] for t in cells(e).values()} == {"fail"}
    assert [f.change for f in e.fixes] == [
        "MachineID=gone names no registered machine: start fleetd there, or change MachineID="
        " in p.service"
    ]


def test_why_a_follower_without_its_peer_is_not_placed() -> None:
    view = cluster(
        {
            "db.service": Requirements(metadata=(("role", frozenset({"none"})),)),
            "app.service": Requirements(machine_of=("db.service",)),
        },
        THREE,
    )
    e = explain(view, "app.service")
    assert cells(e)["m1"]["MachineOf"] == ("fail", "peer db.service is not scheduled")
    assert [f.change for f in e.fixes] == [
        "get its MachineOf peer db.service placed (fleetctl why db.service)"
    ]


def test_why_a_placed_unit_is_where_it_is() -> None:
    view = cluster({"a.service": Requirements(), "b.service": Requirements()}, THREE)
    e = explain(view, "a.service")
    assert (e.machine_id, e.predicted, e.reason, e.fixes) == ("m1", "m1", "", ())
    assert [m.machine_id for m in e.machines if m.here] == ["m1"]
    assert all(m.fits for m in e.machines)
    assert e.notes == ()  # m2 fits too, with as many units (b): nothing to say
    view = cluster({f"u{i}.service": Requirements() for i in range(3)}, {"m1": {}})
    view.machines["m2"] = Machine.make("m2")  # joined after: the engine does not rebalance
    e = explain(view, "u0.service")
    assert e.notes == (
        "1 other machines fit with fewer units: a placed unit stays where it is while its"
        " constraints hold (the engine does not rebalance)",
    )


def test_why_an_inactive_unit_is_explained_as_if_started() -> None:
    view = cluster({"a.service": Requirements(metadata=DB)}, THREE, states={"a.service": OFF})
    e = explain(view, "a.service")
    assert (e.desired_state, e.machine_id, e.predicted) == ("inactive", None, "m3")
    assert e.notes[0].startswith("its desired state is inactive")


def test_why_a_replaced_unit_is_not_placed() -> None:
    view = cluster(
        {"v2.service": Requirements(replaces=("v1.service",), machine_id="m1")},
        {"m1": {}},
    )
    view.units["v1.service"] = Unit("v1.service", H, L)
    view.requirements["v1.service"] = Requirements(machine_id="m1")
    e = explain(view, "v1.service")
    assert cells(e)["m1"]["Replaces"] == ("fail", "runs v2.service, which replaces it")
    assert [f.change for f in e.fixes] == ["destroy or stop the conflicting unit v2.service"]


def test_why_a_global_unit_runs_where_it_does() -> None:
    view = cluster(
        {
            "a-first.service": Requirements(is_global=True, conflicts=("g.service",)),
            "g.service": Requirements(is_global=True, metadata=WEB),
        },
        THREE,
    )
    e = explain(view, "g.service")
    assert e.is_global
    assert [m.machine_id for m in e.machines if m.here] == []
    assert cells(e)["m1"]["Conflicts"] == (
        "fail",
        "runs a-first.service (a-first.service conflicts with g.service), first by name",
    )
    assert cells(e)["m3"]["MachineMetadata"][0] == "fail"
    assert e.reason


def test_why_an_unknown_unit() -> None:
    with pytest.raises(NotFound):
        explain(cluster({}, THREE), "nope.service")


def test_explain_leaves_the_view_alone() -> None:
    view = cluster({"a.service": Requirements()}, THREE, states={"a.service": OFF})
    before = copy_view(view)
    explain(view, "a.service")
    assert view == before


# ---- JSON -----------------------------------------------------------------------------------


def test_predictions_and_explanations_survive_the_api() -> None:
    view = cluster(
        {
            "db.service": Requirements(metadata=DB),
            "a.service": Requirements(),
            "g.service": Requirements(is_global=True),
            "web@1.service": Requirements(conflicts=("web@*",), metadata=WEB),
            "web@2.service": Requirements(conflicts=("web@*",), metadata=WEB),
            "web@3.service": Requirements(conflicts=("web@*",), metadata=WEB),
        },
        THREE,
    )
    p = dataclasses.replace(
        predict(view, Hypothesis(kill=frozenset({"m3", "m1"}))), revision=7, unplanned=("x",)
    )
    assert p.units
    assert p.globals
    assert p.unplaced
    assert prediction_from_api(prediction_to_api(p)) == p
    for name in view.units:
        e = explain(view, name)
        assert explanation_from_api(explanation_to_api(e)) == e
    doc = prediction_to_api(p)
    assert doc["summary"]["unplaced"] == len(p.unplaced)
    assert doc["kill"] == ["m1", "m3"]


@pytest.mark.parametrize(
    "answer",
    [
        [],
        {"units": {}},
        {"units": [{"name": "a", "action": "explode"}]},
        {"units": [{"action": "move"}]},
        {"globals": [{"name": "g", "machineID": "m", "action": "pause"}]},
        {"pending": "3"},
    ],
)
def test_malformed_plan_answers_are_refused(answer: object) -> None:
    with pytest.raises(InvalidInput):
        prediction_from_api(answer)


def test_malformed_why_answers_are_refused() -> None:
    with pytest.raises(InvalidInput):
        explanation_from_api({"name": "a", "machines": [{"id": "m", "checks": [{}]}]})
    with pytest.raises(InvalidInput):
        explanation_from_api({"name": "a", "global": "yes"})
    assert explanation_from_api({"name": "a"}).machines == ()
    assert Result("fail") is Result.FAIL
