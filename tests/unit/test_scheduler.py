"""fleetd.engine.scheduler: a table of cases per constraint and reason, Hypothesis invariants."""

from __future__ import annotations

import fnmatch
import random
from collections.abc import Mapping
from typing import TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetd.agent.plan import desired_for_machine
from fleetd.engine.scheduler import SchedulePlan, plan_schedule
from fleetd.feasibility import conflict_between, describe_metadata, global_units_for, metadata_ok
from fleetd.model import Machine, Requirements, ScheduledUnit, TargetState, Unit

HASH = "5" * 40


def diff_schedule(
    current: Mapping[str, str], plan: SchedulePlan
) -> tuple[dict[str, str], dict[str, str]]:
    """(to unschedule: unit -> old machine, to schedule: unit -> new machine) from `current`
    to the plan's assignments; a unit that moves is in both (what engine/plan.py writes)."""
    gone = {n: m for n, m in sorted(current.items()) if plan.assignments.get(n) != m}
    new = {n: m for n, m in plan.assignments.items() if current.get(n) != m}
    return gone, new


LAUNCHED = TargetState.LAUNCHED
LOADED = TargetState.LOADED
INACTIVE = TargetState.INACTIVE


def meta(**pairs: str | set[str]) -> tuple[tuple[str, frozenset[str]], ...]:
    """A MachineMetadata requirement: meta(region="east") or meta(region={"east", "west"})."""
    return tuple(
        sorted((key, frozenset([v] if isinstance(v, str) else v)) for key, v in pairs.items())
    )


def machines(*specs: str | tuple[str, dict[str, str]]) -> dict[str, Machine]:
    out = {}
    for spec in specs:
        machine_id, metadata = (spec, {}) if isinstance(spec, str) else spec
        out[machine_id] = Machine.make(machine_id, metadata=metadata)
    return out


def units(*names: str, state: TargetState = LAUNCHED) -> dict[str, Unit]:
    return {name: Unit(name, HASH, state) for name in names}


def plan(
    unit_reqs: Mapping[str, Requirements],
    cluster: Mapping[str, Machine],
    current: Mapping[str, str] | None = None,
    states: Mapping[str, TargetState] | None = None,
) -> SchedulePlan:
    """Plan with every unit in `unit_reqs` launched unless `states` says otherwise."""
    states = states or {}
    all_units = {n: Unit(n, HASH, states.get(n, LAUNCHED)) for n in unit_reqs}
    return plan_schedule(all_units, unit_reqs, cluster, current or {})


NONE = Requirements()
V = TypeVar("V")
THREE = machines("m1", "m2", "m3")


# --- placement reasons, one constraint at a time ------------------------------------------------

