"""fleetd's command line: fleet's flags and messages, -o overrides, exit codes."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

import fleetd
import fleetd.__main__ as fleetd_main
from fleetd import cli, collector
from fleetd.cli import FleetdArgs, UsageError, main, parse_args, translate_go_flags
from fleetd.config import Config
from fleetd.log import configure_logging, get_logger

REPO = Path(__file__).resolve().parents[2]
VERSION_LINE = f"fleetd version {fleetd.__version__}\n"
NO_ARGS = "takes no arguments. Did you mean to invoke fleetctl instead?"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("FLEET_"):
            monkeypatch.delenv(name)


class FakeServer:
    """Stands in for fleetd.server (written separately); records what main passed to run()."""

    def __init__(self, result: object = 0) -> None:
        self.result = result
        self.calls: list[tuple[Config, str | None]] = []

    def run(self, config: Config, config_path: str | None = None) -> object:
        self.calls.append((config, config_path))
        return self.result


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> FakeServer:
    fake = FakeServer()
    module = types.ModuleType("fleetd.server")
    module.run = fake.run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fleetd.server", module)
    # The daemon tunes the process's GC (fleetd/collector.py); not this test process's.
    monkeypatch.setattr(collector, "tune", lambda: None)
    return fake


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["-config", "/x"], ["--config", "/x"]),
        (["-config=/x"], ["--config=/x"]),
        (["--config", "/x"], ["--config", "/x"]),
        (["-version"], ["--version"]),
        (["-help"], ["--help"]),
        (["-h"], ["-h"]),
        (["-o", "a=b", "-config", "/x"], ["-o", "a=b", "--config", "/x"]),
        (["-config", "-version"], ["--config", "-version"]),  # a value is never translated
        (["version", "-config", "/x"], ["version", "-config", "/x"]),  # stops at a positional
        (["--", "-version"], ["--", "-version"]),
        (["-oagent_ttl=1s"], ["-oagent_ttl=1s"]),
        ([], []),
    ],
)
def test_translate_go_flags(argv: list[str], expected: list[str]) -> None:
    assert translate_go_flags(argv) == expected


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], FleetdArgs()),
        (["-config", "/etc/f.conf"], FleetdArgs(config_path="/etc/f.conf")),
        (["-config=/etc/f.conf"], FleetdArgs(config_path="/etc/f.conf")),
        (["--config", "/etc/f.conf"], FleetdArgs(config_path="/etc/f.conf")),
        (["--config=/etc/f.conf"], FleetdArgs(config_path="/etc/f.conf")),
        (["-version"], FleetdArgs(show_version=True)),
        (["--version"], FleetdArgs(show_version=True)),
        (["version"], FleetdArgs(show_version=True)),
        (["version", "extra", "--bogus"], FleetdArgs(show_version=True)),  # fleet ignored them
        (["-h"], FleetdArgs(show_help=True)),
        (["-help"], FleetdArgs(show_help=True)),
        (
            ["-o", "agent_ttl=10s", "--option", "metadata=a=b,c=d", "-overbosity=1"],
            FleetdArgs(overrides={"agent_ttl": "10s", "metadata": "a=b,c=d", "verbosity": "1"}),
        ),
        (["-o", "public_ip="], FleetdArgs(overrides={"public_ip": ""})),
        (["-o", "verbosity=1", "-o", "verbosity=2"], FleetdArgs(overrides={"verbosity": "2"})),
    ],
)
def test_parse_args(argv: list[str], expected: FleetdArgs) -> None:
    assert parse_args(argv) == expected


@pytest.mark.parametrize(
    ("argv", "message", "exit_code"),
    [
        (["submit"], f"/usr/bin/fleetd {NO_ARGS}", 1),
        (["list-units", "-version"], f"/usr/bin/fleetd {NO_ARGS}", 1),
        (["--", "version2"], f"/usr/bin/fleetd {NO_ARGS}", 1),
        (["--bogus"], "No such option", 2),
        (["-config"], "requires an argument", 2),
        (["-o", "agent_ttl"], "-o expects KEY=VALUE", 2),
        (["-o", "=1"], "-o expects KEY=VALUE", 2),
    ],
)
def test_parse_args_errors(argv: list[str], message: str, exit_code: int) -> None:
    with pytest.raises(UsageError, match=message) as info:
        parse_args(argv, prog_name="/usr/bin/fleetd")
    assert info.value.exit_code == exit_code


@pytest.mark.parametrize("argv", [["version"], ["-version"], ["--version"], ["version", "x"]])
def test_main_prints_version(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert (out, err) == (VERSION_LINE, "")


def test_main_refuses_positional_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list-units"], prog_name="/usr/bin/fleetd") == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"/usr/bin/fleetd {NO_ARGS}\nUsage: /usr/bin/fleetd [OPTIONS]")
    assert "--config PATH" in err


def test_main_uses_argv0_as_fleet_did(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["/opt/bin/fleetd", "start"])
    assert main() == 1
    assert capsys.readouterr().err.startswith(f"/opt/bin/fleetd {NO_ARGS}\n")


def test_main_bad_flag_prints_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--bogus"], prog_name="fleetd") == 2
    err = capsys.readouterr().err
    assert "No such option" in err
    assert "Usage: fleetd" in err


def test_main_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"], prog_name="fleetd") == 0
    out = capsys.readouterr().out
    assert out.startswith("Usage: fleetd [OPTIONS] [version]")
    assert "fleetd is the server component of fleet" in out
    assert "Option precedence" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-config", "/nonexistent/fleet.conf"], "unable to use config file /nonexistent/"),
        (["-o", "agent_ttl=10"], "command line -o: agent_ttl: missing unit in duration"),
        (["-o", "etcd_server=http://a:2379"], 'did you mean "etcd_servers"?'),
    ],
)
def test_main_bad_config_is_one_line(
    argv: list[str], message: str, server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("fleetd: ")
    assert message in err
    assert err.count("\n") == 1
    assert "Traceback" not in err
    assert server.calls == []


def test_main_bad_config_file_names_file_and_line(
    tmp_path: Path, server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "fleet.conf"
    path.write_text("verbosity = 1\n[fleet]\n")
    assert main(["-config", str(path)]) == 1
    assert f"fleetd: {path}:2: section header" in capsys.readouterr().err


def test_main_runs_the_server_with_the_merged_config(
    tmp_path: Path, server: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "fleet.conf"
    path.write_text("verbosity = 1\nmetadata = role=web\npublic_ip = 10.0.0.1\n")
    monkeypatch.setenv("FLEET_PUBLIC_IP", "10.0.0.2")
    monkeypatch.setenv("FLEET_AGENT_TTL", "20s")
    assert main(["-config", str(path), "-o", "agent_ttl=5s"]) == 0
    ((config, config_path),) = server.calls
    assert config_path == str(path)
    assert config.config_file == str(path)
    assert config.verbosity == 1  # file
    assert config.metadata == {"role": "web"}  # file
    assert config.public_ip == "10.0.0.2"  # environment over file
    assert config.agent_ttl == 5.0  # flag over environment


@pytest.mark.parametrize(("result", "code"), [(0, 0), (3, 3), (None, 0)])
def test_main_returns_the_server_exit_code(
    tmp_path: Path, server: FakeServer, result: object, code: int
) -> None:
    server.result = result
    path = tmp_path / "fleet.conf"
    path.write_text("")
    assert main(["-config", str(path)]) == code


def test_dunder_main_raises_system_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "main", lambda: 7)
    with pytest.raises(SystemExit) as info:
        fleetd_main.main()
    assert info.value.code == 7


@pytest.mark.parametrize(("argv", "code"), [(["-version"], 0), (["bogus"], 1)])
def test_python_dash_m_fleetd(argv: list[str], code: int) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fleetd", *argv],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert result.returncode == code
    if code == 0:
        assert result.stdout == VERSION_LINE
    else:
        assert result.stderr.startswith(f"fleetd {NO_ARGS}\n")  # not ".../__main__.py"


# --------------------------------------------------------------------------------------------
# Logging (fleetd.log): one format for our events and stdlib records


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    chatty = {
        name: logging.getLogger(name).level for name in ("hpack", "aiohttp.access", "asyncio")
    }
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    for name, level in chatty.items():
        logging.getLogger(name).setLevel(level)
    structlog.reset_defaults()


def json_lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


@pytest.mark.usefixtures("restore_logging")
def test_json_logs_carry_timestamp_level_event_and_logger() -> None:
    stream = io.StringIO()
    configure_logging(0, stream=stream)  # not a TTY: JSON
    get_logger("fleetd.test").info("unit_started", unit="hello.service")
    (line,) = json_lines(stream)
    assert line["event"] == "unit_started"
    assert line["level"] == "info"
    assert line["logger"] == "fleetd.test"
    assert line["unit"] == "hello.service"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z", str(line["timestamp"]))


@pytest.mark.usefixtures("restore_logging")
def test_stdlib_records_share_the_format() -> None:
    stream = io.StringIO()
    configure_logging(0, stream=stream)
    logging.getLogger("aiohttp.server").warning("Error handling request %s", "/x")
    (line,) = json_lines(stream)
    assert line["event"] == "Error handling request /x"
    assert (line["level"], line["logger"]) == ("warning", "aiohttp.server")
    assert "timestamp" in line


@pytest.mark.usefixtures("restore_logging")
def test_exceptions_stay_on_one_json_line() -> None:
    stream = io.StringIO()
    configure_logging(0, stream=stream)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        get_logger("fleetd.test").exception("unit_failed")
    (line,) = json_lines(stream)
    assert "RuntimeError: boom" in str(line["exception"])


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize(
    ("verbosity", "debug_shown", "chatty_shown"), [(0, 0, 0), (1, 1, 0), (2, 1, 1)]
)
def test_verbosity_levels(verbosity: int, debug_shown: int, chatty_shown: int) -> None:
    stream = io.StringIO()
    configure_logging(verbosity, stream=stream)
    get_logger("fleetd.test").debug("detail_logged")
    logging.getLogger("hpack.hpack").debug("Decoded %s", "(b':status', b'200')")
    events = [line["event"] for line in json_lines(stream)]
    assert events.count("detail_logged") == debug_shown
    assert events.count("Decoded (b':status', b'200')") == chatty_shown


@pytest.mark.usefixtures("restore_logging")
def test_reconfiguring_replaces_the_handler() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging(0, stream=first)
    configure_logging(0, stream=second)
    get_logger("fleetd.test").info("once_logged")
    assert first.getvalue() == ""
    assert len(json_lines(second)) == 1


@pytest.mark.usefixtures("restore_logging")
def test_console_renderer_when_asked() -> None:
    stream = io.StringIO()
    configure_logging(0, json=False, stream=stream)
    get_logger("fleetd.test").info("unit_started", unit="a.service")
    text = stream.getvalue()
    assert "unit_started" in text
    assert "unit=a.service" in text
    assert not text.startswith("{")
