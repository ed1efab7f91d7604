"""list-units, list-unit-files, list-machines: fleet's exact tables, fields, JSON, errors."""

from __future__ import annotations

import json

import pytest
from test_fleetctl_harness import GLOBAL, HELLO, M1, M2, Cluster, golden

from fleetd.model import TargetState

M1_IP = "172.17.8.103"


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> Cluster:
    return Cluster().install(monkeypatch)


@pytest.fixture
def hello(cluster: Cluster) -> Cluster:
    """fleet's README example: hello.service launched on 113f16a7.../172.17.8.103."""
    cluster.add_machine(M1, M1_IP, az="us-west-1b", region="us-west")
    cluster.add_machine(M2)
    cluster.run_unit("hello.service", M1)
    return cluster


def etcd_down(cluster: Cluster, *args: str) -> str:
    """What `fleetctl args` says on stderr with etcd unavailable; it must exit 1."""
    cluster.kv.set_unavailable(True)
    result = cluster.invoke(*args)
    assert result.exit_code == 1
    return result.stderr


# ---- list-units ------------------------------------------------------------------------------


def test_list_units_golden(hello: Cluster) -> None:
    result = hello.invoke("list-units")
    assert result.exit_code == 0
    assert result.stdout == golden("list-units.txt")
    assert result.stderr == ""


def test_list_units_one_row_per_machine_sorted(cluster: Cluster) -> None:
    cluster.add_machine(M1, "10.0.0.1")
    cluster.add_unit("global.service", GLOBAL, TargetState.LAUNCHED)
    cluster.add_unit("a.service", HELLO, TargetState.LOADED)
    cluster.publish("global.service", M2)  # a machine that is not (or no longer) registered
    cluster.publish("global.service", M1)
    cluster.publish("a.service", M1, TargetState.LOADED, "inactive", "dead")
    result = cluster.invoke("list-units")
    assert result.stdout == (
        "UNIT\t\tMACHINE\t\t\tACTIVE\t\tSUB\n"
        "a.service\t113f16a7.../10.0.0.1\tinactive\tdead\n"
        "global.service\t113f16a7.../10.0.0.1\tactive\t\trunning\n"
        "global.service\te793afb9...\t\tactive\t\trunning\n"
    )


def test_list_units_fields_full_and_no_legend(hello: Cluster) -> None:
    result = hello.invoke("list-units", "--fields", "unit,load,hash", "--full", "--no-legend")
    assert result.stdout == "hello.service\tloaded\te55c0aeb44ba0b68004ceb8a200e685194448b45\n"
    result = hello.invoke("list-units", "--fields=hash,machine")
    assert result.stdout == "HASH\tMACHINE\ne55c0ae\t113f16a7.../172.17.8.103\n"
    result = hello.invoke("list-units", "-l", "--fields=machine", "--no-legend")
    assert result.stdout == f"{M1}/{M1_IP}\n"


def test_list_units_empty_hash_is_a_dash(cluster: Cluster) -> None:
    cluster.add_unit("x.service")
    cluster.publish("x.service", M1, hash_="")
    assert cluster.invoke("list-units", "--fields=unit,hash").stdout == (
        "UNIT\t\tHASH\nx.service\t-\n"
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ("", "Must define output format\n"),
        ("unit,bogus", 'Invalid key in output format: "bogus"\n'),
    ],
)
def test_list_units_bad_fields(cluster: Cluster, fields: str, message: str) -> None:
    result = cluster.invoke("list-units", f"--fields={fields}")
    assert (result.exit_code, result.stdout, result.stderr) == (1, "", message)
    assert cluster.settings == []  # refused before talking to the cluster


def test_list_units_json(hello: Cluster) -> None:
    result = hello.invoke("list-units", "-o", "json")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == [
        {
            "unit": "hello.service",
            "machine": M1,
            "active": "active",
            "sub": "running",
            "load": "loaded",
            "hash": "e55c0aeb44ba0b68004ceb8a200e685194448b45",
            "error": None,
        }
    ]
    result = hello.invoke("list-units", "--output-format", "JSON", "--fields", "unit,sub")
    assert json.loads(result.stdout) == [{"unit": "hello.service", "sub": "running"}]