UNPLACED_CASES = [
    pytest.param({"a.service": NONE}, {}, "a.service", "no machines registered", id="no-machines"),
    pytest.param(
        {"a.service": Requirements(machine_id="abc")},
        THREE,
        "a.service",
        "MachineID=abc is not a registered machine",
        id="machine-id-unknown",
    ),
    pytest.param(
        {"a.service": Requirements(metadata=meta(region="us-east"))},
        machines(("m1", {"region": "eu"}), "m2", "m3"),
        "a.service",
        "no machine has metadata region=us-east (machines: 3)",
        id="metadata-nowhere",
    ),
    pytest.param(
        {"a.service": Requirements(metadata=meta(region={"a", "b"}, disk="ssd"))},
        machines(("m1", {"region": "a"}), ("m2", {"disk": "ssd"})),
        "a.service",
        "no machine has metadata disk=ssd region=a|b (machines: 2)",
        id="metadata-and-across-keys",
    ),
    pytest.param(
        {"app.service": Requirements(machine_of=("db.service",))},
        THREE,
        "app.service",
        "MachineOf peer db.service is not scheduled (no such unit)",
        id="machine-of-unknown-peer",
    ),
    pytest.param(
        {"app.service": Requirements(machine_of=("db.service",)), "db.service": NONE},
        THREE,
        "app.service",
        "MachineOf peer db.service is not scheduled (target state inactive)",
        id="machine-of-inactive-peer",
    ),
    pytest.param(
        {
            "app.service": Requirements(machine_of=("db.service",)),
            "db.service": Requirements(metadata=meta(region="mars")),
        },
        THREE,
        "app.service",
        "MachineOf peer db.service is not scheduled",
        id="machine-of-unplaced-peer",
    ),
    pytest.param(
        {
            "a.service": Requirements(machine_of=("b.service",)),
            "b.service": Requirements(machine_of=("a.service",)),
        },
        THREE,
        "a.service",
        "MachineOf cycle a.service -> b.service -> a.service cannot be scheduled",
        id="machine-of-cycle",
    ),
    pytest.param(
        {
            "app.service": Requirements(machine_of=("x.service", "y.service")),
            "x.service": Requirements(machine_id="m1"),
            "y.service": Requirements(machine_id="m2"),
        },
        THREE,
        "app.service",
        "MachineOf peers are not on one machine: x.service on m1, y.service on m2",
        id="machine-of-split-peers",
    ),
    pytest.param(
        {
            "app.service": Requirements(machine_of=("db.service",), metadata=meta(disk="ssd")),
            "db.service": Requirements(machine_id="m1"),
        },
        THREE,
        "app.service",
        "MachineOf db.service: machine m1 fails MachineMetadata disk=ssd",
        id="machine-of-peer-machine-fails",
    ),
    pytest.param(
        {
            "a.service": Requirements(machine_id="m1", conflicts=("b*",)),
            "b.service": Requirements(machine_id="m1"),
        },
        THREE,
        "b.service",
        "MachineID=m1: machine m1 runs a conflicting unit (a.service conflicts with b*)",
        id="machine-id-conflict",
    ),
    pytest.param(
        {f"hello@{i}.service": Requirements(conflicts=("hello@*.service",)) for i in (1, 2, 3, 4)},
        THREE,
        "hello@4.service",
        "every candidate machine runs a conflicting unit "
        "(hello@4.service conflicts with hello@*.service)",
        id="conflict-everywhere",
    ),
    pytest.param(
        {
            "x.service": Requirements(metadata=meta(region="east"), conflicts=("w.service",)),
            "w.service": Requirements(machine_id="m1"),
        },
        machines(("m1", {"region": "east"}), ("m2", {"region": "west"}), "m3"),
        "x.service",
        "no machine can run it (3 machines): 2 fail MachineMetadata region=east, "
        "1 runs a conflicting unit (x.service conflicts with w.service)",
        id="aggregated-reasons",
    ),
    pytest.param(
        {"x.service": NONE, "g.service": Requirements(is_global=True, conflicts=("x.*",))},
        machines("m1", "m2"),
        "x.service",
        "every candidate machine runs a conflicting unit (g.service conflicts with x.*)",
        id="conflict-with-global-everywhere",
    ),
]


@pytest.mark.parametrize(("unit_reqs", "cluster", "unit", "reason"), UNPLACED_CASES)
def test_unplaced_reason(
    unit_reqs: dict[str, Requirements], cluster: dict[str, Machine], unit: str, reason: str
) -> None:
    states = {"db.service": INACTIVE} if "inactive" in reason else None
    result = plan(unit_reqs, cluster, states=states)
    assert unit not in result.assignments
    assert result.unplaced[unit] == reason


# --- where units go --------------------------------------------------------------------------

