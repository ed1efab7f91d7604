"""fleetd.config: fleet.conf syntax (goini), layers and precedence, validation of each option.

The value syntax itself (Go's bools, ints, durations, fleet's lists) is test_config_values.py's;
the machine ID and public IP test_machine.py's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetd.config import (
    OPTIONS,
    Config,
    Setting,
    build_config,
    env_var,
    load_config,
    parse_fleet_conf,
)
from fleetd.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
NO_FILE = "/nonexistent/fleet.conf"  # default_path that never exists


def values(text: str) -> dict[str, str]:
    return {key: s.value for key, s in parse_fleet_conf(text, "t.conf").items()}


def build(**overrides: str) -> Config:
    return build_config({}, {}, overrides)


# --------------------------------------------------------------------------------------------
# fleet.conf syntax, as goini parsed it


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("verbosity=1", {"verbosity": "1"}),
        ("verbosity = 1", {"verbosity": "1"}),
        ("verbosity\t=\t2", {"verbosity": "2"}),
        ("  verbosity = 1  ", {"verbosity": "1"}),
        ("VERBOSITY=1", {"verbosity": "1"}),  # keys are lowercased
        ("Public_IP=1.2.3.4", {"public_ip": "1.2.3.4"}),
        ('public_ip="1.2.3.4"', {"public_ip": "1.2.3.4"}),
        ("public_ip='1.2.3.4'", {"public_ip": "1.2.3.4"}),
        ('public_ip = "1.2.3.4"', {"public_ip": "1.2.3.4"}),
        ('metadata = "a=b, c=d"', {"metadata": "a=b, c=d"}),  # spaces kept inside quotes
        ("metadata = 'a=\"x\"'", {"metadata": 'a="x"'}),
        ("public_ip = 1.2.3.4 # the uplink", {"public_ip": "1.2.3.4"}),
        ("public_ip = 1.2.3.4;the uplink", {"public_ip": "1.2.3.4"}),
        ("public_ip = 1.2.3.4#x", {"public_ip": "1.2.3.4"}),
        # The quoted forms must end the line; otherwise the bare form keeps the quotes (goini).
        ('metadata = "a=b" # note', {"metadata": '"a=b"'}),
        ('metadata = "a=b', {"metadata": '"a=b'}),
        ("metadata = a=b,c=d", {"metadata": "a=b,c=d"}),  # the value may contain "="
        ("public_ip =", {"public_ip": ""}),
        ("public_ip=", {"public_ip": ""}),
        ("public_ip = # nothing", {"public_ip": ""}),
        ("public_ip = ;nothing", {"public_ip": ""}),
        ('public_ip = ""', {"public_ip": ""}),
        ("public_ip = ''", {"public_ip": ""}),
        ("# verbosity=1", {}),
        ("; verbosity=1", {}),
        ("   # indented comment", {}),
        ("#", {}),
        ("", {}),
        ("\n\n   \n\t\n", {}),  # blank and whitespace-only lines (goini crashed on the latter)
        ("verbosity=1\r\npublic_ip=1.2.3.4\r\n", {"verbosity": "1", "public_ip": "1.2.3.4"}),
        ("verbosity=1\nverbosity=2", {"verbosity": "2"}),  # a later duplicate wins
        (
            "etcd_servers = http://a:2379,\\\n    http://b:2379",
            {"etcd_servers": "http://a:2379,http://b:2379"},
        ),
        ("metadata = a=b,\\\nc=d,\\\ne=f", {"metadata": "a=b,c=d,e=f"}),
        ("metadata = a=b\\\n\nverbosity=1", {"metadata": "a=b", "verbosity": "1"}),
        # A continued comment swallows the next line, as in goini.
        ("# note \\\nverbosity=1", {}),
        ("\u00a0verbosity=1\u3000", {"verbosity": "1"}),  # Go's unicode.IsSpace trims these
    ],
)
def test_fleet_conf_syntax(text: str, expected: dict[str, str]) -> None:
    assert values(text) == expected


def test_settings_record_file_and_line() -> None:
    settings = parse_fleet_conf("# c\n\nverbosity=1\nmetadata = a=b,\\\n c=d\n", "f.conf")
    assert settings["verbosity"] == Setting("1", "f.conf:3")
    assert settings["metadata"] == Setting("a=b,c=d", "f.conf:4")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[fleet]\nverbosity=1", 't.conf:1: section header "[fleet]" is not supported'),
        ("verbosity=1\n [Service] ", 't.conf:2: section header "[Service]"'),
        ("verbosity=1\nbogus_option=1", 't.conf:2: unknown option "bogus_option"'),
        ("etcd_server=http://a:2379", 'unknown option "etcd_server"; did you mean "etcd_servers"?'),
        ("verbosty = 1", 'did you mean "verbosity"?'),
        ("agent-ttl = 10s", 'did you mean "agent_ttl"?'),
        ("xyzzy=1", 't.conf:1: unknown option "xyzzy"'),
        ("verbosity", 't.conf:1: syntax error: expected key = value, got "verbosity"'),
        ("verbosity 1", "t.conf:1: syntax error"),
        ("a b = c", "t.conf:1: syntax error"),
        ("= 1", "t.conf:1: syntax error"),
        ("verbosity=1 \\", "t.conf:1: line continuation at the end of the file"),
        ("x=1\nverbosity=1\\\n", "t.conf:2: line continuation at the end of the file"),
    ],
)
def test_fleet_conf_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_fleet_conf(text, "t.conf")


def test_unknown_option_without_close_match_has_no_suggestion() -> None:
    with pytest.raises(ConfigError) as info:
        parse_fleet_conf("xyzzy=1", "t.conf")
    assert "did you mean" not in str(info.value)


# --------------------------------------------------------------------------------------------
# Layers and precedence


def write(tmp_path: Path, text: str, name: str = "fleet.conf") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults_without_any_source() -> None:
    config = load_config(None, {}, {}, default_path=NO_FILE)
    assert config == Config()
    assert config.etcd_servers == ("http://127.0.0.1:2379",)
    assert config.etcd_key_prefix == "/fleet/"
    assert config.agent_ttl == 30.0
    assert config.token_limit == 100
    assert config.max_unit_bytes == 1024 * 1024
    assert config.api_socket == "/var/run/fleet.sock"
    assert config.config_file == ""
    assert config.warnings == ()


def test_file_sets_values(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'etcd_servers=["http://10.0.0.1:2379", "http://10.0.0.2:2379"]\n'
        'metadata="region=us-west,az=1"\nagent_ttl="10s"\nverbosity=1\ndisable_engine=true\n',
    )
    config = load_config(path, {}, {}, default_path=NO_FILE)
    assert config.etcd_servers == ("http://10.0.0.1:2379", "http://10.0.0.2:2379")
    assert config.metadata == {"region": "us-west", "az": "1"}
    assert config.agent_ttl == 10.0
    assert config.verbosity == 1
    assert config.debug
    assert config.disable_engine is True
    assert config.config_file == path


# (file, environ, overrides, expected public_ip): flag > env > file > default
PRECEDENCE = [
    ("", {}, {}, ""),
    ("public_ip=10.0.0.1", {}, {}, "10.0.0.1"),
    ("public_ip=10.0.0.1", {"FLEET_PUBLIC_IP": "10.0.0.2"}, {}, "10.0.0.2"),
    ("public_ip=10.0.0.1", {"FLEET_PUBLIC_IP": ""}, {}, ""),  # set-but-empty counts
    ("public_ip=10.0.0.1", {"FLEET_PUBLIC_IP": "10.0.0.2"}, {"public_ip": "10.0.0.3"}, "10.0.0.3"),
    ("", {}, {"public_ip": "10.0.0.3"}, "10.0.0.3"),
    ("public_ip=10.0.0.1", {}, {"public_ip": ""}, ""),
    ("", {"FLEET_PUBLIC_IP": "10.0.0.2"}, {}, "10.0.0.2"),
    ("", {"fleet_public_ip": "10.0.0.2", "PUBLIC_IP": "10.0.0.4"}, {}, ""),  # exact name only
]


@pytest.mark.parametrize(("text", "environ", "overrides", "expected"), PRECEDENCE)
def test_precedence(
    tmp_path: Path,
    text: str,
    environ: Mapping[str, str],
    overrides: Mapping[str, str],
    expected: str,
) -> None:
    path = write(tmp_path, text)
    assert load_config(path, environ, overrides, default_path=NO_FILE).public_ip == expected


def test_empty_value_means_default_for_typed_options(tmp_path: Path) -> None:
    # fleet's flag.Set("") failed for int/float/bool and was ignored: the default stayed, and
    # the empty environment variable still shadowed the file.
    path = write(tmp_path, "verbosity=2\ntoken_limit=7\ndisable_engine=true\n")
    environ = {"FLEET_VERBOSITY": "", "FLEET_TOKEN_LIMIT": "", "FLEET_DISABLE_ENGINE": ""}
    config = load_config(path, environ, {}, default_path=NO_FILE)
    assert (config.verbosity, config.token_limit, config.disable_engine) == (0, 100, False)
    assert load_config(path, {}, {"verbosity": ""}, default_path=NO_FILE).verbosity == 0


def test_empty_agent_ttl_is_an_error() -> None:
    # agent_ttl was a string flag in fleet, so "" reached time.ParseDuration and failed.
    with pytest.raises(ConfigError, match="environment variable FLEET_AGENT_TTL: agent_ttl"):
        build_config({}, {"FLEET_AGENT_TTL": ""}, {})


def test_every_option_has_an_environment_variable() -> None:
    environ = {
        "FLEET_ETCD_SERVERS": "http://e:2379",
        "FLEET_AGENT_TTL": "5s",
        "FLEET_METADATA": "a=b",
        "FLEET_API_SOCKET": "/tmp/f.sock",
        "FLEET_MACHINE_ID": "abc123",
    }
    config = build_config({}, environ, {})
    assert config.etcd_servers == ("http://e:2379",)
    assert config.agent_ttl == 5.0
    assert config.metadata == {"a": "b"}
    assert config.api_socket == "/tmp/f.sock"
    assert config.machine_id == "abc123"
    assert env_var("etcd_servers") == "FLEET_ETCD_SERVERS"
    assert {env_var(name) for name in OPTIONS} >= {"FLEET_VERBOSITY", "FLEET_API_TCP_INSECURE"}


def test_override_keys_are_normalized() -> None:
    config = build_config({}, {}, {"Etcd-Servers": "http://x:1", " AGENT_TTL ": "1m"})
    assert config.etcd_servers == ("http://x:1",)
    assert config.agent_ttl == 60.0


def test_unknown_override_suggests_the_closest_option() -> None:
    with pytest.raises(ConfigError, match=r'command line -o: unknown option "agent_tl"; did you'):
        build_config({}, {}, {"agent_tl": "5s"})


def test_unrelated_fleet_environment_variables_are_ignored() -> None:
    assert build_config({}, {"FLEET_NOT_AN_OPTION": "x", "FLEETCTL_ENDPOINT": "y"}, {}) == Config()


def test_a_shadowed_bad_file_value_is_not_reported(tmp_path: Path) -> None:
    path = write(tmp_path, "agent_ttl=bogus\n")
    assert load_config(path, {"FLEET_AGENT_TTL": "5s"}, {}, default_path=NO_FILE).agent_ttl == 5


def test_default_file_is_used_when_no_path_is_given(tmp_path: Path) -> None:
    default = write(tmp_path, "verbosity=2\n")
    config = load_config(None, {}, {}, default_path=default)
    assert (config.verbosity, config.config_file) == (2, default)
    assert load_config("", {}, {}, default_path=default).verbosity == 2  # -config "" = not given


def test_explicit_path_wins_over_default_file(tmp_path: Path) -> None:
    default = write(tmp_path, "verbosity=2\n", "default.conf")
    given_path = write(tmp_path, "verbosity=3\n", "given.conf")
    assert load_config(given_path, {}, {}, default_path=default).verbosity == 3


def test_missing_explicit_config_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.conf")
    with pytest.raises(ConfigError, match=f"unable to use config file {missing}: no such file"):
        load_config(missing, {}, {}, default_path=NO_FILE)


def test_config_file_that_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"provided config {tmp_path} is a directory"):
        load_config(str(tmp_path), {}, {}, default_path=NO_FILE)


def test_config_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "fleet.conf"
    path.write_bytes(b"metadata=caf\xe9=1\n")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(str(path), {}, {}, default_path=NO_FILE)


def test_config_file_with_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "fleet.conf"
    path.write_bytes(b"\xef\xbb\xbfverbosity=1\n")
    assert load_config(str(path), {}, {}, default_path=NO_FILE).verbosity == 1


def test_file_errors_name_the_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "# fleet\n\nagent_ttl = 10\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}:3: agent_ttl: missing unit")):
        load_config(path, {}, {}, default_path=NO_FILE)


def test_sample_config_shows_every_option_with_its_default() -> None:
    sample = (REPO / "deploy" / "fleet.conf.sample").read_text()
    uncommented = "\n".join(
        line[2:] if re.match(r"# [a-z_]+ =", line) else line for line in sample.splitlines()
    )
    settings = parse_fleet_conf(uncommented, "fleet.conf.sample")
    assert set(settings) == set(OPTIONS)
    assert build_config(settings, {}, {}) == Config()


# --------------------------------------------------------------------------------------------
# Validation: every error message, each naming the option and where the value came from

VALIDATION_ERRORS = [
    ({"agent_ttl": "0s"}, "command line -o: agent_ttl: must be greater than 0"),
    ({"agent_ttl": "-1s"}, "agent_ttl: must be greater than 0"),
    ({"agent_ttl": "10"}, 'agent_ttl: missing unit in duration "10"'),
    ({"engine_reconcile_interval": "0"}, "engine_reconcile_interval: must be greater than 0"),
    ({"engine_reconcile_interval": "-2"}, "engine_reconcile_interval: must be greater than 0"),
    ({"engine_reconcile_interval": "2s"}, 'engine_reconcile_interval: invalid number "2s"'),
    ({"engine_reconcile_interval": "nan"}, "invalid number"),
    ({"etcd_request_timeout": "1e999"}, 'etcd_request_timeout: number "1e999" out of range'),
    ({"etcd_request_timeout": "0"}, "etcd_request_timeout: must be greater than 0"),
    ({"etcd_servers": "ftp://a:2379"}, 'server "ftp://a:2379" must use http or https'),
    ({"etcd_servers": "a:2379"}, "must use http or https"),
    ({"etcd_servers": "http://a"}, 'server "http://a" needs a host and a port'),
    ({"etcd_servers": "http://:2379"}, "needs a host and a port"),
    ({"etcd_servers": "http://a:0"}, "needs a host and a port"),
    ({"etcd_servers": "http://a:99999"}, 'invalid server URL "http://a:99999"'),
    ({"etcd_servers": "http://a:x"}, "invalid server URL"),
    ({"etcd_servers": "http://[::1:2379"}, "invalid server URL"),
    ({"etcd_servers": "http://u:p@a:2379"}, "set etcd_username and etcd_password instead"),
    ({"etcd_servers": "http://a:2379/v2/keys"}, "must not have a path or query"),
    ({"etcd_servers": "http://a:2379?x=1"}, "must not have a path or query"),
    ({"etcd_servers": "http://a:23\t79"}, "contains whitespace or control characters"),
    ({"etcd_servers": "http://a:2379,https://b:2379"}, "mixes http:// and https:// servers"),
    ({"etcd_servers": "http://a:2379,"}, "etcd_servers: empty server entry (a stray comma?)"),
    ({"etcd_servers": ""}, "etcd_servers: empty server entry"),
    ({"public_ip": "1.2.3"}, 'public_ip: "1.2.3" is not an IP address'),
    ({"public_ip": "eth0"}, "is not an IP address"),
    ({"verbosity": "high"}, 'verbosity: invalid integer "high"'),
    ({"token_limit": "0"}, 'token_limit: must be between 1 and 65535, got "0"'),
    ({"token_limit": "65536"}, "token_limit: must be between 1 and 65535"),
    ({"max_unit_bytes": "0"}, "max_unit_bytes: must be at least 1"),
    ({"disable_engine": "yes"}, 'disable_engine: invalid boolean "yes" (use true or false)'),
    ({"api_tcp_insecure": "on"}, "api_tcp_insecure: invalid boolean"),
    ({"verify_units": "maybe"}, "verify_units: invalid boolean"),
    ({"metadata": "a b=c"}, 'metadata: invalid metadata key "a b"'),
    ({"units_directory": "run/fleet"}, 'units_directory: must be an absolute path, got "run'),
    ({"state_dir": "."}, "state_dir: must be an absolute path"),
    ({"machine_id_file": "machine-id"}, "machine_id_file: must be an absolute path"),
    ({"api_socket": "fleet.sock"}, "api_socket: must be an absolute path"),
    ({"machine_id": "abc-def"}, 'machine_id: invalid machine ID "abc-def"'),
    ({"etcd_key_prefix": "fleet"}, "etcd_key_prefix: etcd key prefix must start with '/'"),
    ({"api_tcp": "49153", "api_tcp_insecure": "true"}, 'api_tcp: "49153" is not host:port'),
    ({"api_tcp": "h:0", "api_tcp_insecure": "1"}, 'port 0 in "h:0" must be between 1 and'),
    ({"api_tcp": "h:http", "api_tcp_insecure": "1"}, "is not host:port"),
    ({"api_tcp": "::1:80", "api_tcp_insecure": "1"}, "bracket IPv6 addresses"),
    ({"api_tcp": "[zz]:80", "api_tcp_insecure": "1"}, "has an invalid IPv6 address"),
    (
        {"api_tcp": "0.0.0.0:49153"},
        "api_tcp=0.0.0.0:49153 would serve the API over TCP without TLS: set api_tls_cert and"
        " api_tls_key, or api_tcp_insecure=true",
    ),
    ({"api_tls_cert": "/c.pem"}, "api_tls_cert is set but api_tls_key is not; set both"),
    ({"api_tls_key": "/k.pem"}, "api_tls_key is set but api_tls_cert is not"),
    ({"api_tls_ca": "/ca.pem"}, "api_tls_ca (to verify API clients) needs api_tls_cert"),
    (
        {"etcd_servers": "https://a:2379", "etcd_certfile": "/c.pem"},
        "etcd_certfile is set but etcd_keyfile is not; set both or neither",
    ),
    (
        {"etcd_servers": "https://a:2379", "etcd_keyfile": "/k.pem"},
        "etcd_keyfile is set but etcd_certfile is not",
    ),
    ({"etcd_username": "root"}, "etcd_username is set but etcd_password is not"),
    ({"etcd_password": "pw"}, "etcd_password is set but etcd_username is not"),
    (
        {"etcd_cafile": "/ca.pem"},
        "etcd_cafile set but etcd_servers use http://; use https:// servers",
    ),
]


@pytest.mark.parametrize(("overrides", "message"), VALIDATION_ERRORS)
def test_validation_errors(overrides: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        build(**overrides)


def test_environment_errors_name_the_variable() -> None:
    with pytest.raises(
        ConfigError, match=re.escape("environment variable FLEET_TOKEN_LIMIT: token_limit:")
    ):
        build_config({}, {"FLEET_TOKEN_LIMIT": "lots"}, {})


@pytest.mark.parametrize(
    "overrides",
    [
        {"api_tcp": "0.0.0.0:49153", "api_tcp_insecure": "true"},
        {"api_tcp": "[::1]:49153", "api_tls_cert": "/c.pem", "api_tls_key": "/k.pem"},
        {"api_tcp": ":49153", "api_tls_cert": "/c", "api_tls_key": "/k", "api_tls_ca": "/ca"},
        {"etcd_servers": "https://a:2379", "etcd_cafile": "/ca.pem"},  # a CA alone is fine
        {"etcd_servers": "https://a:2379,https://[::1]:2379", "etcd_certfile": "/c",
         "etcd_keyfile": "/k"},
        {"etcd_servers": "HTTP://a:2379/"},
        {"etcd_username": "root", "etcd_password": "pw"},
        {"public_ip": "fe80::1"},
        {"api_socket": ""},
        {"machine_id": "0123456789abcdef0123456789abcdef"},
        {"etcd_key_prefix": "/other"},
    ],
)  # fmt: skip
def test_valid_combinations(overrides: dict[str, str]) -> None:
    build(**overrides)


def test_api_tcp_address() -> None:
    assert build(api_tcp="[::1]:49153", api_tcp_insecure="t").api_tcp_address == ("::1", 49153)
    assert build(api_tcp=":49153", api_tcp_insecure="t").api_tcp_address == ("", 49153)
    assert Config().api_tcp_address is None


def test_key_prefix_gets_a_trailing_slash() -> None:
    assert build(etcd_key_prefix="/other").etcd_key_prefix == "/other/"


@pytest.mark.parametrize(
    ("overrides", "warning"),
    [
        ({"verify_units": "true"}, "Config option verify_units is no longer supported - ignoring"),
        (
            {"authorized_keys_file": "/root/.ssh/authorized_keys"},
            "Config option authorized_keys_file is no longer supported - ignoring",
        ),
        ({"enable_grpc": "1"}, "Config option enable_grpc (fleet's experimental gRPC engine)"),
        ({"metadata": "a=1,ssd"}, 'metadata entry "ssd" has no "=" - ignoring'),
    ],
)
def test_warnings(overrides: dict[str, str], warning: str) -> None:
    (got,) = build(**overrides).warnings
    assert got.startswith(warning)


@pytest.mark.parametrize(
    "overrides", [{"verify_units": "false"}, {"authorized_keys_file": ""}, {"enable_grpc": "0"}]
)
def test_deprecated_options_off_do_not_warn(overrides: dict[str, str]) -> None:
    assert build(**overrides) == Config()


def test_deprecated_options_are_not_stored() -> None:
    names = {f.name for f in dataclasses.fields(Config)}
    assert not names & {"verify_units", "authorized_keys_file", "enable_grpc"}


def test_config_is_frozen_and_hashable() -> None:
    config = build(metadata="a=b")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.verbosity = 3  # type: ignore[misc]
    assert hash(config) == hash(build(metadata="c=d"))  # metadata is left out of the hash
    assert config != build(metadata="c=d")


def test_password_is_not_in_repr() -> None:
    assert "s3cret" not in repr(build(etcd_username="u", etcd_password="s3cret"))


# --------------------------------------------------------------------------------------------
# Hypothesis: arbitrary input yields a Config or a ConfigError, never another exception

_CONF_ALPHABET = st.sampled_from(
    [*"abcdefghijklmnopqrstuvwxyz_=\"';#[]\\ \t\n\r,.:/0123456789-+", "\u00a0", "é", "\x00"]
)
_option_lines = st.builds(
    lambda key, sep, value: f"{key}{sep}{value}",
    st.sampled_from(sorted(OPTIONS)),
    st.sampled_from(["=", " = ", "\t=", "="]),
    st.text(_CONF_ALPHABET, max_size=25),
)


@given(st.lists(st.one_of(_option_lines, st.text(_CONF_ALPHABET, max_size=30)), max_size=8))
def test_fleet_conf_raises_only_config_error(lines: list[str]) -> None:
    with contextlib.suppress(ConfigError):
        build_config(parse_fleet_conf("\n".join(lines), "h.conf"), {}, {})


@given(st.text(max_size=200))
def test_arbitrary_text_raises_only_config_error(text: str) -> None:
    with contextlib.suppress(ConfigError):
        build_config(parse_fleet_conf(text, "h.conf"), {}, {})


@given(st.sampled_from(sorted(OPTIONS)), st.text(max_size=40))
def test_any_option_value_raises_only_config_error(option: str, value: str) -> None:
    for environ, overrides in (({env_var(option): value}, {}), ({}, {option: value})):
        with contextlib.suppress(ConfigError):
            build_config({}, environ, overrides)