@pytest.fixture
def failing(cluster: Cluster) -> Cluster:
    """One unit that runs, one whose load failed and one whose start job timed out."""
    cluster.add_machine(M1, "10.0.0.1")
    cluster.run_unit("a.service", M1)
    cluster.add_unit("b.service", HELLO, TargetState.LAUNCHED)
    cluster.publish(
        "b.service", M1, TargetState.INACTIVE, active="", sub="", load="",
        failed_task="load", error="cannot write unit file /run/fleet/units/b.service: "
        "[Errno 28] No space left on device",
    )  # fmt: skip
    cluster.add_unit("c.service", HELLO, TargetState.LAUNCHED)
    cluster.publish(
        "c.service", M1, TargetState.LOADED, active="activating", sub="start",
        failed_task="start", error="StartUnit c.service: job 7 did not finish in 120s",
    )  # fmt: skip
    return cluster


def test_list_units_shows_a_failed_task_in_fleets_columns(failing: Cluster) -> None:
    # Still four columns on every row: a script splitting them finds what it did.
    assert failing.invoke("list-units").stdout == (
        "UNIT\t\tMACHINE\t\t\tACTIVE\t\tSUB\n"
        "a.service\t113f16a7.../10.0.0.1\tactive\t\trunning\n"
        "b.service\t113f16a7.../10.0.0.1\t-\t\tload-failed\n"
        "c.service\t113f16a7.../10.0.0.1\tactivating\tstart-failed\n"
    )


def test_list_units_error_field_says_what_failed(failing: Cluster) -> None:
    result = failing.invoke("list-units", "--fields", "unit,error", "--no-legend")
    assert result.stdout == (
        "a.service\t-\n"
        "b.service\tload failed: cannot write unit file /run/fleet/units/b.service: "
        "[Errno 28] No space left on device\n"
        "c.service\tstart failed: StartUnit c.service: job 7 did not finish in 120s\n"
    )
    rows = json.loads(failing.invoke("list-units", "-o", "json").stdout)
    by_unit = {row["unit"]: row for row in rows}
    assert by_unit["a.service"]["error"] is None
    assert by_unit["b.service"]["error"].startswith("load failed: cannot write unit file")
    assert by_unit["b.service"]["sub"] is None  # JSON keeps systemd's value: none
    assert by_unit["c.service"]["sub"] == "start"
    assert by_unit["c.service"]["error"].endswith("did not finish in 120s")


def test_list_units_registry_error(cluster: Cluster) -> None:
    assert etcd_down(cluster, "list-units") == (
        "Error retrieving list of units from repository: fake etcd is unavailable\n"
    )


# ---- list-unit-files -------------------------------------------------------------------------


def test_list_unit_files_golden(hello: Cluster) -> None:
    result = hello.invoke("list-unit-files")
    assert result.exit_code == 0
    assert result.stdout == golden("list-unit-files.txt")


def test_list_unit_files_states_targets_and_globals(cluster: Cluster) -> None:
    cluster.add_machine(M1, "10.0.0.1")
    cluster.run_unit("hello.service", M1)
    cluster.add_unit("global.service", GLOBAL, TargetState.LAUNCHED)
    cluster.add_unit("loading.service", HELLO, TargetState.LAUNCHED)
    cluster.place("loading.service", M1)  # placed, the agent has not reported yet
    cluster.add_unit("stuck.service", HELLO, TargetState.LAUNCHED)
    cluster.place("stuck.service", None, "no machine matches MachineMetadata role=db")
    cluster.add_unit("idle.service")
    result = cluster.invoke(
        "list-unit-files", "--fields=unit,dstate,state,target,global,desc,reason"
    )
    assert result.stdout.splitlines() == [
        "UNIT\t\tDSTATE\t\tSTATE\t\tTARGET\t\t\tGLOBAL\tDESC\t\tREASON",
        "global.service\tlaunched\t-\t\tglobal\t\t\ttrue\tEverywhere\t-",
        "hello.service\tlaunched\tlaunched\t113f16a7.../10.0.0.1\tfalse\tHello World\t-",
        "idle.service\tinactive\tinactive\t-\t\t\tfalse\tHello World\t-",
        "loading.service\tlaunched\tinactive\t113f16a7.../10.0.0.1\tfalse\tHello World\t-",
        "stuck.service\tlaunched\tinactive\t-\t\t\tfalse\tHello World"
        "\tno machine matches MachineMetadata role=db",
    ]