PLACEMENT_CASES = [
    pytest.param({"a.service": NONE}, THREE, {}, {"a.service": "m1"}, id="tie-lowest-id"),
    pytest.param(
        {"a.service": NONE, "b.service": NONE, "c.service": NONE, "d.service": NONE},
        machines("m2", "m10", "m1"),
        {},
        {"a.service": "m1", "b.service": "m10", "c.service": "m2", "d.service": "m1"},
        id="tie-by-id-as-string",
    ),
    pytest.param(
        {"a.service": Requirements(machine_id="m3"), "b.service": Requirements(machine_id="m3")},
        THREE,
        {},
        {"a.service": "m3", "b.service": "m3"},
        id="machine-id-ignores-load",
    ),
    pytest.param(
        {"a.service": Requirements(machine_id="abcdef12")},
        machines("abcdef1234567890", "m2"),
        {},
        {"a.service": "abcdef1234567890"},
        id="machine-id-short",
    ),
    pytest.param(
        {"a.service": Requirements(metadata=meta(region={"east", "west"}))},
        machines(("m1", {"region": "north"}), ("m2", {"region": "west"})),
        {},
        {"a.service": "m2"},
        id="metadata-or-within-key",
    ),
    pytest.param(
        {"app.service": Requirements(machine_of=("zdb.service",)), "zdb.service": NONE},
        THREE,
        {"x.service": "m1"},
        {"app.service": "m2", "zdb.service": "m2"},
        id="machine-of-peer-placed-first",
    ),
    pytest.param(
        {
            "a.service": Requirements(machine_of=("b.service",)),
            "b.service": Requirements(machine_of=("c.service",)),
            "c.service": NONE,
            "z.service": NONE,
        },
        THREE,
        {},
        {"a.service": "m1", "b.service": "m1", "c.service": "m1", "z.service": "m2"},
        id="machine-of-chain",
    ),
    pytest.param(
        {
            "a.service": Requirements(machine_of=("g.service",)),
            "g.service": Requirements(is_global=True, metadata=meta(role="db")),
        },
        machines("m1", ("m2", {"role": "db"}), "m3"),
        {},
        {"a.service": "m2"},
        id="machine-of-global-peer",
    ),
    pytest.param(
        {"a.service": Requirements(conflicts=("b.service",)), "b.service": NONE},
        machines("m1", "m2"),
        {"c.service": "m2"},
        {"a.service": "m1", "b.service": "m2"},
        id="conflict-own-pattern",
    ),
    pytest.param(
        {"a.service": NONE, "b.service": Requirements(conflicts=("a.*",))},
        machines("m1", "m2"),
        {},
        {"a.service": "m1", "b.service": "m2"},
        id="conflict-other-pattern",
    ),
    pytest.param(
        {f"hello@{i}.service": NONE for i in (1, 2, 3)},
        THREE,
        {},
        {"hello@1.service": "m1", "hello@2.service": "m2", "hello@3.service": "m3"},
        id="template-instances-spread",
    ),
    pytest.param(
        {"a.service": NONE, "b.service": NONE, "g.service": Requirements(is_global=True)},
        THREE,
        {},
        {"a.service": "m1", "b.service": "m2"},
        id="global-everywhere-equal-load",
    ),
    pytest.param(
        {
            "a.service": NONE,
            "b.service": NONE,
            "g.service": Requirements(is_global=True, metadata=meta(role="web")),
        },
        machines(("m1", {"role": "web"}), "m2", "m3"),
        {},
        {"a.service": "m2", "b.service": "m3"},
        id="global-counted-in-load",
    ),
    pytest.param(
        {
            "a.service": NONE,
            "g.service": Requirements(is_global=True, conflicts=("a.*",), metadata=meta(x="y")),
        },
        machines(("m1", {"x": "y"}), "m2"),
        {},
        {"a.service": "m2"},
        id="global-conflict-avoided",
    ),
]


@pytest.mark.parametrize(("unit_reqs", "cluster", "busy", "expected"), PLACEMENT_CASES)
def test_placement(
    unit_reqs: dict[str, Requirements],
    cluster: dict[str, Machine],
    busy: dict[str, str],
    expected: dict[str, str],
) -> None:
    """`busy` units (no requirements) are already scheduled, to load some machines."""
    result = plan({**unit_reqs, **dict.fromkeys(busy, NONE)}, cluster, current=busy)
    for name, machine_id in expected.items():
        assert result.assignments[name] == machine_id, result
    assert not result.unplaced


def test_least_loaded_spreads_nine_units_three_each() -> None:
    result = plan({f"u{i}.service": NONE for i in range(9)}, THREE)
    loads = sorted(list(result.assignments.values()).count(m) for m in THREE)
    assert loads == [3, 3, 3]


def test_disable_engine_machine_still_runs_units() -> None:
    cluster = {"m1": Machine.make("m1", disable_engine=True)}
    assert plan({"a.service": NONE}, cluster).assignments == {"a.service": "m1"}


def test_template_instances_share_a_hash_and_still_conflict_by_name() -> None:
    reqs = {f"hello@{i}.service": Requirements(conflicts=("hello@*.service",)) for i in (1, 2, 3)}
    result = plan(reqs, THREE)
    assert sorted(result.assignments.values()) == ["m1", "m2", "m3"]


# --- keeping what is scheduled -----------------------------------------------------------------


def test_no_churn_when_a_machine_joins() -> None:
    current = {"a.service": "m1", "b.service": "m1", "c.service": "m2"}
    reqs = {**dict.fromkeys(current, NONE), "new.service": NONE}
    result = plan(reqs, THREE, current)
    assert {n: result.assignments[n] for n in current} == current
    assert result.assignments["new.service"] == "m3"
    assert diff_schedule(current, result) == ({}, {"new.service": "m3"})


