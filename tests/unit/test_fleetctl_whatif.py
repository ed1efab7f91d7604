"""fleetctl plan and why (fleetctl/whatif.py), through the etcd driver over the in-memory
cluster, with the real engine run once to write what a leader would have written; and through
the API driver, which must print the same bytes. A plan never writes: every invocation here,
good or bad, leaves the registry's revision and contents as they were."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import Result
from engine_once import run_engine_once
from test_api_fleetctl import ServedCluster
from test_fleetctl_harness import GLOBAL, HELLO, HELLO_TEMPLATE, M1, M2, Cluster, run

from fleetctl.whatif import UNPLACED_EXIT
from fleetd.model import TargetState

M3 = "5a2e9c3d7b8f4e1a9c0d2b3e4f5a6b7c"
DB = HELLO + "\n[X-Fleet]\nMachineMetadata=role=db\n"
WEB = HELLO_TEMPLATE + "\n[X-Fleet]\nMachineMetadata=role=web\nConflicts=web@*.service\n"


def populate(cluster: Cluster) -> None:
    cluster.add_machine(M1, "10.0.0.1", role="web")
    cluster.add_machine(M2, "10.0.0.2", role="db")
    cluster.add_machine(M3, "10.0.0.3")
    for i in range(4):
        cluster.add_unit(
            f"app{i}.service", HELLO.replace("Hello", f"App {i}"), TargetState.LAUNCHED
        )
    cluster.add_unit("db.service", DB, TargetState.LAUNCHED)
    cluster.add_unit("web@.service", WEB)
    cluster.add_unit("web@1.service", WEB, TargetState.LAUNCHED)
    cluster.add_unit("web@2.service", WEB, TargetState.LAUNCHED)
    cluster.add_unit("global.service", GLOBAL, TargetState.LAUNCHED)
    run(run_engine_once(cluster.registry))


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> Cluster:
    return Cluster().install(monkeypatch)


@pytest.fixture
def settled(cluster: Cluster) -> Iterator[Cluster]:
    populate(cluster)
    before = cluster.kv.dump("")
    revision = run(cluster.registry.current_revision())
    yield cluster
    # Whatever the test ran (plans, whys, refused arguments), nothing was written.
    assert cluster.kv.dump("") == before
    assert run(cluster.registry.current_revision()) == revision


def schedule(cluster: Cluster) -> dict[str, str]:
    return {s.name: s.machine_id for s in run(cluster.registry.full_schedule())}


KILL_M2 = """\
UNIT		ACTION		FROM			TO			REASON
app2.service	move		e793afb9.../10.0.0.2	5a2e9c3d.../10.0.0.3	machine e793afb9e0ee4a2a9d6b8c3e5f6a7b8c went away
db.service	unplaced	e793afb9.../10.0.0.2	-			machine e793afb9e0ee4a2a9d6b8c3e5f6a7b8c went away; no machine has metadata role=db (machines: 2)

GLOBAL UNIT	ACTION	MACHINE			REASON
global.service	stop	e793afb9.../10.0.0.2	its machine goes away

