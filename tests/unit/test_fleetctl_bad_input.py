"""fleetctl and bad input: names with path tricks, over-size and non-UTF-8 unit files.

Each is refused with a message naming the problem and a non-zero exit, and the store is the
same afterwards, byte for byte (the whole FakeKV is compared, not just `units/`).
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest
from test_fleetctl_harness import HELLO, HELLO_TEMPLATE, M1, Cluster

from fleetctl.unitargs import read_unit_file
from fleetd.errors import RegistryUnavailable, UnitFileError
from fleetd.model import TargetState
from fleetd.unit.file import MAX_UNIT_BYTES


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Cluster:
    monkeypatch.chdir(tmp_path)
    cluster = Cluster().install(monkeypatch)
    cluster.add_machine(M1, "10.0.0.1")
    cluster.run_unit("running.service")
    cluster.add_unit("web@.service", HELLO_TEMPLATE)
    cluster.auto = True
    return cluster


def store(cluster: Cluster) -> dict[str, str]:
    return cluster.kv.dump("")


# Arguments to submit/load/start are paths: fleet's name is the file's base name, so
# "../x.service" names x.service (a file one directory up). What must be refused is a *name*
# fleet would not accept, however it was spelled.
BAD_NAME_ARGS = [
    ("nul\x00.service", "invalid character '\\x00' in unit name"),
    ("new\nline.service", "invalid character '\\n' in unit name"),
    ("x" * 300 + ".service", "unit name exceeds maximum length (255)"),
    ("/", "invalid character '/' in unit name"),  # fleet's mangling makes "/.service"
    ("units/..", 'unit name cannot start in "."'),  # base name "...service"
    ("../.hidden.service", 'unit name cannot start in "."'),
    ("a..b.service", 'unit name cannot contain ".."'),
    ("sp ace.service", "invalid character ' ' in unit name"),
]


@pytest.mark.parametrize("command", ["submit", "load", "start"])
@pytest.mark.parametrize(("arg", "message"), BAD_NAME_ARGS)
def test_bad_unit_names_are_refused_and_nothing_is_written(
    cluster: Cluster, command: str, arg: str, message: str
) -> None:
    Path("a..b.service").write_text(HELLO)  # a file exists: the name is still refused
    Path("sp ace.service").write_text(HELLO)
    before = store(cluster)
    result = cluster.invoke(command, "running.service", arg)
    assert result.exit_code == 1
    assert result.stderr == f"Error creating units: {message}\n"
    assert store(cluster) == before


@pytest.mark.parametrize("command", ["stop", "unload", "destroy", "restart", "cat", "status"])
@pytest.mark.parametrize("arg", ["../../etc/passwd", "nul\x00.service", "x" * 300, "a/../../b"])
def test_bad_names_address_no_unit(cluster: Cluster, command: str, arg: str) -> None:
    before = store(cluster)
    result = cluster.invoke(command, arg)
    assert result.exit_code != 0
    assert "not found" in result.stderr
    assert store(cluster) == before


def test_over_size_unit_file_is_refused_before_writing(cluster: Cluster) -> None:
    padding = "#" * 79 + "\n"
    text = HELLO + padding * (MAX_UNIT_BYTES // len(padding) + 1)
    Path("big.service").write_text(text)
    Path("big@.service").write_text(text)  # a local template for an instance, likewise
    size = len(text.encode())
    before = store(cluster)
    for command, arg, what in [
        ("submit", "big.service", "Unit(big.service)"),
        ("start", "big.service", "Unit(big.service)"),
        ("start", "big@1.service", "template Unit(big@.service)"),
    ]:
        result = cluster.invoke(command, arg)
        assert result.exit_code == 1
        assert result.stderr == (
            f"Error creating units: failed getting {what} from file: "
            f"unit file too large: {size} bytes (max {MAX_UNIT_BYTES})\n"
        )
    assert store(cluster) == before
    # Exactly at the limit is fine.
    Path("edge.service").write_bytes(Path("big.service").read_bytes()[:MAX_UNIT_BYTES])
    assert cluster.invoke("submit", "edge.service").exit_code == 0


def test_huge_file_is_not_read_whole(tmp_path: Path) -> None:
    """Only the limit (+1 byte) is read: a huge file, a FIFO or /dev/zero is refused, not
    read into memory first."""
    huge = tmp_path / "huge.service"
    with huge.open("wb") as f:
        f.truncate(64 * MAX_UNIT_BYTES)  # sparse: costs no disk
    tracemalloc.start()
    try:
        with pytest.raises(UnitFileError, match=f"too large: {64 * MAX_UNIT_BYTES} bytes"):
            read_unit_file(str(huge))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * MAX_UNIT_BYTES


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"[Unit]\nDescription=caf\xe9\n", "line 2: unit file is not valid UTF-8 (byte offset 22)"),
        (b"\xff\xfe[\x00U\x00", "line 1: unit file is not valid UTF-8 (byte offset 0)"),  # UTF-16
        (b"[Service]\nExecStart=/bin/\xed\xa0\x80\n", "line 2: unit file is not valid UTF-8"),
    ],
)
def test_invalid_utf8_unit_file_is_refused(cluster: Cluster, data: bytes, message: str) -> None:
    Path("latin1.service").write_bytes(data)
    before = store(cluster)
    for command in ("submit", "start"):
        result = cluster.invoke(command, "latin1.service")
        assert result.exit_code == 1
        assert result.stderr.startswith(
            f"Error creating units: failed getting Unit(latin1.service) from file: {message}"
        )
    assert store(cluster) == before


def test_replace_with_a_bad_file_keeps_the_stored_unit(cluster: Cluster) -> None:
    Path("running.service").write_bytes(b"[Service]\nExecStart=/bin/\xff\n")
    before = store(cluster)
    result = cluster.invoke("start", "--replace", "running.service")
    assert result.exit_code == 1
    assert "not valid UTF-8" in result.stderr
    assert store(cluster) == before
    unit = cluster.unit("running.service")
    assert unit.target_state is TargetState.LAUNCHED


# ---- [X-Fleet] options fleet would silently ignore (beyond fleet: refused) -----------------

BAD_XFLEET = [
    (
        "MachineMetdata=region=east",
        'unknown option "MachineMetdata" in [X-Fleet] section (did you mean MachineMetadata?);'
        " add --allow-unknown-options to submit it anyway",
    ),
    ("MachineMetadata=region", 'invalid value "region" for MachineMetadata in [X-Fleet]'),
    ("MachineMetadata==x", 'invalid value "=x" for MachineMetadata in [X-Fleet]'),
    ("Global=perhaps", 'invalid value "perhaps" for Global in [X-Fleet] section: expected a'),
    (
        "Conflicts=[",
        'invalid value "[" for Conflicts in [X-Fleet] section: malformed glob pattern "["',
    ),
    (
        "MachineOf=%n",
        'invalid value "%n" (expanded: "bad.service") for MachineOf in [X-Fleet] section:'
        " a unit cannot be a MachineOf peer of itself",
    ),
    (
        "Replaces=bad.service",
        'invalid value "bad.service" for Replaces in [X-Fleet] section: a unit cannot replace'
        " itself",
    ),
]


@pytest.mark.parametrize("command", ["submit", "load", "start"])
@pytest.mark.parametrize(("line", "message"), BAD_XFLEET)
def test_bad_xfleet_options_are_refused_and_nothing_is_written(
    cluster: Cluster, command: str, line: str, message: str
) -> None:
    """The good unit before the bad one is not created either: every argument is checked
    before anything is written (fleet created good.service, then failed)."""
    Path("good.service").write_text(HELLO)
    Path("bad.service").write_text(HELLO + f"\n[X-Fleet]\n{line}\n")
    before = store(cluster)
    result = cluster.invoke(command, "good.service", "bad.service")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith(f"Error creating units: unit bad.service: {message}")
    assert result.stderr.count("\n") == 1
    assert store(cluster) == before


def test_an_instance_is_checked_with_its_template_named(cluster: Cluster) -> None:
    cluster.add_unit("bad@.service", HELLO_TEMPLATE + "\n[X-Fleet]\nMachineOf=%p@%i.service\n")
    before = store(cluster)
    result = cluster.invoke("start", "running.service", "bad@1.service")
    assert result.exit_code == 1
    assert result.stderr == (
        "Error creating units: unit bad@1.service (from template bad@.service): invalid value"
        ' "%p@%i.service" (expanded: "bad@1.service") for MachineOf in [X-Fleet] section:'
        " a unit cannot be a MachineOf peer of itself\n"
    )
    assert store(cluster) == before


@pytest.mark.parametrize(
    "files",
    [
        # a file that does not parse, after a good one
        {"good.service": HELLO, "bad.service": "[Unit\nDescription=x\n"},
        # fleet's own combination check, after a good one
        {"good.service": HELLO, "bad.service": "[X-Fleet]\nMachineID=abc\nGlobal=true\n"},
        # an instance whose template is nowhere, after a good one
        {"good.service": HELLO},
    ],
)
@pytest.mark.parametrize("command", ["submit", "load", "start"])
def test_a_failing_command_changes_nothing(
    cluster: Cluster, command: str, files: dict[str, str]
) -> None:
    for name, text in files.items():
        Path(name).write_text(text)
    last = "bad.service" if "bad.service" in files else "nowhere@1.service"
    before = store(cluster)
    result = cluster.invoke(command, "good.service", "running.service", last)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith("Error creating units: ")
    assert store(cluster) == before


def test_replace_with_bad_options_keeps_the_stored_unit(cluster: Cluster) -> None:
    Path("running.service").write_text(HELLO + "\n[X-Fleet]\nGlobal=perhaps\n")
    before = store(cluster)
    result = cluster.invoke("start", "--replace", "running.service")
    assert result.exit_code == 1
    assert "for Global in [X-Fleet]" in result.stderr
    assert store(cluster) == before


def test_an_unused_local_file_is_not_checked(cluster: Cluster) -> None:
    """Without --replace an existing unit is used as stored (fleet's rule): the local file is
    only compared, so its problems are not the command's (it warns that it differs)."""
    Path("running.service").write_text(HELLO + "\n[X-Fleet]\nGlobal=perhaps\n")
    result = cluster.invoke("start", "--no-block", "running.service")
    assert result.exit_code == 0
    assert "differs from local unit file" in result.stderr


def test_allow_unknown_options_accepts_unknown_keys_only(cluster: Cluster) -> None:
    Path("odd.service").write_text(HELLO + "\n[X-Fleet]\nWeight=3\n")
    Path("bad.service").write_text(HELLO + "\n[X-Fleet]\nWeight=3\nGlobal=perhaps\n")
    before = store(cluster)
    result = cluster.invoke("submit", "--allow-unknown-options", "odd.service", "bad.service")
    assert result.exit_code == 1
    assert "for Global in [X-Fleet]" in result.stderr
    assert store(cluster) == before
    result = cluster.invoke("submit", "--allow-unknown-options", "odd.service")
    assert result.exit_code == 0
    assert result.stdout == "Unit odd.service inactive\n"
    assert result.stderr == (
        'WARNING: Unit odd.service: unrecognized requirement in [X-Fleet] section: "Weight"\n'
    )
    assert cluster.unit("odd.service") is not None


def test_a_template_submitted_with_its_instance_serves_it(cluster: Cluster) -> None:
    """Nothing is in the cluster while the command is checked, yet the instance finds the
    template given before it (fleet found it in the cluster, created a moment before)."""
    Path("units").mkdir()
    Path("units/t@.service").write_text(HELLO_TEMPLATE + "\n[X-Fleet]\nMachineMetadata=r=%i\n")
    result = cluster.invoke("submit", "units/t@.service", "t@1.service")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "Unit t@.service inactive\nUnit t@1.service inactive\n"
    assert cluster.unit("t@1.service").hash == cluster.unit("t@.service").hash


def test_a_command_s_units_land_in_one_transaction(
    cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through etcd a submit writes every unit (and its body) in one transaction: an etcd
    error on the way leaves none of them, not the first few."""
    names = ["one.service", "two.service", "three.service"]
    for name in names:
        (tmp_path / name).write_text(f"[Service]\nExecStart=/bin/echo {name}\n")
    before = cluster.kv.revision
    result = cluster.invoke("submit", *names, "web@4.service")
    assert result.exit_code == 0, result.output
    assert cluster.kv.revision == before + 1
    for name in ("four.service", "five.service"):
        (tmp_path / name).write_text(f"[Service]\nExecStart=/bin/echo {name}\n")
    kept = store(cluster)

    async def refused(*args: object, **kwargs: object) -> object:
        raise RegistryUnavailable("etcd went away")

    monkeypatch.setattr(cluster.kv, "txn", refused)
    result = cluster.invoke("submit", "four.service", "five.service")
    assert result.exit_code == 1
    assert "Error creating units: failed creating four.service, five.service" in result.output
    assert store(cluster) == kept