def test_machine_loss_moves_only_that_machines_units() -> None:
    current = {"a.service": "m1", "b.service": "m2", "c.service": "m2", "d.service": "m3"}
    result = plan(dict.fromkeys(current, NONE), machines("m1", "m3"), current)
    assert result.assignments["a.service"] == "m1"
    assert result.assignments["d.service"] == "m3"
    assert result.reasons == {
        "b.service": "machine m2 went away",
        "c.service": "machine m2 went away",
    }
    assert set(result.moves) == {"b.service", "c.service"}
    assert all(old == "m2" for old, _ in result.moves.values())


UNSCHEDULE_CASES = [
    pytest.param(
        {"a.service": NONE}, {"a.service": INACTIVE}, THREE, "target state inactive", id="inactive"
    ),
    pytest.param({}, {}, THREE, "unit no longer exists", id="destroyed"),
    pytest.param(
        {"a.service": Requirements(is_global=True)}, {}, THREE, "unit is global", id="now-global"
    ),
    pytest.param({"a.service": NONE}, {}, machines("m2"), "machine m1 went away", id="lost"),
    pytest.param(
        {"a.service": Requirements(machine_id="m2")},
        {},
        THREE,
        "constraint no longer holds: MachineID=m2",
        id="machine-id-changed",
    ),
    pytest.param(
        {"a.service": Requirements(metadata=meta(region="west"))},
        {},
        machines(("m1", {"region": "east"}), ("m2", {"region": "west"})),
        "constraint no longer holds: MachineMetadata region=west",
        id="metadata-changed",
    ),
]


@pytest.mark.parametrize(("unit_reqs", "states", "cluster", "reason"), UNSCHEDULE_CASES)
def test_unschedule_reason(
    unit_reqs: dict[str, Requirements],
    states: dict[str, TargetState],
    cluster: dict[str, Machine],
    reason: str,
) -> None:
    result = plan(unit_reqs, cluster, {"a.service": "m1"}, states)
    assert result.reasons == {"a.service": reason}
    assert result.assignments.get("a.service") != "m1"
    to_unschedule, _ = diff_schedule({"a.service": "m1"}, result)
    assert to_unschedule == {"a.service": "m1"}


def test_inactive_units_are_neither_assigned_nor_unplaced() -> None:
    result = plan({"a.service": NONE}, THREE, states={"a.service": INACTIVE})
    assert result == SchedulePlan()


def test_kept_units_that_now_conflict_first_name_wins() -> None:
    reqs = {"a.service": Requirements(conflicts=("b.service",)), "b.service": NONE}
    result = plan(reqs, machines("m1", "m2"), {"a.service": "m1", "b.service": "m1"})
    assert result.assignments == {"a.service": "m1", "b.service": "m2"}
    assert result.reasons == {
        "b.service": "constraint no longer holds: conflicts with a.service "
        "(a.service conflicts with b.service)"
    }


def test_kept_unit_conflicting_with_new_global_moves() -> None:
    global_req = Requirements(is_global=True, conflicts=("a.service",), metadata=meta(g="1"))
    reqs = {"a.service": NONE, "g.service": global_req}
    cluster = machines(("m1", {"g": "1"}), "m2")
    result = plan(reqs, cluster, {"a.service": "m1"})
    assert result.moves == {"a.service": ("m1", "m2")}
    assert result.reasons["a.service"].startswith("constraint no longer holds: conflicts with g")


def test_follower_leaves_with_its_peer() -> None:
    reqs = {"db.service": NONE, "app.service": Requirements(machine_of=("db.service",))}
    current = {"db.service": "m1", "app.service": "m1"}
    result = plan(reqs, THREE, current, states={"db.service": INACTIVE})
    assert result.assignments == {}
    assert result.reasons == {
        "db.service": "target state inactive",
        "app.service": "constraint no longer holds: MachineOf peer db.service is not on machine m1",
    }
    assert result.unplaced == {
        "app.service": "MachineOf peer db.service is not scheduled (target state inactive)"
    }


def test_machine_of_follows_peer_to_new_machine() -> None:
    reqs = {"db.service": NONE, "app.service": Requirements(machine_of=("db.service",))}
    current = {"db.service": "m1", "app.service": "m1", "x.service": "m2"}
    reqs["x.service"] = NONE
    result = plan(reqs, machines("m2", "m3"), current)
    assert result.assignments["db.service"] == result.assignments["app.service"] == "m3"


def test_co_located_machine_of_cycle_is_kept() -> None:
    reqs = {
        "a.service": Requirements(machine_of=("b.service",)),
        "b.service": Requirements(machine_of=("a.service",)),
    }
    current = {"a.service": "m1", "b.service": "m1"}
    assert plan(reqs, THREE, current).assignments == current


