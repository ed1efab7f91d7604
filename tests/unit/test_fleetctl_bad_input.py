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
from fleetd.errors import UnitFileError
from fleetd.model import TargetState
from fleetd.unitfile import MAX_UNIT_BYTES


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
