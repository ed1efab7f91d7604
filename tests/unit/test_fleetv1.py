"""Reading fleet v1.0's v2 keyspace and planning the migration (fleetctl/fleetv1.py): pure."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from fleetctl.fleetv1 import (
    Action,
    Existing,
    FleetMachine,
    FleetUnit,
    SourceError,
    decode_unit_hash,
    normalize_fleet_prefix,
    parse_keyspace,
    plan,
    plan_metadata,
    plan_unit,
    report,
)
from fleetctl.migrate import keys_url
from fleetd.model import TargetState

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "fleet-v1.0-keyspace.json"
P = "/_coreos.com/fleet/"
HELLO = "[Unit]\nDescription=Hello World\n\n[Service]\nExecStart=/bin/sleep 1\n"
HELLO_HASH = hashlib.sha1(HELLO.encode()).hexdigest()


def leaf(key: str, value: str) -> dict[str, Any]:
    return {"key": P + key, "value": value}


def tree(*leaves: dict[str, Any]) -> dict[str, Any]:
    """A v2 GET response; a flat directory is enough for the parser (it reads leaf keys)."""
    return {"action": "get", "node": {"key": P.rstrip("/"), "dir": True, "nodes": list(leaves)}}


def job(name: str, hash_: str, state: str | None = "launched") -> list[dict[str, Any]]:
    obj = json.dumps({"Name": name, "UnitHash": list(bytes.fromhex(hash_))})
    out = [leaf(f"job/{name}/object", obj)]
    if state is not None:
        out.append(leaf(f"job/{name}/target-state", state))
    return out


def body(raw: str) -> dict[str, Any]:
    return leaf(f"unit/{hashlib.sha1(raw.encode()).hexdigest()}", json.dumps({"Raw": raw}))


def test_recorded_fixture_parses() -> None:
    source = parse_keyspace(json.loads(FIXTURE.read_text()))
    names = [u.name for u in source.units]
    assert names == sorted(names)
    assert len(names) == 9
    assert source.bodies == 7
    hello = next(u for u in source.units if u.name == "hello.service")
    assert hello.hash == "e55c0aeb44ba0b68004ceb8a200e685194448b45"
    assert hello.target_state == "launched"
    assert hello.target_machine == "2c9f1a0d7a2b4e3f8c1d5e6f7a8b9c0d"
    assert hello.raw is not None
    assert hello.raw.startswith("[Unit]\nDescription=Hello World\n")
    first, second = source.machines
    assert (first.public_ip, first.version, first.present) == ("10.0.0.11", "1.0.0", True)
    assert first.metadata == {"disk": "ssd", "region": "us-east"}
    assert first.dynamic == {"role": "monitor"}
    assert second.dynamic == {"role": ""}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (list(range(20)), bytes(range(20)).hex()),
        ("ab" * 20, "ab" * 20),
        ("AB" * 20, "ab" * 20),
    ],
)
def test_unit_hash_forms(value: Any, expected: str) -> None:
    assert decode_unit_hash(value) == expected


@pytest.mark.parametrize(
    "value", [list(range(19)), [256] * 20, [True] * 20, "zz" * 20, None, "ab" * 19, 5]
)
def test_bad_unit_hash(value: Any) -> None:
    with pytest.raises(ValueError, match="UnitHash is not a SHA1 hash"):
        decode_unit_hash(value)


def test_prefix_and_url() -> None:
    assert normalize_fleet_prefix("/_coreos.com/fleet") == P
    assert normalize_fleet_prefix(P) == P
    with pytest.raises(SourceError):
        normalize_fleet_prefix("fleet/")
    assert keys_url("http://h:2379/", P) == (
        "http://h:2379/v2/keys/_coreos.com/fleet?recursive=true&sorted=true"
    )


def test_not_a_v2_response() -> None:
    with pytest.raises(SourceError, match="no node"):
        parse_keyspace({"errorCode": 100})


def test_nested_directories_and_other_keys() -> None:
    response = tree(
        {"key": P + "job", "dir": True, "nodes": job("a.service", HELLO_HASH)},
        body(HELLO),
        leaf("states/a.service/m1", "{}"),
        leaf("job/a.service/job-state", "m1"),
        leaf("engine/lease", "x"),
        {"key": "/elsewhere/x", "value": "y"},
    )
    source = parse_keyspace(response)
    assert [u.name for u in source.units] == ["a.service"]
    assert source.units[0].raw == HELLO
    assert source.ignored == {"engine": 1, "states": 1}


@pytest.mark.parametrize(
    ("leaves", "problem"),
    [
        ([leaf("job/a.service/target-state", "launched")], "no job object in fleet"),
        ([leaf("job/a.service/object", "{")], "job object is not JSON"),
        ([leaf("job/a.service/object", "[]")], "job object is not a JSON object"),
        (
            [leaf("job/a.service/object", json.dumps({"Name": "b.service", "UnitHash": [0] * 20}))],
            "job object names 'b.service', not 'a.service'",
        ),
        (job("a.service", "00" * 20), f"fleet has no body unit/{'00' * 20}"),
        (
            [*job("a.service", HELLO_HASH), leaf(f"unit/{HELLO_HASH}", '{"raw": 1}')],
            f"body unit/{HELLO_HASH} is not fleet's JSON",
        ),
    ],
)
def test_unreadable_units(leaves: list[dict[str, Any]], problem: str) -> None:
    (unit,) = parse_keyspace(tree(*leaves)).units
    assert unit.problem == problem
    step = plan_unit(unit, None)
    assert (step.action, step.detail) == (Action.SKIP, problem)


def _unit(raw: str = HELLO, name: str = "a.service", state: str | None = "launched") -> FleetUnit:
    return FleetUnit(name, hashlib.sha1(raw.encode()).hexdigest(), state, None, raw)


def test_create_identical_differs() -> None:
    unit = _unit()
    step = plan_unit(unit, None)
    assert (step.action, step.detail, step.state) == (
        Action.CREATE,
        f"hash {HELLO_HASH[:7]}, launched",
        TargetState.LAUNCHED,
    )
    assert step.unit_file is not None
    assert step.unit_file.hash == HELLO_HASH
    assert plan_unit(unit, Existing(HELLO_HASH, "launched")).action is Action.IDENTICAL
    other_state = plan_unit(unit, Existing(HELLO_HASH, "loaded"))
    assert other_state.action is Action.DIFFERS
    assert other_state.detail == (
        f"fleet-py has hash {HELLO_HASH[:7]}, loaded; fleet has hash {HELLO_HASH[:7]},"
        " launched: left as it is"
    )
    assert plan_unit(unit, Existing("0" * 40, "launched")).action is Action.DIFFERS


def test_missing_target_state_is_inactive() -> None:
    assert plan_unit(_unit(state=None), None).state is TargetState.INACTIVE


@pytest.mark.parametrize(
    ("unit", "reason"),
    [
        (_unit(state="running"), 'invalid value "running" for target-state'),
        (_unit(name="bad..name.service"), 'unit name cannot contain ".."'),
        (_unit(name="noext"), 'unit name must contain "."'),
        (
            _unit(name="web@.service"),
            'cannot activate template "web@.service" (desired state launched)',
        ),
        (
            _unit("[X-Fleet]\nMachineID=abc\nConflicts=x*\n"),
            "invalid unit file: MachineID cannot be used with Conflicts",
        ),
        (
            _unit("[X-Fleet]\nPartitionPolicy=sometimes\n"),
            'invalid unit file: invalid value "sometimes" for PartitionPolicy',
        ),
        (
            FleetUnit("a.service", "00" * 20, "inactive", None, HELLO),
            f"fleet's body unit/{'00' * 20} does not hash to its key ({HELLO_HASH})",
        ),
    ],
)
def test_refused_as_submit_refuses(unit: FleetUnit, reason: str) -> None:
    step = plan_unit(unit, None)
    assert step.action is Action.SKIP
    assert step.detail.startswith(reason)


def test_template_inactive_is_fine_and_unknown_keys_warn() -> None:
    step = plan_unit(_unit("[X-Fleet]\nFoo=bar\n", name="web@.service", state="inactive"), None)
    assert step.action is Action.CREATE
    assert step.warnings == ('unrecognized requirement in [X-Fleet] section: "Foo"',)


def test_metadata_plan() -> None:
    machine = FleetMachine("m1", dynamic={"a": "1", "b": "2", "c": "3", "gone": ""})
    steps, notes = plan_metadata(machine, {"b": "2", "c": "9"})
    assert [(s.key, s.action) for s in steps] == [
        ("a", Action.CREATE),
        ("b", Action.IDENTICAL),
        ("c", Action.DIFFERS),
    ]
    assert steps[2].detail == "fleet-py has '9': left as it is"
    assert len(notes) == 1
    assert notes[0].startswith("machine m1 metadata gone: not migrated: fleet's deletion marker")


def test_plan_and_report() -> None:
    source = parse_keyspace(
        tree(
            *job("a.service", HELLO_HASH),
            *job("b..c.service", HELLO_HASH, "inactive"),
            body(HELLO),
            leaf("job/a.service/target", "m1"),
            leaf("machines/m1/object", json.dumps({"ID": "m1", "PublicIP": "10.0.0.1"})),
        )
    )
    the_plan = plan(source, {}, {})
    assert the_plan.failed
    lines = report(the_plan, applied=False)
    assert lines == [
        f"a.service: create (hash {HELLO_HASH[:7]}, launched)",
        'b..c.service: skipped: unit name cannot contain ".."',
        "note: 1 machine(s) registered in fleet (m1/10.0.0.1): not migrated: each fleetd"
        " registers its own machine when it starts, with the metadata of its own config",
        "note: 1 placement(s) of fleet's engine not migrated: fleet-py's engine places units"
        " afresh",
        "Would create 1 unit(s) and 0 metadata key(s); 0 unit(s) already identical, 0 differ,"
        " 1 skipped. Dry run: nothing was written; run again with --apply to write.",
    ]
    assert (
        report(the_plan, applied=True)[0] == f"a.service: created (hash {HELLO_HASH[:7]}, launched)"
    )
    again = plan(source, {"a.service": Existing(HELLO_HASH, "launched")}, {})
    assert report(again, applied=True)[-1] == (
        "Created 0 unit(s) and 0 metadata key(s); 1 unit(s) already identical, 0 differ, 1 skipped."
    )