# --- Replaces ----------------------------------------------------------------------------------


def test_replaced_unit_moves_to_least_loaded_machine_that_can_run_it() -> None:
    reqs = {
        "new.service": Requirements(replaces=("old.service",)),
        "old.service": Requirements(conflicts=("busy.service",)),
        "busy.service": NONE,
    }
    current = {"new.service": "m1", "old.service": "m1", "busy.service": "m2"}
    result = plan(reqs, machines("m1", "m2", "m3"), current)
    assert result.assignments == {"new.service": "m1", "old.service": "m3", "busy.service": "m2"}
    assert result.reasons == {"old.service": "replaced by new.service"}
    assert result.moves == {"old.service": ("m1", "m3")}


def test_replaced_unit_with_nowhere_to_go_is_unplaced() -> None:
    reqs = {"new.service": Requirements(replaces=("old*",)), "old.service": NONE}
    current = {"new.service": "m1", "old.service": "m1"}
    result = plan(reqs, machines("m1"), current)
    assert result.assignments == {"new.service": "m1"}
    assert result.reasons == {"old.service": "replaced by new.service"}
    assert result.unplaced == {
        "old.service": "machine m1 runs a unit that replaces it (new.service)"
    }


def test_circular_replaces_is_ignored() -> None:
    reqs = {
        "a.service": Requirements(replaces=("b*",)),
        "b.service": Requirements(replaces=("a*",)),
    }
    current = {"a.service": "m1", "b.service": "m1"}
    assert plan(reqs, THREE, current).assignments == current


def test_fleets_schedule_replace_scenario() -> None:
    # fleet's functional TestScheduleReplace: replace.0 alone on m0, replace.1 and its MachineOf
    # follower replace.2 on m1. replace-kick0 (Replaces=replace.0) takes m0, the least loaded,
    # and replace.0 moves to m1.
    reqs = {
        "replace.0.service": NONE,
        "replace.1.service": NONE,
        "replace.2.service": Requirements(machine_of=("replace.1.service",)),
        "replace-kick0.service": Requirements(replaces=("replace.0.service",)),
    }
    current = {"replace.0.service": "m0", "replace.1.service": "m1", "replace.2.service": "m1"}
    result = plan(reqs, machines("m0", "m1"), current)
    assert result.assignments == {
        "replace-kick0.service": "m0",
        "replace.0.service": "m1",
        "replace.1.service": "m1",
        "replace.2.service": "m1",
    }
    assert result.moves == {"replace.0.service": ("m0", "m1")}
    assert result.reasons == {"replace.0.service": "replaced by replace-kick0.service"}


def test_machine_of_a_replaced_unit_counts_as_free_in_load_order() -> None:
    # As fleet's Decide: the machine running old.service is a candidate with old.service in its
    # load; on a tie the lower id wins, so new.service takes m1 and old.service moves.
    reqs = {
        "new.service": Requirements(replaces=("old.service",)),
        "old.service": NONE,
        "x.service": NONE,
    }
    current = {"old.service": "m1", "x.service": "m2"}
    result = plan(reqs, machines("m1", "m2"), current)
    assert result.assignments == {"new.service": "m1", "old.service": "m2", "x.service": "m2"}
    assert result.moves == {"old.service": ("m1", "m2")}
    assert result.reasons == {"old.service": "replaced by new.service"}


def test_a_less_loaded_machine_still_wins_over_the_replaced_units_machine() -> None:
    # fleet places by load only: with an empty machine, new.service goes there and nothing moves.
    reqs = {"new.service": Requirements(replaces=("old.service",)), "old.service": NONE}
    current = {"old.service": "m1"}
    result = plan(reqs, machines("m1", "m2"), current)
    assert result.assignments == {"new.service": "m2", "old.service": "m1"}
    assert result.moves == {}


def test_replaced_unit_that_fits_nowhere_else_keeps_its_machine() -> None:
    # m1 is the least loaded, but old.service runs only in the east: fleet would move it to m2
    # anyway (its DecideReschedule checks nothing); here m1 is passed over for m2.
    east = ("m1", {"region": "east"})
    reqs = {
        "new.service": Requirements(replaces=("old.service",)),
        "old.service": Requirements(metadata=meta(region="east")),
        "x.service": NONE,
        "y.service": NONE,
    }
    current = {"old.service": "m1", "x.service": "m2", "y.service": "m2"}
    result = plan(reqs, machines(east, "m2"), current)
    assert result.assignments == {**current, "new.service": "m2"}
    assert result.moves == {}