Without e793afb9.../10.0.0.2: 1 unit would move, 1 unit would not be placed, 1 global unit instance would stop.
"""  # noqa: E501


def test_plan_kill_shows_what_would_move_and_what_would_run_nowhere(settled: Cluster) -> None:
    assert schedule(settled)["db.service"] == M2
    result = settled.invoke("plan", "--kill", M2[:3])
    assert (result.exit_code, result.stdout, result.stderr) == (UNPLACED_EXIT, KILL_M2, "")
    # The full id, or a prefix, and --full
    assert settled.invoke("plan", "--kill", M2).stdout == KILL_M2
    full = settled.invoke("plan", "--full", "--kill", M2[:3]).stdout
    assert f"{M2}/10.0.0.2" in full


def test_a_safe_kill_exits_0(settled: Cluster) -> None:
    result = settled.invoke("plan", "--kill", M3[:4])
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith(
        "Without 5a2e9c3d.../10.0.0.3: 1 unit would move, 1 global unit instance would stop.\n"
    )


def test_plan_kill_several_machines_as_json(settled: Cluster) -> None:
    result = settled.invoke("plan", "--kill", f"{M1[:3]},{M3[:2]}", "-o", "json")
    assert result.exit_code == UNPLACED_EXIT, result.output
    answer = json.loads(result.stdout)
    assert answer["kill"] == sorted([M1, M3])
    outcomes = {u["name"]: u for u in answer["units"]}
    assert outcomes["web@1.service"]["action"] == "unplaced"
    assert {u["to"] for u in answer["units"] if u["action"] == "move"} == {M2}
    assert answer["summary"]["globalStop"] == 2
    assert settled.invoke("plan", "--kill", M1, "--kill", M3, "-o", "json").stdout == result.stdout


def test_the_prediction_is_what_the_engine_does_when_the_machine_goes(cluster: Cluster) -> None:
    populate(cluster)
    answer = json.loads(cluster.invoke("plan", "--kill", M1, "-o", "json").stdout)
    expected = {u["name"]: u.get("to") for u in answer["units"]}
    before = schedule(cluster)

    async def kill_m1() -> None:
        record = await cluster.kv.get(cluster.registry.keys.machine(M1))
        assert record is not None
        await cluster.kv.revoke(record.lease)  # its lease expires: the machine is gone
        await run_engine_once(cluster.registry)

    run(kill_m1())
    after = schedule(cluster)
    changed = {
        n: after.get(n) for n in before.keys() | after.keys() if before.get(n) != after.get(n)
    }
    assert changed == expected
    assert expected  # something did move


def test_plan_of_files_to_start(settled: Cluster, tmp_path: Path) -> None:
    (tmp_path / "new.service").write_text(HELLO.replace("Hello", "New"))
    (tmp_path / "cache.service").write_text(HELLO + "\n[X-Fleet]\nMachineMetadata=role=cache\n")
    (tmp_path / "app0.service").write_text(HELLO.replace("Hello", "App 0 v2"))
    args = [str(tmp_path / n) for n in ("new.service", "cache.service", "app0.service")]
    result = settled.invoke("plan", *args, "web@3.service")
    assert result.exit_code == UNPLACED_EXIT, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["UNIT", "ACTION", "FROM", "TO", "REASON"]
    rows = {line.split("\t")[0]: line.split() for line in lines[1:] if line}
    assert rows["new.service"][1:3] == ["place", "-"]
    assert rows["cache.service"][1] == "unplaced"
    assert "no machine has metadata role=cache" in result.stdout
    assert rows["app0.service"][1] == "stay"
    assert rows["web@3.service"][1] == "unplaced"  # its template: role=web, one such machine
    assert lines[-1] == (
        "1 unit would be placed, 2 units would not be placed, 1 unit would stay where it is."
    )
    # As start would: the local app0.service differs from the cluster's, without --replace.
    assert result.stderr == (
        f"WARNING: Unit app0.service in registry differs from local unit file {args[2]}."
        " Add --replace to override.\n"
    )


def test_plan_with_replace_plans_the_local_body(settled: Cluster, tmp_path: Path) -> None:
    path = tmp_path / "app0.service"
    path.write_text(HELLO.replace("Hello", "App 0") + "\n[X-Fleet]\nMachineMetadata=role=db\n")
    answer = json.loads(settled.invoke("plan", "--replace", str(path), "-o", "json").stdout)
    app0 = next(u for u in answer["units"] if u["name"] == "app0.service")
    assert (app0["action"], app0["from"], app0["to"]) == ("move", M1, M2)
    assert app0["reason"].startswith("constraint no longer holds: MachineMetadata role=db")


@pytest.mark.parametrize(
    ("args", "exit_code", "stderr"),
    [
        (["plan"], 2, "Error: No units or machines given"),
        (["plan", "--kill", "zz"], 1, 'Error planning: no machine matches ID prefix "zz"\n'),
        (["plan", "--kill", ""], 1, "Error planning: empty machine ID\n"),
        (
            ["plan", "nope.service"],
            1,
            "Error planning units: unable to find Unit(nope.service) in Registry or on"
            " filesystem\n",
        ),
        (
            ["plan", "web@.service"],
            1,
            'Error planning units: cannot activate template "web@.service"\n',
        ),
        (["plan", "bad name"], 1, "Error planning units: "),
        (["why", "nope"], 1, "Unit nope.service does not exist.\n"),
        (["why"], 2, "Missing argument 'UNIT'"),
    ],
)
def test_bad_input_fails_and_changes_nothing(
    settled: Cluster, args: list[str], exit_code: int, stderr: str
) -> None:
    result = settled.invoke(*args)
    assert result.exit_code == exit_code, result.output
    assert stderr in result.stderr
    assert result.stdout == ""


def test_an_ambiguous_prefix_names_the_machines(cluster: Cluster) -> None:
    populate(cluster)
    cluster.add_machine("11aa16a7f2c54d35b3cde2e2ad5c2f10", "10.0.0.4")
    before = cluster.kv.dump("")
    result = cluster.invoke("plan", "--kill", "11")
    assert cluster.kv.dump("") == before
    assert result.exit_code == 1
    assert result.stderr == (
        'Error planning: machine ID prefix "11" is ambiguous: it matches 2 machines'
        f" ({M1}, 11aa16a7f2c54d35b3cde2e2ad5c2f10)\n"
    )


def test_bad_unit_files_fail_and_change_nothing(settled: Cluster, tmp_path: Path) -> None:
    bad = tmp_path / "bad.service"
    bad.write_text(HELLO + "\n[X-Fleet]\nMachineMetadata=role\n")
    result = settled.invoke("plan", str(bad))
    assert result.exit_code == 1
    assert 'invalid value "role" for MachineMetadata' in result.stderr
    garbage = tmp_path / "garbage.service"
    garbage.write_bytes(b"[Service\nExecStart=/bin/true\n")
    result = settled.invoke("plan", str(garbage))
    assert result.exit_code == 1
    assert result.stderr.startswith("Error planning units: failed getting Unit(garbage.service)")


WHY_WEB2 = """\
Unit web@2.service (desired state launched) is not placed: no machine can run it (3 machines): 2 fail MachineMetadata role=web, 1 runs a conflicting unit (web@2.service conflicts with web@*.service).

