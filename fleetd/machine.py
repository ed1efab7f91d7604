"""This machine as fleetd finds it: its machine ID and its public IP address.

The only host discovery fleetd does, and the only I/O of configuration besides reading
fleet.conf (fleetd/config.py): the machine ID comes from the `machine_id` option or the
`machine_id_file` (/etc/machine-id), the public IP, when `public_ip` is not set, from the
interface of the default IPv4 route as fleet found it (/proc/net/route, then the interface's
address by ioctl, else `ip -j addr`).
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import socket
import struct
import subprocess

from fleetd.config import Config
from fleetd.config_values import check_machine_id
from fleetd.errors import ConfigError

MACHINE_ID_ERROR = "unable to determine local machine ID"


def read_machine_id(config: Config) -> str:
    """config.machine_id if set, else the trimmed contents of config.machine_id_file.

    fleet re-read /etc/machine-id on every state refresh; callers may call this as often.
    """
    if config.machine_id:
        return check_machine_id(config.machine_id)
    try:
        with open(config.machine_id_file, encoding="utf-8") as handle:
            machine_id = handle.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"{MACHINE_ID_ERROR}: {config.machine_id_file}: {detail}") from None
    if not machine_id:
        raise ConfigError(f"{MACHINE_ID_ERROR}: {config.machine_id_file} is empty")
    try:
        return check_machine_id(machine_id)
    except ConfigError as exc:
        raise ConfigError(f"{MACHINE_ID_ERROR}: {config.machine_id_file}: {exc}") from None


_SIOCGIFADDR = 0x8915
_RTF_UP = 0x1


def detect_public_ip(route_file: str = "/proc/net/route") -> str:
    """First global-unicast IPv4 address of the default route's interface, or "" (fleet)."""
    try:
        with open(route_file, encoding="ascii") as handle:
            interfaces = default_route_interfaces(handle.read())
    except (OSError, UnicodeDecodeError):
        return ""
    for interface in interfaces:
        address = _interface_ipv4(interface)
        if address:
            return address
    return ""


def default_route_interfaces(route_text: str) -> list[str]:
    """Interfaces of the up IPv4 default routes in /proc/net/route text, lowest metric first."""
    routes: list[tuple[int, int, str]] = []
    for position, line in enumerate(route_text.splitlines()[1:]):
        fields = line.split()
        if len(fields) < 8:
            continue
        interface, destination, flags, metric, mask = (
            fields[0],
            fields[1],
            fields[3],
            fields[6],
            fields[7],
        )
        try:
            is_default = int(destination, 16) == 0 and int(mask, 16) == 0
            is_up = bool(int(flags, 16) & _RTF_UP)
            order = (int(metric), position)
        except ValueError:
            continue
        if is_default and is_up:
            routes.append((*order, interface))
    # The kernel uses the lowest-metric default route; file order breaks ties.
    return [interface for _metric, _position, interface in sorted(routes)]


def is_global_unicast(address: str) -> bool:
    """Go's net.IP.IsGlobalUnicast for IPv4: unlike Python's is_global, private ranges count."""
    try:
        ip = ipaddress.IPv4Address(address)
    except ValueError:
        return False
    return not (
        ip.is_unspecified
        or ip.is_loopback
        or ip.is_multicast
        or ip.is_link_local
        or ip == ipaddress.IPv4Address("255.255.255.255")
    )


def _interface_ipv4(interface: str) -> str:
    primary = _ioctl_ipv4(interface)
    if is_global_unicast(primary):
        return primary
    # The ioctl sees only the primary address; `ip` lists them all, in order.
    return first_global_ipv4_from_ip_json(_ip_addr_json(interface))


def _ioctl_ipv4(interface: str) -> str:
    request = struct.pack("256s", interface.encode()[:15])
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            reply = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, request)
    except OSError:
        return ""
    # struct ifreq: 16-byte name, then sockaddr_in (family, port, 4-byte address).
    return socket.inet_ntoa(reply[20:24])


def _ip_addr_json(interface: str) -> str:
    try:
        result = subprocess.run(
            ["ip", "-j", "-4", "addr", "show", "dev", interface],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return result.stdout if result.returncode == 0 else ""


def first_global_ipv4_from_ip_json(text: str) -> str:
    """The first global-unicast IPv4 address in `ip -j addr` output, or ""."""
    try:
        links = json.loads(text) if text else []
    except ValueError:
        return ""
    for link in links if isinstance(links, list) else []:
        for info in link.get("addr_info", []) if isinstance(link, dict) else []:
            if not isinstance(info, dict) or info.get("family") != "inet":
                continue
            local = info.get("local")
            if isinstance(local, str) and is_global_unicast(local):
                return local
    return ""