def test_new_replacing_unit_displaces_when_it_must() -> None:
    reqs = {
        "db.service": Requirements(machine_id="m1"),
        "new.service": Requirements(machine_of=("db.service",), replaces=("old.service",)),
        "old.service": NONE,
    }
    current = {"db.service": "m1", "old.service": "m1"}
    result = plan(reqs, machines("m1", "m2"), current)
    assert result.assignments == {"db.service": "m1", "new.service": "m1", "old.service": "m2"}
    assert result.reasons == {"old.service": "replaced by new.service"}


def test_displacing_refused_when_replaced_unit_cannot_move() -> None:
    reqs = {
        "db.service": Requirements(machine_id="m1"),
        "new.service": Requirements(machine_of=("db.service",), replaces=("old.service",)),
        "old.service": Requirements(machine_id="m1"),
    }
    current = {"db.service": "m1", "old.service": "m1"}
    result = plan(reqs, machines("m1", "m2"), current)
    assert result.assignments == current
    assert result.unplaced == {
        "new.service": "MachineOf db.service: machine m1 would have to move old.service "
        "(it has MachineID=m1)"
    }


# --- helpers -----------------------------------------------------------------------------------


def test_global_units_for_metadata_and_alphabetical_conflicts() -> None:
    globals_ = {
        "b.service": Requirements(is_global=True, conflicts=("c.service",)),
        "c.service": Requirements(is_global=True),
        "a.service": Requirements(is_global=True, metadata=meta(role="web")),
        "d.service": Requirements(is_global=True),
    }
    web = Machine.make("m1", metadata={"role": "web"})
    assert global_units_for(web, globals_) == ["a.service", "b.service", "d.service"]
    assert global_units_for(Machine.make("m2"), globals_) == ["b.service", "d.service"]


def test_diff_schedule_lists_moves_in_both() -> None:
    result = SchedulePlan(assignments={"a": "m1", "b": "m3", "c": "m2"})
    current = {"a": "m1", "b": "m2", "d": "m2"}
    assert diff_schedule(current, result) == ({"b": "m2", "d": "m2"}, {"b": "m3", "c": "m2"})


def test_describe_metadata() -> None:
    assert (
        describe_metadata(meta(region={"west", "east"}, disk="ssd")) == "disk=ssd region=east|west"
    )


@pytest.mark.parametrize(
    ("pattern", "other", "expected"),
    [
        ("hello@*.service", "hello@1.service", True),
        ("a*", "a/b", False),  # Go's path.Match: "*" never crosses "/"
        ("[^a]x.service", "bx.service", True),
        ("[ab].service", "c.service", False),
        ("web\\*", "web*", True),
        ("[a-", "a", False),  # malformed: matches nothing
    ],
)
def test_conflicts_use_go_glob_semantics(pattern: str, other: str, expected: bool) -> None:
    assert (conflict_between("p.service", (pattern,), other, ()) is not None) is expected


def test_conflict_between_is_symmetric_and_never_self() -> None:
    assert conflict_between("a", ("b*",), "bx", ()) == "a conflicts with b*"
    assert conflict_between("bx", (), "a", ("b*",)) == "a conflicts with b*"
    assert conflict_between("a", ("a*",), "a", ("a*",)) is None


# --- scale -------------------------------------------------------------------------------------


def test_ten_thousand_units_on_a_thousand_machines() -> None:
    """Correctness at benchmark scale (timing lives in benchmarks/bench_scheduler.py)."""
    cluster = {f"m{i:04d}": Machine.make(f"m{i:04d}") for i in range(1000)}
    reqs = {f"u{i:05d}.service": NONE for i in range(10_000)}
    result = plan(reqs, cluster)
    assert len(result.assignments) == 10_000
    loads = [0] * 1000
    for machine_id in result.assignments.values():
        loads[int(machine_id[1:])] += 1
    assert set(loads) == {10}
    cluster.pop("m0007")
    again = plan(reqs, cluster, result.assignments)
    assert set(again.moves) == {n for n, m in result.assignments.items() if m == "m0007"}


# --- Hypothesis invariants ---------------------------------------------------------------------

