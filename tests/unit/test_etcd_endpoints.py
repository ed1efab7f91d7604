"""The etcd endpoint rule (fleetd/etcd/endpoints.py) and how its two callers word it.

fleet.conf's etcd_servers (fleetd/config_values.py, every message in test_config.py) needs a port;
the etcd client (`EtcdConfig`; its long-standing messages in tests/integration/
test_kv_contract.py) gives a URL without one etcd's 2379.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from fleetd.errors import ConfigError
from fleetd.etcd.client import EtcdConfig, _members
from fleetd.etcd.endpoints import (
    Endpoint,
    EndpointError,
    Endpoints,
    Problem,
    parse_endpoints,
)

BROKEN = [
    ([], Problem.NONE),
    ([""], Problem.EMPTY),
    (["http://a:2379", ""], Problem.EMPTY),
    (["http://a:23\t79"], Problem.WHITESPACE),
    (["http://a :2379"], Problem.WHITESPACE),
    (["http://a:2379\x00"], Problem.WHITESPACE),
    (["http://a:99999"], Problem.UNPARSABLE),
    (["http://a:x"], Problem.UNPARSABLE),
    (["http://[::1:2379"], Problem.UNPARSABLE),
    (["ftp://a:2379"], Problem.SCHEME),
    (["a:2379"], Problem.SCHEME),
    (["127.0.0.1:2379"], Problem.SCHEME),
    (["http://:2379"], Problem.HOST_PORT),
    (["http://"], Problem.HOST_PORT),
    (["http://u:p@a:2379"], Problem.CREDENTIALS),
    (["http://u@a:2379"], Problem.CREDENTIALS),
    (["http://a:2379/v2/keys"], Problem.PATH),
    (["http://a:2379?x=1"], Problem.PATH),
    (["http://a:2379#f"], Problem.PATH),
    (["http://a:2379", "https://b:2379"], Problem.MIXED),
]


@pytest.mark.parametrize(("urls", "problem"), BROKEN)
def test_broken_endpoints_name_their_problem(urls: list[str], problem: Problem) -> None:
    for default_port in (None, 2379):
        with pytest.raises(EndpointError) as caught:
            parse_endpoints(urls, default_port=default_port)
        assert caught.value.problem is problem
        assert isinstance(caught.value, ConfigError)


def test_a_missing_or_zero_port_is_the_default_or_a_problem() -> None:
    for url in ("http://a", "http://a:0", "http://a/"):
        assert parse_endpoints([url], default_port=2379).members == (Endpoint("a", 2379),)
        with pytest.raises(EndpointError) as caught:
            parse_endpoints([url], default_port=None)
        assert caught.value.problem is Problem.HOST_PORT


def test_good_endpoints() -> None:
    got = parse_endpoints(["https://A.example:2379", "https://[::1]:4001/"], default_port=None)
    assert got == Endpoints("https", (Endpoint("a.example", 2379), Endpoint("::1", 4001)))
    assert got.tls
    assert not parse_endpoints(["http://10.0.0.1:2379"], default_port=None).tls


def test_the_error_says_what_and_where_without_a_caller_to_word_it() -> None:
    with pytest.raises(EndpointError, match=re.escape("'ftp://a:1' must use http or https")):
        parse_endpoints(["ftp://a:1"], default_port=None)
    with pytest.raises(EndpointError, match="Port out of range"):
        parse_endpoints(["http://a:99999"], default_port=None)


# -- the client's words and defaults (EtcdConfig) -------------------------------------------


@pytest.mark.parametrize(
    ("endpoints", "message"),
    [
        ([], "no etcd endpoints given"),
        ([""], "bad etcd endpoint '': expected http://host:port or https://host:port"),
        (["ftp://h:1"], "bad etcd endpoint 'ftp://h:1': expected http://host:port or https://"),
        (["http://h:99999"], "bad etcd endpoint 'http://h:99999': Port out of range"),
        (["http://:1"], "bad etcd endpoint 'http://:1': expected scheme://host:port only"),
        (["http://h:1/v3"], "expected scheme://host:port only"),
        (["http://h:2\t1"], "bad etcd endpoint 'http://h:2\\t1': contains whitespace"),
        (["http://u:p@h:1"], "credentials do not go in the URL; give the etcd username and"),
        (["http://a:1", "https://b:1"], "etcd endpoints mix http:// and https://; one channel"),
    ],
)
def test_client_words(endpoints: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        EtcdConfig(endpoints=endpoints)


def test_client_defaults_the_port_and_trims_around_urls() -> None:
    config = EtcdConfig(endpoints=[" http://a ", "http://b:0", "http://[::1]:4001"])
    assert not config.tls
    members = _members(config)
    assert [(m.host, m.port, m.authority) for m in members] == [
        ("a", 2379, "a:2379"),
        ("b", 2379, "b:2379"),
        ("::1", 4001, "[::1]:4001"),
    ]
    assert EtcdConfig(endpoints=["https://a:1"]).tls


def test_the_rule_is_pure() -> None:
    # fleet.conf's parser imports it: no I/O, and nothing of the client's weight.
    import fleetd.etcd.endpoints as module

    tree = ast.parse(Path(module.__file__ or "").read_text())
    imported = {
        node.module if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert imported == {
        "__future__",
        "collections.abc",
        "dataclasses",
        "enum",
        "urllib.parse",
        "fleetd.errors",
    }


def test_each_members_certificate_is_checked_against_its_own_host() -> None:
    # Not the first endpoint's host for all: each member's certificate names its own machine.
    config = EtcdConfig(endpoints=["https://etcd-a:2379", "https://10.0.0.2", "https://[::1]:1"])
    members = _members(config)
    assert [(m.host, m.server_hostname) for m in members] == [
        ("etcd-a", "etcd-a"),
        ("10.0.0.2", "10.0.0.2"),
        ("::1", "::1"),
    ]
    assert all(m.tls is members[0].tls is not None for m in members)  # one context, shared
    assert _members(EtcdConfig(endpoints=["https://etcd-b"]))[0].server_hostname == "etcd-b"
