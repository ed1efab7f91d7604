"""fleetctl's command line: global flags and FLEETCTL_* env, driver choice, prefix matching,
exit codes and usage errors (fleet's §9 quirks fixed), help, version, shell completion."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_fleetctl_harness import HELLO_TEMPLATE, M1, M2, Cluster

from fleetctl import client as client_module
from fleetctl.cli import cli
from fleetctl.settings import (
    DEFAULT_API_ENDPOINT,
    DEFAULT_ETCD_ENDPOINT,
    DEFAULT_SOCKET,
    Driver,
    Settings,
    select_target,
)
from fleetctl.ssh.config import DEFAULT_IDENTITIES, SshConfig
from fleetctl.transport import ssh_options
from fleetd import __version__
from fleetd.errors import ConfigError


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> Cluster:
    return Cluster().install(monkeypatch)


# ---- driver selection ------------------------------------------------------------------------


def _never(path: str) -> bool:
    return False


def _always(path: str) -> bool:
    return True


@pytest.mark.parametrize(
    ("driver", "endpoint", "socket", "expected"),
    [
        # no endpoint: the local socket if it exists, else etcd on localhost
        (None, None, True, (Driver.API, (DEFAULT_API_ENDPOINT,))),
        (None, None, False, (Driver.ETCD, (DEFAULT_ETCD_ENDPOINT,))),
        ("etcd", None, True, (Driver.ETCD, (DEFAULT_ETCD_ENDPOINT,))),
        ("API", None, False, (Driver.API, (DEFAULT_API_ENDPOINT,))),
        # the endpoint decides
        (None, "unix:///run/x.sock", False, (Driver.API, ("unix:///run/x.sock",))),
        (None, "file:///run/x.sock", False, (Driver.API, ("file:///run/x.sock",))),
        (None, "http://10.0.0.1:2379", False, (Driver.ETCD, ("http://10.0.0.1:2379",))),
        (None, "https://e:4001", False, (Driver.ETCD, ("https://e:4001",))),
        (None, "http://10.0.0.1:49153", False, (Driver.API, ("http://10.0.0.1:49153",))),
        (None, "https://fleet.example", False, (Driver.API, ("https://fleet.example",))),
        (
            None,
            "http://a:2379, http://b:2379",
            False,
            (Driver.ETCD, ("http://a:2379", "http://b:2379")),
        ),
        # an explicit driver wins, in any case
        ("ETCD", "http://10.0.0.1:8080", False, (Driver.ETCD, ("http://10.0.0.1:8080",))),
        ("Api", "http://10.0.0.1:2379", False, (Driver.API, ("http://10.0.0.1:2379",))),
    ],
)
def test_select_target(
    driver: str | None,
    endpoint: str | None,
    socket: bool,
    expected: tuple[Driver, tuple[str, ...]],
) -> None:
    target = select_target(
        Settings(endpoint=endpoint, driver=driver), _always if socket else _never
    )
    assert (target.driver, target.endpoints) == expected


def test_tunnel_without_endpoint_means_the_remote_socket() -> None:
    target = select_target(Settings(tunnel="bastion"), _never)
    assert (target.driver, target.endpoints) == (Driver.API, (DEFAULT_API_ENDPOINT,))


def test_select_target_checks_the_default_socket_path() -> None:
    seen: list[str] = []
    select_target(Settings(), lambda path: seen.append(path) or False)
    assert seen == [DEFAULT_SOCKET]


def test_a_chosen_default_endpoint_says_why_a_given_one_does_not() -> None:
    fallback = select_target(Settings(), _never)
    assert fallback.endpoints == ("http://127.0.0.1:2379",)
    assert "no --endpoint or FLEETCTL_ENDPOINT was given" in fallback.defaulted
    assert f"no fleetd socket {DEFAULT_SOCKET}" in fallback.defaulted
    assert "fell back to etcd at http://127.0.0.1:2379" in fallback.defaulted
    assert DEFAULT_SOCKET in select_target(Settings(), _always).defaulted
    assert select_target(Settings(endpoint="http://10.0.0.1:2379"), _never).defaulted == ""


def test_api_driver_uses_first_endpoint_and_says_so() -> None:
    target = select_target(Settings(endpoint="http://a:80,http://b:80"), _never)
    assert target.endpoints == ("http://a:80",)
    assert target.warning == "multiple endpoints provided but only the first (http://a:80) is used"
    assert select_target(Settings(endpoint="unix:///x.sock"), _never).unix_socket == "/x.sock"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (Settings(driver="bogus"), 'unrecognized driver "bogus"'),
        (Settings(endpoint="127.0.0.1:2379"), "URL scheme undefined"),
        (
            Settings(endpoint="unix://var/run/fleet.sock"),
            'unable to connect to host "var" with scheme "unix"',
        ),
        (Settings(endpoint="ftp://x"), 'unsupported URL scheme "ftp"'),
        (Settings(endpoint="unix:///x.sock", driver="etcd"), "etcd driver needs http"),
    ],
)
def test_select_target_errors(settings: Settings, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        select_target(settings, _never)


def test_unusable_endpoint_is_an_init_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # The real factory, not the harness: the error comes before any connection.
    from click.testing import CliRunner

    from fleetctl.cli import cli

    for args, message in [
        (["--driver", "bogus"], 'Unable to initialize client: unrecognized driver "bogus"\n'),
        (
            ["--endpoint", "unix://var/run/fleet.sock"],
            'Unable to initialize client: unable to connect to host "var" with scheme "unix"\n',
        ),
    ]:
        result = CliRunner().invoke(cli, [*args, "list-machines"])
        assert result.exit_code == 1
        assert result.stderr == message
        assert result.stdout == ""


def test_tunnel_address_gets_port_22() -> None:
    assert Settings(tunnel="bastion").tunnel_address == "bastion:22"
    assert Settings(tunnel="bastion:2222").tunnel_address == "bastion:2222"
    assert Settings().tunnel_address == ""


# ---- flags and environment -----------------------------------------------------------------


def test_defaults(cluster: Cluster) -> None:
    assert cluster.invoke("list-machines").exit_code == 0
    assert cluster.settings[-1] == Settings()
    assert Settings().etcd_key_prefix == "/fleet/"


def test_env_then_flag_precedence(cluster: Cluster) -> None:
    env = {
        "FLEETCTL_ENDPOINT": "http://env:2379",
        "FLEETCTL_DRIVER": "etcd",
        "FLEETCTL_TUNNEL": "bastion",
        "FLEETCTL_SSH_USERNAME": "admin",
        "FLEETCTL_STRICT_HOST_KEY_CHECKING": "false",
        "FLEETCTL_REQUEST_TIMEOUT": "7.5",
        "FLEETCTL_SSH_TIMEOUT": "2",
        "FLEETCTL_ETCD_KEY_PREFIX": "/other/",
        "FLEETCTL_KNOWN_HOSTS_FILE": "/kh",
        "FLEETCTL_CA_FILE": "/ca",
        "FLEETCTL_ETCD_CERTFILE": "/cert",  # deprecated alias, still read
        "FLEETCTL_KEY_FILE": "",  # empty: ignored
        "FLEETCTL_DEBUG": "true",
    }
    assert cluster.invoke("list-machines", env=env).exit_code == 0
    assert cluster.settings[-1] == Settings(
        endpoint="http://env:2379",
        driver="etcd",
        tunnel="bastion",
        ssh_username="admin",
        strict_host_key_checking=False,
        request_timeout=7.5,
        ssh_timeout=2.0,
        etcd_key_prefix="/other/",
        known_hosts_file="/kh",
        ca_file="/ca",
        cert_file="/cert",
        debug=True,
    )
    result = cluster.invoke(
        "--endpoint",
        "http://flag:2379",
        "--ssh-username=root",
        "--strict-host-key-checking=true",
        "--request-timeout",
        "1",
        "list-machines",
        env=env,
    )
    assert result.exit_code == 0, result.output
    seen = cluster.settings[-1]
    assert (seen.endpoint, seen.ssh_username, seen.strict_host_key_checking) == (
        "http://flag:2379",
        "root",
        True,
    )
    assert (seen.request_timeout, seen.driver) == (1.0, "etcd")  # env where no flag


def test_ssh_identity_file_flag_and_env(cluster: Cluster, tmp_path: Path) -> None:
    # Beyond fleet: a key file for SSH (`fleet-cluster env` exports the variable).
    key = tmp_path / "id_ed25519"
    env = {"FLEETCTL_SSH_IDENTITY_FILE": str(key)}
    assert cluster.invoke("list-machines", env=env).exit_code == 0
    assert cluster.settings[-1].ssh_identity_file == str(key)
    assert ssh_options(cluster.settings[-1]).identity_file == str(key)
    result = cluster.invoke("list-machines", "--ssh-identity-file", "/flag/key", env=env)
    assert result.exit_code == 0, result.output
    assert cluster.settings[-1].ssh_identity_file == "/flag/key"  # flag over env
    result = cluster.invoke("--ssh-identity-file=/before", "list-machines")
    assert result.exit_code == 0, result.output
    assert ssh_options(cluster.settings[-1]).identity_file == "/before"
    assert ssh_options(Settings()).identity_file == ""


def test_ssh_identity_file_is_offered_first_after_the_agent(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text("Host configured\n    IdentityFile /from/config\n")
    resolver = SshConfig(str(config))
    dest = resolver.resolve("somewhere", 22, "root", "/cluster/key")
    assert dest.identity_files == ("/cluster/key", *DEFAULT_IDENTITIES)
    dest = resolver.resolve("configured", 22, "root", "/cluster/key")
    assert dest.identity_files == ("/cluster/key", "/from/config")
    assert resolver.resolve("somewhere", 22, "root").identity_files == DEFAULT_IDENTITIES
    # Named again by the config: offered once, first.
    dest = resolver.resolve("configured", 22, "root", "/from/config")
    assert dest.identity_files == ("/from/config",)


def test_global_flags_after_the_command(cluster: Cluster) -> None:
    # cobra's persistent flags work after the command name; scripts rely on it.
    result = cluster.invoke("list-machines", "--endpoint", "http://x:2379", "--no-legend")
    assert result.exit_code == 0, result.output
    assert cluster.settings[-1].endpoint == "http://x:2379"
    result = cluster.invoke("list-units", "--debug=true", "--strict-host-key-checking=false")
    assert result.exit_code == 0, result.output
    assert cluster.settings[-1].debug is True
    assert cluster.settings[-1].strict_host_key_checking is False


@pytest.mark.parametrize(
    "args",
    [
        ["list-units", "--full=true"],
        ["list-units", "--l=true"],
        ["list-units", "-l"],
        ["list-units", "--l"],
        ["list-units", "--full"],
    ],
)
def test_full_flag_spellings(cluster: Cluster, args: list[str]) -> None:
    cluster.add_machine("113f16a7f2c54d35b3cde2e2ad5c2f10", "10.0.0.1")
    cluster.run_unit("hello.service")
    result = cluster.invoke(*args, "--no-legend")
    assert result.exit_code == 0, result.output
    assert "113f16a7f2c54d35b3cde2e2ad5c2f10/10.0.0.1" in result.stdout


def test_remote_command_args_are_left_alone(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # After `ssh <target>`, flags belong to the remote command, even global-looking ones.
    from fleetctl import remote

    seen: list[tuple[str, list[str], bool]] = []

    async def fake_target(client: object, target: str, **kw: object) -> str:
        return "10.0.0.1"

    class Fake:
        def run(self, address: str, command: str | None, **kw: object) -> int:
            seen.append((address, [command or ""], False))
            return 0

        def close(self) -> None:
            pass

    monkeypatch.setattr(remote, "ssh_target", fake_target)
    monkeypatch.setattr("fleetctl.transport.open_transport", lambda options: Fake())
    result = cluster.invoke(
        "ssh", "--ssh-port", "22", "host", "tool", "--debug=true", "--endpoint", "x", "--A=no"
    )
    assert result.exit_code == 0, result.output
    assert seen == [("10.0.0.1:22", ["tool --debug=true --endpoint x --A=no"], False)]
    assert cluster.settings[-1].debug is False


def test_bool_flag_false_value(cluster: Cluster) -> None:
    cluster.run_unit("hello.service")
    result = cluster.invoke("list-units", "--no-legend=false")
    assert result.stdout.startswith("UNIT")
    result = cluster.invoke("list-units", "--no-legend=maybe")
    assert result.exit_code == 2
    assert "invalid argument 'maybe' for --no-legend" in result.stderr


# ---- dispatch and exit codes ---------------------------------------------------------------


def test_unique_prefix_runs_the_command(cluster: Cluster) -> None:
    cluster.add_machine("113f16a7f2c54d35b3cde2e2ad5c2f10", "10.0.0.1")
    result = cluster.invoke("list-m")
    assert result.exit_code == 0
    assert result.stdout.startswith("MACHINE")
    assert cluster.invoke("list-m", "--help").stdout.startswith("Usage: fleetctl list-machines")


def test_ambiguous_prefix_is_a_usage_error(cluster: Cluster) -> None:
    result = cluster.invoke("list")
    assert result.exit_code == 2
    assert result.stdout == ""
    assert 'unknown command "list" for "fleetctl"' in result.stderr
    assert "Did you mean this?\n\tlist-machines\n\tlist-unit-files\n\tlist-units\n" in (
        result.stderr
    )
    assert "Usage: fleetctl" in result.stderr


def test_unknown_command_and_bad_flag_exit_non_zero(cluster: Cluster) -> None:
    result = cluster.invoke("bogus")
    assert (result.exit_code, result.stdout) == (2, "")
    assert 'unknown command "bogus" for "fleetctl"' in result.stderr
    result = cluster.invoke("stauts")  # a typo gets a suggestion
    assert "Did you mean this?\n\tstatus" in result.stderr
    result = cluster.invoke("list-units", "--bogus")
    assert result.exit_code == 2
    assert "No such option '--bogus'" in result.stderr
    result = cluster.invoke("list-unit-files", "--l")  # as in fleet: no --l here
    assert result.exit_code == 2


@pytest.mark.parametrize(
    "command", ["submit", "load", "start", "stop", "unload", "destroy", "restart", "status"]
)
def test_no_units_given_is_a_usage_error(cluster: Cluster, command: str) -> None:
    result = cluster.invoke(command)
    assert result.exit_code == 2
    assert "No units given" in result.stderr
    assert f"Usage: fleetctl {command}" in result.stderr


def test_version_flag_prints_the_client_only(cluster: Cluster) -> None:
    for args in (["--version"], ["-v"]):
        result = cluster.invoke(*args)
        assert (result.exit_code, result.stdout) == (0, f"fleetctl version {__version__}\n")
    assert cluster.settings == []  # no client for the flag


def test_version_command_adds_the_clusters_fleetd_versions(cluster: Cluster) -> None:
    cluster.add_machine(M1, "10.0.0.1")
    cluster.add_machine(M2, "10.0.0.2")
    result = cluster.invoke("version")
    assert result.exit_code == 0, result.output
    # fleet's own line first, then one line per fleetd version (the harness registers 0.1.0)
    assert result.stdout == (
        f"fleetctl version {__version__}\nfleetd version 0.1.0 (2 machines: {M1[:8]}, {M2[:8]})\n"
    )
    as_json = json.loads(cluster.invoke("version", "-o", "json").stdout)
    assert as_json == {
        "fleetctl": __version__,
        "fleetd": [{"version": "0.1.0", "machines": sorted([M1, M2])}],
        "error": None,
    }


def test_version_command_without_a_cluster_still_prints_the_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("FLEETCTL_ENDPOINT", raising=False)
    args = ["--driver=etcd", "--endpoint=http://127.0.0.1:9", "--request-timeout=0.5", "version"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0
    assert result.stdout == f"fleetctl version {__version__}\n"
    assert "fleetd version unknown: Unable to initialize client" in result.stderr
    result = CliRunner().invoke(cli, [*args, "-o", "json"])
    body = json.loads(result.stdout)
    assert (body["fleetctl"], body["fleetd"]) == (__version__, [])
    assert "Unable to initialize client" in body["error"]


def test_help(cluster: Cluster) -> None:
    for args in ([], ["help"], ["--help"], ["-h"]):
        result = cluster.invoke(*args)
        assert result.exit_code == 0, args
        assert "list-unit-files" in result.stdout
    result = cluster.invoke("help", "journal")
    assert result.exit_code == 0
    assert result.stdout.startswith("Usage: fleetctl journal")
    assert "--lines" in result.stdout
    assert cluster.invoke("help", "bogus").exit_code == 2
    assert cluster.invoke("start", "-h").stdout.startswith("Usage: fleetctl start")


def test_fleetctls_help_has_fleets_version_section(cluster: Cluster) -> None:
    # fleet's usage template: "VERSION:" then the bare version on a tab-indented line, after
    # the usage, in fleetctl's own help only.
    section = f"\n\nVERSION:\n\t{__version__}\n\n"
    for args in ([], ["help"], ["--help"], ["-h"]):
        result = cluster.invoke(*args)
        assert section in result.stdout, args
        usage, version, options = (
            result.stdout.index("Usage: fleetctl"),
            result.stdout.index(section),
            result.stdout.index("Options:"),
        )
        assert usage < version < options, args
    for args in (["help", "stop"], ["stop", "--help"], ["list-units", "-h"]):
        result = cluster.invoke(*args)
        assert result.exit_code == 0, args
        assert "VERSION" not in result.stdout, args


def test_verify_is_deprecated_with_exit_2(cluster: Cluster) -> None:
    result = cluster.invoke("verify", "hello.service")
    assert result.exit_code == 2
    assert (
        "WARNING: The signed/verified units feature is DEPRECATED and cannot be used.\n"
        in result.stderr
    )


def test_unexpected_registry_error_is_one_line_and_exit_1(cluster: Cluster) -> None:
    cluster.kv.set_unavailable(True)
    result = cluster.invoke("cat", "hello")
    assert result.exit_code == 1
    assert result.stderr == "fake etcd is unavailable\n"


def test_make_client_is_the_seam(monkeypatch: pytest.MonkeyPatch) -> None:
    # The commands look the factory up at call time, so tests (and tools) can replace it.
    cluster = Cluster().install(monkeypatch)
    assert client_module.make_client == cluster.make_client


# ---- shell completion ------------------------------------------------------------------------


def _complete(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleetctl"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_bash_completion_script() -> None:
    result = _complete({"_FLEETCTL_COMPLETE": "bash_source"})
    assert result.returncode == 0
    assert "_fleetctl_completion()" in result.stdout
    assert "complete -o nosort -F _fleetctl_completion fleetctl" in result.stdout


def test_completion_of_commands_and_prefix() -> None:
    result = _complete(
        {"_FLEETCTL_COMPLETE": "bash_complete", "COMP_WORDS": "fleetctl list-", "COMP_CWORD": "1"}
    )
    assert result.returncode == 0
    assert result.stdout.split() == [
        "plain,list-machines",
        "plain,list-unit-files",
        "plain,list-units",
    ]


def test_completion_of_units_never_fails(tmp_path: object) -> None:
    # No cluster reachable: completing unit names gives nothing, quickly and silently.
    result = _complete(
        {
            "_FLEETCTL_COMPLETE": "bash_complete",
            "COMP_WORDS": "fleetctl --endpoint http://127.0.0.1:9 stop hel",
            "COMP_CWORD": "4",
        }
    )
    assert result.returncode == 0
    assert result.stdout.strip() == ""
    assert result.stderr == ""


def test_completion_of_unit_names_from_the_cluster(cluster: Cluster) -> None:
    from click.shell_completion import ShellComplete

    from fleetctl.cli import cli

    cluster.add_unit("hello.service")
    cluster.add_unit("hello@.service", HELLO_TEMPLATE)
    cluster.add_unit("other.service")
    complete = ShellComplete(cli, {}, "fleetctl", "_FLEETCTL_COMPLETE")
    found = complete.get_completions(["stop"], "hel")
    assert [c.value for c in found] == ["hello.service", "hello@.service"]
    # submit/load/start take local files: the shell completes paths
    assert [c.type for c in complete.get_completions(["start"], "x")] == ["file"]


def test_main_entry_point_keeps_stdout_clean() -> None:
    result = _complete({"FLEETCTL_ENDPOINT": "unix:///nonexistent/fleet.sock"})  # no command
    assert result.returncode == 0
    assert result.stdout.startswith("Usage: fleetctl")
    result = subprocess.run(
        [sys.executable, "-m", "fleetctl", "--endpoint", "unix:///nonexistent.sock", "list-units"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("Error retrieving list of units from repository: ")


def test_deprecated_experimental_api_flag_is_accepted(cluster: Cluster) -> None:
    for flag in ("--experimental-api=false", "--no-experimental-api", "--experimental-api"):
        assert cluster.invoke(flag, "list-machines").exit_code == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--endpoint", "https://10.0.0.1:8443", "--cert-file", "/c.pem"],
            "Unable to initialize client: --cert-file and --key-file go together",
        ),
        (
            ["--endpoint", "https://10.0.0.1:8443", "--ca-file", "/nonexistent/ca.pem"],
            "Unable to initialize client: ",
        ),
    ],
)
def test_tls_settings_errors(args: list[str], message: str) -> None:
    from click.testing import CliRunner

    from fleetctl.cli import cli

    result = CliRunner().invoke(cli, [*args, "list-units"])
    assert result.exit_code == 1
    assert result.stderr.startswith(message)


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--request-timeout=0"], {}, "Invalid value for '--request-timeout': 0.0 is not in the"),
        (["--request-timeout=-1"], {}, "Invalid value for '--request-timeout': -1.0 is not in"),
        (["--request-timeout=abc"], {}, "Invalid value for '--request-timeout': 'abc' is not a"),
        ([], {"FLEETCTL_REQUEST_TIMEOUT": "-2"}, "Invalid value for '--request-timeout': -2.0"),
        (["--ssh-timeout=0"], {}, "Invalid value for '--ssh-timeout': 0.0 is not in the range"),
        ([], {"FLEETCTL_SSH_TIMEOUT": "x"}, "Invalid value for '--ssh-timeout': 'x' is not a"),
        (["--strict-host-key-checking=maybe"], {}, "invalid argument 'maybe' for --strict-host"),
    ],
)
def test_bad_flag_values_are_usage_errors_naming_the_flag(
    cluster: Cluster, args: list[str], env: dict[str, str], message: str
) -> None:
    before = cluster.kv.dump("")
    result = cluster.invoke(*args, "destroy", "hello.service", env=env)
    assert result.exit_code == 2
    assert message in result.stderr
    assert cluster.settings == []  # refused before any client was made
    assert cluster.kv.dump("") == before