NAMES = [
    "a.service",
    "b.service",
    "db.service",
    "web@1.service",
    "web@2.service",
    "web@3.service",
    "g.service",
    "h.service",
]
PATTERNS = ["a.service", "web@*.service", "*", "?.service", "[ab].service", "db.*", "nomatch"]
MACHINE_IDS = ["m1", "m2", "m3", "m4", "abcdefgh0001"]


def patterns(pool: list[str], max_size: int) -> st.SearchStrategy[tuple[str, ...]]:
    return st.one_of(st.just(()), st.lists(st.sampled_from(pool), max_size=max_size).map(tuple))


# Mixed constraints; MachineID/MachineOf/Replaces together are rare, as in real unit files.
mixed_requirements = st.builds(
    Requirements,
    machine_id=st.one_of(st.none(), st.none(), st.sampled_from(["m1", "abcdefgh", "unknown"])),
    machine_of=patterns(NAMES, 2),
    metadata=st.one_of(
        st.just(()),
        st.sampled_from([meta(region="east"), meta(region={"east", "west"}), meta(disk="ssd")]),
    ),
    conflicts=patterns(PATTERNS, 2),
    is_global=st.sampled_from([False, False, False, True]),
    replaces=patterns(PATTERNS, 1),
)

# Pinned units that replace others: this is what makes a new unit displace a running one.
replacing_requirements = st.builds(
    Requirements,
    machine_id=st.sampled_from([None, None, "m1"]),
    machine_of=patterns(["a.service", "db.service"], 1),
    conflicts=patterns(["web@*.service", "b.service"], 1),
    is_global=st.sampled_from([False, False, False, False, True]),
    replaces=st.lists(st.sampled_from(PATTERNS[:5]), min_size=1, max_size=2).map(tuple),
)


@st.composite
def clusters(
    draw: st.DrawFn,
) -> tuple[dict[str, Unit], dict[str, Requirements], dict[str, Machine], dict[str, str]]:
    machine_ids = draw(st.lists(st.sampled_from(MACHINE_IDS), unique=True, max_size=5))
    metadata = st.fixed_dictionaries(
        {}, optional={"region": st.sampled_from(["east", "west"]), "disk": st.just("ssd")}
    )
    cluster = {m: Machine.make(m, metadata=draw(metadata)) for m in machine_ids}
    names = draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=len(NAMES)))
    state = st.sampled_from([LAUNCHED, LAUNCHED, LOADED, INACTIVE])
    all_units = {n: Unit(n, HASH, draw(state)) for n in names}
    plain = st.just(NONE)
    each = st.one_of(plain, mixed_requirements, replacing_requirements)
    reqs = {n: draw(each) for n in names}
    current: dict[str, str] = {}
    if names:
        unit_names = st.sampled_from([*names, "gone.service"])
        where = st.sampled_from([*machine_ids, "gone"])
        current = draw(st.dictionaries(unit_names, where, max_size=len(names)))
    return all_units, reqs, cluster, current


Cluster = tuple[dict[str, Unit], dict[str, Requirements], dict[str, Machine], dict[str, str]]


def _oracle_match(pattern: str, name: str) -> bool:
    # fnmatch equals path.Match for the PATTERNS above (no "/", no negated class).
    return fnmatch.fnmatchcase(name, pattern)


def _oracle_conflict(a: str, ra: Requirements, b: str, rb: Requirements) -> bool:
    if a == b:
        return False
    return any(_oracle_match(p, b) for p in ra.conflicts) or any(
        _oracle_match(p, a) for p in rb.conflicts
    )


def _oracle_replaces(a: str, ra: Requirements, b: str, rb: Requirements) -> bool:
    """a replaces b in exactly one direction."""
    forward = any(_oracle_match(p, b) for p in ra.replaces)
    backward = any(_oracle_match(p, a) for p in rb.replaces)
    return a != b and forward and not backward


def _active_globals(cluster: Cluster) -> dict[str, Requirements]:
    all_units, reqs, _, _ = cluster
    return {
        n: reqs[n] for n, u in all_units.items() if reqs[n].is_global and u.target_state != INACTIVE
    }


def _oracle_globals_on(machine: Machine, globals_: dict[str, Requirements]) -> list[str]:
    """Each global unit runs where its metadata matches, unless an earlier name conflicts."""
    running: list[str] = []
    for name in sorted(globals_):
        req = globals_[name]
        if not metadata_ok(req.metadata, machine.metadata_dict):
            continue
        if any(_oracle_conflict(name, req, other, globals_[other]) for other in running):
            continue
        running.append(name)
    return running


