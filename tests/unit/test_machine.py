"""fleetd.machine: the machine ID (option or file) and the public IP (default route's address)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fleetd import machine
from fleetd.config import Config
from fleetd.errors import ConfigError
from fleetd.machine import (
    default_route_interfaces,
    detect_public_ip,
    first_global_ipv4_from_ip_json,
    is_global_unicast,
    read_machine_id,
)


def write(tmp_path: Path, text: str, name: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_machine_id_from_file(tmp_path: Path) -> None:
    path = write(tmp_path, "0123456789abcdef0123456789abcdef\n", "machine-id")
    assert read_machine_id(Config(machine_id_file=path)) == "0123456789abcdef0123456789abcdef"


def test_explicit_machine_id_wins(tmp_path: Path) -> None:
    path = write(tmp_path, "fromfile\n", "machine-id")
    assert read_machine_id(Config(machine_id_file=path, machine_id="sim42")) == "sim42"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "unable to determine local machine ID: {path}: No such file or directory"),
        ("", "unable to determine local machine ID: {path} is empty"),
        (" \n", "unable to determine local machine ID: {path} is empty"),
        ("abc def\n", 'unable to determine local machine ID: {path}: invalid machine ID "abc d'),
        ("../etc\n", "unable to determine local machine ID: {path}: invalid machine ID"),
    ],
)
def test_machine_id_errors(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "machine-id"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=re.escape(message.format(path=path))):
        read_machine_id(Config(machine_id_file=str(path)))


ROUTE_HEADER = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT"


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        (["eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0"], ["eth0"]),
        (["eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0"], []),  # not default
        (["eth0\t00000000\t010200C0\t0002\t0\t0\t0\t00000000\t0\t0\t0"], []),  # not up
        (
            [
                "wlan0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0",
                "eth0\t00000000\t010200C0\t0003\t0\t0\t100\t00000000\t0\t0\t0",
            ],
            ["eth0", "wlan0"],  # lowest metric first
        ),
        (["garbage", "eth0\tzz\t0\t0003\t0\t0\t0\t00000000"], []),
    ],
)
def test_default_route_interfaces(rows: list[str], expected: list[str]) -> None:
    assert default_route_interfaces("\n".join([ROUTE_HEADER, *rows])) == expected


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("192.0.2.2", True),
        ("10.1.2.3", True),  # Go counts private ranges as global unicast
        ("172.16.0.1", True),
        ("8.8.8.8", True),
        ("127.0.0.1", False),
        ("169.254.1.1", False),
        ("224.0.0.1", False),
        ("0.0.0.0", False),
        ("255.255.255.255", False),
        ("::1", False),
        ("", False),
    ],
)
def test_is_global_unicast(address: str, expected: bool) -> None:
    assert is_global_unicast(address) is expected


def test_first_global_ipv4_from_ip_json() -> None:
    text = (
        '[{"ifname":"eth0","addr_info":[{"family":"inet6","local":"fe80::1"},'
        '{"family":"inet","local":"169.254.3.3"},{"family":"inet","local":"10.0.0.5"},'
        '{"family":"inet","local":"10.0.0.6"}]}]'
    )
    assert first_global_ipv4_from_ip_json(text) == "10.0.0.5"
    for bad in ["", "not json", "{}", "[1]", '[{"addr_info": [1]}]']:
        assert first_global_ipv4_from_ip_json(bad) == ""


def test_detect_public_ip_without_route_table(tmp_path: Path) -> None:
    assert detect_public_ip(str(tmp_path / "missing")) == ""
    assert detect_public_ip(write(tmp_path, ROUTE_HEADER + "\n", "route")) == ""


def test_detect_public_ip_uses_the_default_route_interface(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    route = write(
        tmp_path,
        f"{ROUTE_HEADER}\neth9\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n",
        "route",
    )
    monkeypatch.setattr(
        machine, "_ioctl_ipv4", lambda iface: "127.0.0.1" if iface == "eth9" else ""
    )
    monkeypatch.setattr(
        machine,
        "_ip_addr_json",
        lambda iface: '[{"addr_info":[{"family":"inet","local":"10.9.9.9"}]}]',
    )
    assert detect_public_ip(route) == "10.9.9.9"  # the ioctl's address was not global
    monkeypatch.setattr(machine, "_ioctl_ipv4", lambda iface: "192.0.2.7")
    assert detect_public_ip(route) == "192.0.2.7"


def test_detect_public_ip_on_this_host_returns_an_address_or_nothing() -> None:
    address = detect_public_ip()
    assert address == "" or is_global_unicast(address)