def test_list_unit_files_empty_unit_hash(cluster: Cluster) -> None:
    cluster.add_unit("empty.service", "")
    result = cluster.invoke("list-unit-files", "--fields=unit,hash,desc", "--no-legend")
    assert result.stdout == "empty.service\tda39a3e\t-\n"


def test_list_unit_files_tmachine_is_deprecated(hello: Cluster) -> None:
    result = hello.invoke("list-unit-files", "--fields=unit,tmachine", "--full")
    assert result.exit_code == 0
    assert result.stderr == 'WARNING: The "tmachine" field is deprecated. Use "target" instead\n'
    assert result.stdout == f"UNIT\t\tTMACHINE\nhello.service\t{M1}/{M1_IP}\n"


def test_list_unit_files_json(cluster: Cluster) -> None:
    cluster.run_unit("hello.service", M1)
    cluster.add_unit("global.service", GLOBAL, TargetState.LAUNCHED)
    result = cluster.invoke("list-unit-files", "-o", "json")
    assert json.loads(result.stdout) == [
        {
            "unit": "global.service",
            "hash": cluster.unit("global.service").hash,
            "desc": "Everywhere",
            "dstate": "launched",
            "state": None,
            "target": "global",
            "global": True,
            "reason": None,
        },
        {
            "unit": "hello.service",
            "hash": "e55c0aeb44ba0b68004ceb8a200e685194448b45",
            "desc": "Hello World",
            "dstate": "launched",
            "state": "launched",
            "target": M1,
            "global": False,
            "reason": None,
        },
    ]


def test_list_unit_files_bad_field(cluster: Cluster) -> None:
    result = cluster.invoke("list-unit-files", "--fields=machine")
    assert (result.exit_code, result.stderr) == (1, 'Invalid key in output format: "machine"\n')


# ---- list-machines ---------------------------------------------------------------------------


def test_list_machines_golden(hello: Cluster) -> None:
    result = hello.invoke("list-machines")
    assert result.exit_code == 0
    assert result.stdout == golden("list-machines.txt")


def test_list_machines_full_fields_and_json(hello: Cluster) -> None:
    result = hello.invoke("list-machines", "--l", "--fields=machine", "--no-legend")
    assert result.stdout == f"{M1}\n{M2}\n"
    result = hello.invoke("list-machines", "-o", "json")
    assert json.loads(result.stdout) == [
        {"machine": M1, "ip": M1_IP, "metadata": {"az": "us-west-1b", "region": "us-west"}},
        {"machine": M2, "ip": None, "metadata": {}},
    ]


def test_list_machines_dynamic_metadata_wins(hello: Cluster) -> None:
    from test_fleetctl_harness import run

    run(hello.registry.set_machine_metadata(M2, "role", "db"))
    result = hello.invoke("list-machines", "--fields=ip,metadata", "--no-legend")
    assert result.stdout == f"{M1_IP}\taz=us-west-1b,region=us-west\n-\t\trole=db\n"


def test_list_machines_error_explains(cluster: Cluster) -> None:
    assert etcd_down(cluster, "list-machines") == (
        "Error retrieving list of active machines from fleet API (fake etcd is unavailable)\n"
        "Possible issues:\n"
        "  etcd is unhealthy and/or lost quorum\n"
        "  connection cannot be established to any etcd servers\n"
    )