def check_invariants(cluster: Cluster, result: SchedulePlan) -> None:
    all_units, reqs, machines_, _ = cluster
    jobs = {n for n, u in all_units.items() if not reqs[n].is_global and u.target_state != INACTIVE}
    assert set(result.assignments) | set(result.unplaced) == jobs
    assert not set(result.assignments) & set(result.unplaced)
    assert all(result.unplaced.values())
    globals_ = _active_globals(cluster)
    for machine_id, machine in machines_.items():
        on_machine = sorted(n for n, m in result.assignments.items() if m == machine_id)
        running_globals = _oracle_globals_on(machine, globals_)
        assert global_units_for(machine, globals_) == running_globals
        here = on_machine + running_globals
        for name in on_machine:
            req = reqs[name]
            assert req.machine_id is None or machine.matches_id(req.machine_id)
            assert metadata_ok(req.metadata, machine.metadata_dict)
            assert all(peer in here for peer in req.machine_of if peer != name)
            for other in on_machine:
                assert not _oracle_replaces(other, reqs[other], name, req)
        for i, name in enumerate(here):
            for other in here[i + 1 :]:
                assert not _oracle_conflict(name, reqs[name], other, reqs[other])
        # The agent runs exactly what the engine planned: nothing is skipped for a conflict.
        scheduled = [
            ScheduledUnit(n, m, HASH, all_units[n].target_state)
            for n, m in result.assignments.items()
        ]
        global_pairs = {n: (all_units[n], reqs[n]) for n in globals_}
        desired = desired_for_machine(machine, scheduled, global_pairs, reqs)
        assert sorted(desired) == sorted(here)
    assert all(m in machines_ for m in result.assignments.values())


@settings(max_examples=400, deadline=None)
@given(clusters())
def test_plan_satisfies_every_constraint(cluster: Cluster) -> None:
    check_invariants(cluster, plan_schedule(*cluster))


@settings(max_examples=400, deadline=None)
@given(clusters())
def test_planning_again_on_the_result_changes_nothing(cluster: Cluster) -> None:
    all_units, reqs, machines_, _ = cluster
    first = plan_schedule(*cluster)
    second = plan_schedule(all_units, reqs, machines_, first.assignments)
    assert second.assignments == first.assignments
    assert second.unplaced.keys() == first.unplaced.keys()
    assert second.moves == {}
    assert second.reasons == {}
    assert diff_schedule(first.assignments, second) == ({}, {})


@settings(max_examples=300, deadline=None)
@given(clusters(), st.data())
def test_units_on_surviving_machines_stay(cluster: Cluster, data: st.DataObject) -> None:
    all_units, reqs, machines_, _ = cluster
    first = plan_schedule(*cluster)
    lost = data.draw(st.sets(st.sampled_from(sorted(machines_)))) if machines_ else set()
    survivors = {m: machine for m, machine in machines_.items() if m not in lost}
    second = plan_schedule(all_units, reqs, survivors, first.assignments)
    check_invariants((all_units, reqs, survivors, first.assignments), second)
    for name, machine_id in first.assignments.items():
        if machine_id in survivors and second.assignments.get(name) != machine_id:
            # The one allowed move: a unit from a lost machine that Replaces it needed the room.
            assert second.reasons[name].startswith("replaced by "), second


@settings(max_examples=300, deadline=None)
@given(clusters(), st.data())
def test_no_unit_moves_when_a_machine_joins(cluster: Cluster, data: st.DataObject) -> None:
    all_units, reqs, machines_, _ = cluster
    first = plan_schedule(*cluster)
    joined = {
        **machines_,
        "m9": Machine.make("m9", metadata=data.draw(st.sampled_from([{}, {"region": "east"}]))),
    }
    second = plan_schedule(all_units, reqs, joined, first.assignments)
    for name in second.moves:
        assert second.reasons[name].startswith("replaced by "), second


@settings(max_examples=300, deadline=None)
@given(clusters(), st.randoms(use_true_random=False))
def test_plan_is_independent_of_dict_order(cluster: Cluster, rnd: random.Random) -> None:
    def shuffled(mapping: Mapping[str, V]) -> dict[str, V]:
        items = list(mapping.items())
        rnd.shuffle(items)
        return dict(items)

    all_units, reqs, machines_, current = cluster
    reordered = plan_schedule(
        shuffled(all_units), shuffled(reqs), shuffled(machines_), shuffled(current)
    )
    assert reordered == plan_schedule(*cluster)