MACHINE			LOAD	MACHINEID	MACHINEMETADATA				MACHINEOF	CONFLICTS								REPLACES	FITS
113f16a7.../10.0.0.1	4	-		ok					-		fail: runs web@1.service (web@2.service conflicts with web@*.service)	-		no
5a2e9c3d.../10.0.0.3	2	-		fail: role=web wanted, has no role	-		ok									-		no
e793afb9.../10.0.0.2	3	-		fail: role=web wanted, has role=db	-		ok									-		no

Smallest change: add metadata role=web to one more machine (on 5a2e9c3d.../10.0.0.3)
Other changes that would place it:
  remove Conflicts=web@*.service from web@2.service (on 113f16a7.../10.0.0.1)
  change metadata to role=web (now role=db) on one more machine (on e793afb9.../10.0.0.2)
  destroy or stop the conflicting unit web@1.service (on 113f16a7.../10.0.0.1)
"""  # noqa: E501


def test_why_a_unit_is_not_placed(settled: Cluster) -> None:
    result = settled.invoke("why", "web@2")
    assert (result.exit_code, result.stdout, result.stderr) == (0, WHY_WEB2, "")


def test_why_a_unit_runs_where_it_does(settled: Cluster) -> None:
    result = settled.invoke("why", "db.service")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "Unit db.service (desired state launched) runs on e793afb9.../10.0.0.2."
    assert lines[-1].split() == ["e793afb9.../10.0.0.2", "2", "-", "ok", "-", "-", "-", "here"]
    answer = json.loads(settled.invoke("why", "db.service", "-o", "json").stdout)
    assert (answer["machineID"], answer["predictedMachineID"]) == (M2, M2)


def test_why_a_global_unit(settled: Cluster) -> None:
    result = settled.invoke("why", "global.service")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(
        "Unit global.service (desired state launched) is global: it runs on 3 of 3 machines."
    )


# ---- both drivers print the same ---------------------------------------------------------------

COMMANDS = [
    ["plan", "--kill", M2[:3]],
    ["plan", "--kill", M1, "--kill", M3[:2], "-o", "json"],
    ["plan", "--kill", "zz"],
    ["plan", "app1.service", "web@3.service"],
    ["plan", "nope.service"],
    ["why", "web@2.service"],
    ["why", "db.service", "-o", "json"],
    ["why", "global.service", "--full"],
    ["why", "nope.service"],
]


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> Iterator[ServedCluster]:
    cluster = Cluster()
    populate(cluster)
    with tempfile.TemporaryDirectory() as directory, ServedCluster(cluster, Path(directory)) as s:
        yield s


@pytest.mark.parametrize("args", COMMANDS, ids=" ".join)
def test_the_api_driver_prints_the_same(
    served: ServedCluster, monkeypatch: pytest.MonkeyPatch, args: list[str]
) -> None:
    before = served.cluster.kv.dump("")
    by_etcd: Result = served.via_etcd(monkeypatch, *args)
    by_api: Result = served.via_api(*args)
    assert (by_api.exit_code, by_api.stdout, by_api.stderr) == (
        by_etcd.exit_code,
        by_etcd.stdout,
        by_etcd.stderr,
    )
    assert by_api.stdout or by_api.stderr
    assert served.cluster.kv.dump("") == before


def test_the_api_driver_refuses_a_bad_unit_before_asking(served: ServedCluster) -> None:
    result = served.via_api("plan", "web@.service")
    assert result.exit_code == 1
    assert result.stderr == 'Error planning units: cannot activate template "web@.service"\n'


def test_completion_of_machine_ids(settled: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.shell_completion import ShellComplete

    from fleetctl.cli import cli

    completer = ShellComplete(cli, {}, "fleetctl", "_FLEETCTL_COMPLETE")
    found = completer.get_completions(["plan", "--kill"], "e7")
    assert [c.value for c in found] == [M2]
    found = completer.get_completions(["plan", "--kill"], "e7,5")
    assert [c.value for c in found] == [f"e7,{M3}"]
