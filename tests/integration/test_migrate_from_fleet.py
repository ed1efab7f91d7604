"""`fleetctl migrate-from-fleet` against a real etcd holding fleet v1.0's real keyspace.

The source keyspace is tests/fixtures/fleet-v1.0-keyspace.json, written by fleet v1.0.0's own
fleetctl (see tests/fixtures/README.md); it is PUT back into an etcd serving the v2 API, and
the same etcd's v3 keyspace (under /fleet-py/) is the migration's target. The test that
rebuilds the fixture from fleet's source is skipped where `go` is not installed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from fleetctl.cli import cli
from fleetd.etcd.client import EtcdConfig, EtcdKV
from tests.conftest import _require_etcd
from tests.integration.etcd_fixture import EtcdServer, running

pytestmark = pytest.mark.integration

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
KEYSPACE = FIXTURES / "fleet-v1.0-keyspace.json"
FLEET_LIST = FIXTURES / "fleet-v1.0-keyspace.list-unit-files.txt"
FLEET_PREFIX = "/_coreos.com/fleet/"
OUR_PREFIX = "/fleet-py/"

# What fleet v1.0 stored and what fleet-py must take from it (fleet's own list-unit-files
# output is checked against this too). bad..name.service and partition.service are accepted
# by fleet but refused by fleet-py's submit validation.
MIGRATED = {
    "batch.service": ("da3347561ed4a60bbd4448fd3f11b61367d53432", "inactive"),
    "east.service": ("e2df38ef908a2cd2e6574ece3964592314a69f41", "loaded"),
    "hello.service": ("e55c0aeb44ba0b68004ceb8a200e685194448b45", "launched"),
    "monitor.service": ("842cde5208dbd886f92c02ab40f45d455cdda85b", "launched"),
    "web@.service": ("7e85894c8a982296962fa8f24e8f0f2d1c8ad655", "inactive"),
    "web@1.service": ("7e85894c8a982296962fa8f24e8f0f2d1c8ad655", "launched"),
    "web@2.service": ("7e85894c8a982296962fa8f24e8f0f2d1c8ad655", "loaded"),
}
SKIPPED = {
    "bad..name.service": 'unit name cannot contain ".."',
    "partition.service": 'invalid value "sometimes" for PartitionPolicy',
}


@pytest.fixture
def etcd_v2(tmp_path: Path) -> Iterator[EtcdServer]:
    """An etcd serving the v2 API as well (fleet v1.0's) and the v3 one (ours)."""
    _require_etcd()
    server = EtcdServer(tmp_path / "etcd", extra_args=["--enable-v2=true"])
    with running(server):
        yield server


def _leaves(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    if node.get("dir"):
        for child in node.get("nodes", []):
            yield from _leaves(child)
    else:
        yield node


def put_v2(server: EtcdServer, key: str, value: str, ttl: int | None = None) -> None:
    fields = {"value": value}
    if ttl:
        fields["ttl"] = str(ttl)
    request = urllib.request.Request(
        f"{server.client_url}/v2/keys{urllib.parse.quote(key)}",
        data=urllib.parse.urlencode(fields).encode(),
        method="PUT",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status in (200, 201)


def load_fixture(server: EtcdServer, dump: dict[str, Any] | None = None) -> None:
    """PUT every key of a recorded v2 dump back (machine objects keep a TTL, as in fleet)."""
    dump = dump or json.loads(KEYSPACE.read_text())
    for leaf in _leaves(dump["node"]):
        put_v2(server, leaf["key"], leaf["value"], leaf.get("ttl"))


def fleetctl(server: EtcdServer, *args: str) -> Result:
    return CliRunner().invoke(
        cli,
        [
            "--endpoint",
            server.client_url,
            "--driver",
            "etcd",
            "--etcd-key-prefix",
            OUR_PREFIX,
            *args,
        ],
    )


def migrate(server: EtcdServer, *args: str) -> Result:
    return fleetctl(server, "migrate-from-fleet", "--etcd2", server.client_url, *args)


async def _v3_state(server: EtcdServer) -> tuple[int, dict[str, str]]:
    """Our keyspace: the etcd revision and every key under our prefix."""
    kv = EtcdKV(EtcdConfig(endpoints=server.endpoints))
    try:
        kvs, revision = await kv.range(OUR_PREFIX)
        return revision, {k.key: k.value for k in kvs}
    finally:
        await kv.close()


def v3_state(server: EtcdServer) -> tuple[int, dict[str, str]]:
    return asyncio.run(_v3_state(server))


def test_fixture_is_fleets_own_listing() -> None:
    """The recorded keyspace is what fleet v1.0's fleetctl listed (HASH, DSTATE)."""
    rows = [line.split() for line in FLEET_LIST.read_text().splitlines()[1:]]
    listed = {row[0]: (row[1], row[2]) for row in rows}
    assert {n: v for n, v in listed.items() if n not in SKIPPED} == MIGRATED
    assert set(listed) - set(MIGRATED) == set(SKIPPED)


def test_dry_run_apply_and_again(etcd_v2: EtcdServer) -> None:
    load_fixture(etcd_v2)
    before = v3_state(etcd_v2)

    dry = migrate(etcd_v2)
    assert dry.exit_code == 0, dry.output
    lines = dry.stdout.splitlines()
    assert lines[0] == (
        f"fleet v1.0 keyspace {FLEET_PREFIX} at {etcd_v2.client_url}:"
        " 9 unit(s), 7 unit file(s), 2 machine(s)"
    )
    for name, (hash_, state) in MIGRATED.items():
        assert f"{name}: create (hash {hash_[:7]}, {state})" in lines
    for name, reason in SKIPPED.items():
        assert any(line.startswith(f"{name}: skipped: ") and reason in line for line in lines), (
            name,
            lines,
        )
    assert "machine 2c9f1a0d7a2b4e3f8c1d5e6f7a8b9c0d metadata role=monitor: create" in lines
    assert any(
        line.startswith(
            "note: machine 7e4d3c2b1a0f4e9d8c7b6a5f4e3d2c1b metadata role: not migrated"
        )
        for line in lines
    )
    assert any(line.startswith("note: 2 machine(s) registered in fleet") for line in lines)
    assert any(line.startswith("note: 1 placement(s)") for line in lines)
    assert lines[-1] == (
        "Would create 7 unit(s) and 1 metadata key(s); 0 unit(s) already identical, 0 differ,"
        " 2 skipped. Dry run: nothing was written; run again with --apply to write."
    )
    assert v3_state(etcd_v2) == before  # dry run wrote nothing, not even a revision

    applied = migrate(etcd_v2, "--apply")
    assert applied.exit_code == 1, applied.output
    assert "Error: some units were not migrated (see above)" in applied.stderr
    for name, (hash_, state) in MIGRATED.items():
        assert f"{name}: created (hash {hash_[:7]}, {state})" in applied.stdout
    assert applied.stdout.splitlines()[-1] == (
        "Created 7 unit(s) and 1 metadata key(s); 0 unit(s) already identical, 0 differ, 2 skipped."
    )

    # fleet-py's list-unit-files: fleet's HASH, fleet's desired states.
    listing = fleetctl(
        etcd_v2, "list-unit-files", "--full", "--no-legend", "--fields=unit,hash,dstate"
    )
    assert listing.exit_code == 0, listing.output
    rows = {tuple(line.split("\t")) for line in listing.stdout.splitlines()}
    assert rows == {(n, h, s) for n, (h, s) in MIGRATED.items()}
    # Bodies: `fleetctl cat` prints fleet's stored Raw text.
    dump = json.loads(KEYSPACE.read_text())
    raws = {
        leaf["key"].rsplit("/", 1)[1]: json.loads(leaf["value"])["Raw"]
        for leaf in _leaves(dump["node"])
        if leaf["key"].startswith(FLEET_PREFIX + "unit/")
    }
    for name, (hash_, _) in MIGRATED.items():
        cat = fleetctl(etcd_v2, "cat", name)
        assert (cat.exit_code, cat.stdout) == (0, raws[hash_]), name

    # Again: everything is already there, and nothing is written.
    revision, keys = v3_state(etcd_v2)
    again = migrate(etcd_v2, "--apply")
    assert again.exit_code == 1  # the two refused units are still refused
    for name, (hash_, state) in MIGRATED.items():
        assert f"{name}: already identical (hash {hash_[:7]}, {state})" in again.stdout
    assert (
        "machine 2c9f1a0d7a2b4e3f8c1d5e6f7a8b9c0d metadata role=monitor: already identical"
        in again.stdout
    )
    assert "Created 0 unit(s) and 0 metadata key(s); 7 unit(s) already identical" in again.stdout
    assert v3_state(etcd_v2) == (revision, keys)


def test_units_that_differ_are_left_alone(etcd_v2: EtcdServer, tmp_path: Path) -> None:
    load_fixture(etcd_v2)
    unit = tmp_path / "hello.service"
    unit.write_text("[Service]\nExecStart=/bin/true\n")
    assert fleetctl(etcd_v2, "submit", str(unit)).exit_code == 0
    revision, keys = v3_state(etcd_v2)

    result = migrate(etcd_v2, "--apply")
    assert result.exit_code == 1
    line = next(x for x in result.stdout.splitlines() if x.startswith("hello.service:"))
    assert line.startswith("hello.service: differs: fleet-py has hash ")
    assert line.endswith("; fleet has hash e55c0ae, launched: left as it is")
    assert (
        keys[f"{OUR_PREFIX}units/hello.service"]
        == v3_state(etcd_v2)[1][f"{OUR_PREFIX}units/hello.service"]
    )
    assert v3_state(etcd_v2)[0] > revision  # the other units were written


def test_only_valid_units_and_no_fleet_keyspace(etcd_v2: EtcdServer) -> None:
    missing = migrate(etcd_v2)
    assert missing.exit_code == 1
    assert "no fleet keyspace at /_coreos.com/fleet/" in missing.stderr

    # A job whose body is gone (fleet itself then lists nothing for it) and a good unit.
    good_raw = "[Service]\nExecStart=/bin/true\n"

    good = hashlib.sha1(good_raw.encode()).digest()
    put_v2(
        etcd_v2,
        f"{FLEET_PREFIX}job/good.service/object",
        json.dumps({"Name": "good.service", "UnitHash": list(good)}),
    )
    put_v2(etcd_v2, f"{FLEET_PREFIX}job/good.service/target-state", "launched")
    put_v2(etcd_v2, f"{FLEET_PREFIX}unit/{good.hex()}", json.dumps({"Raw": good_raw}))
    put_v2(
        etcd_v2,
        f"{FLEET_PREFIX}job/orphan.service/object",
        json.dumps({"Name": "orphan.service", "UnitHash": [1] * 20}),
    )
    result = migrate(etcd_v2, "--apply")
    assert result.exit_code == 1
    assert f"good.service: created (hash {good.hex()[:7]}, launched)" in result.stdout
    assert f"orphan.service: skipped: fleet has no body unit/{'01' * 20}" in result.stdout
    listing = fleetctl(etcd_v2, "list-unit-files", "--no-legend", "--fields=unit,dstate")
    assert listing.stdout == "good.service\tlaunched\n"


@pytest.mark.skipif(shutil.which("go") is None, reason="needs go (Debian golang-go) to build fleet")
@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to check out fleet")
def test_rebuild_fixture_from_fleet_source(etcd_v2: EtcdServer, tmp_path: Path) -> None:
    """Build fleet v1.0.0, record a fresh keyspace, and see it migrate like the recorded one.

    FLEET_GIT names a local clone of coreos/fleet to build from: tests reach no network, so
    without it the test is skipped (the recorded fixture's tests run regardless).
    """
    source = os.environ.get("FLEET_GIT", "")
    if not source:
        pytest.skip("set FLEET_GIT to a local clone of coreos/fleet to rebuild the fixture")
    found = subprocess.run(["git", "ls-remote", source, "v1.0.0"], capture_output=True, timeout=60)
    if found.returncode != 0 or not found.stdout:
        pytest.skip(f"{source} is not a coreos/fleet clone with tag v1.0.0")
    out = tmp_path / "keyspace.json"
    script = FIXTURES / "make-fleet-v1.0-keyspace.sh"
    done = subprocess.run(
        [str(script), str(out)], capture_output=True, text=True, timeout=900, env=os.environ
    )
    assert done.returncode == 0, done.stderr[-3000:]
    fresh = json.loads(out.read_text())
    recorded = json.loads(KEYSPACE.read_text())

    def values(dump: dict[str, Any]) -> dict[str, str]:
        # Indexes and machine TTL expirations differ from run to run; keys and values do not.
        return {leaf["key"]: leaf["value"] for leaf in _leaves(dump["node"])}

    assert values(fresh) == values(recorded)
    assert fresh["_produced_by"]["fleet_commit"] == recorded["_produced_by"]["fleet_commit"]
    load_fixture(etcd_v2, fresh)
    result = migrate(etcd_v2)
    assert result.exit_code == 0
    assert "Would create 7 unit(s) and 1 metadata key(s)" in result.stdout
