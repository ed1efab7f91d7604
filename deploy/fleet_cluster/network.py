"""The cluster's network: a host bridge, one veth per machine on it, partitions by link state.

Every machine has its own network namespace; systemd-nspawn puts one end of a veth pair in it
(`host0`) and enslaves the other (`vb-<machine>`, shortened by nspawn when too long) to the
bridge. Taking that host-side end down cuts the machine off from etcd and every other machine,
which is exactly a network partition, with no firewall rules to clean up.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import socket
from typing import Any

from . import procs
from .errors import ClusterError

MACHINE_HOST_OFFSET = 10  # machine N is .(10+N): .1 is the bridge, low numbers look like gateways


def bridge_address(subnet: ipaddress.IPv4Network) -> ipaddress.IPv4Address:
    return subnet.network_address + 1


def machine_address(subnet: ipaddress.IPv4Network, index: int) -> ipaddress.IPv4Address:
    address = subnet.network_address + MACHINE_HOST_OFFSET + index
    if address not in subnet or address == subnet.broadcast_address:
        raise ClusterError(f"subnet {subnet} has no room for machine {index}")
    return address


def parse_subnet(text: str) -> ipaddress.IPv4Network:
    try:
        subnet = ipaddress.IPv4Network(text, strict=False)
    except ValueError as exc:
        raise ClusterError(f"bad subnet {text!r}: {exc}") from exc
    if subnet.prefixlen > 24:
        raise ClusterError(f"subnet {subnet} is too small; use a /24 or larger")
    if not subnet.is_private:
        raise ClusterError(f"subnet {subnet} is not a private range; pick one in 10.0.0.0/8")
    return subnet


def _ip_json(*args: str) -> list[dict[str, Any]]:
    done = procs.run(["ip", "-j", *args])
    out = done.stdout.strip()
    parsed: list[dict[str, Any]] = json.loads(out) if out else []
    return parsed


def links() -> list[dict[str, Any]]:
    return _ip_json("link", "show")


def link_exists(name: str) -> bool:
    return any(link.get("ifname") == name for link in links())


def overlap(subnet: ipaddress.IPv4Network) -> str | None:
    """What on the host overlaps `subnet` (an address or a route), or None."""
    for entry in _ip_json("-4", "addr", "show"):
        for info in entry.get("addr_info", []):
            network = ipaddress.IPv4Network(f"{info['local']}/{info['prefixlen']}", strict=False)
            if network.overlaps(subnet):
                return f"{network} on {entry.get('ifname')}"
    for route in _ip_json("-4", "route", "show", "table", "all"):
        destination = route.get("dst", "")
        if destination in ("", "default") or route.get("type") in ("local", "broadcast"):
            continue
        with contextlib.suppress(ValueError):
            if ipaddress.IPv4Network(destination, strict=False).overlaps(subnet):
                return f"the route to {destination}"
    return None


def check_free(subnet: ipaddress.IPv4Network, bridge: str) -> None:
    """Refuse a subnet something on the host overlaps, or a bridge name in use."""
    if link_exists(bridge):
        raise ClusterError(
            f"network link {bridge} already exists (another cluster, or left behind?); "
            "pick another --name or remove it with: ip link del " + bridge
        )
    clash = overlap(subnet)
    if clash:
        raise ClusterError(f"subnet {subnet} overlaps {clash}; pick another with --subnet")


def bridge_mac(address: ipaddress.IPv4Address) -> str:
    """A fixed, locally administered MAC for the bridge: 02:00 and its IPv4 address."""
    return ":".join(f"{octet:02x}" for octet in (2, 0, *address.packed))


def create_bridge(name: str, address: ipaddress.IPv4Address, prefixlen: int) -> None:
    # The MAC is given, not left to the kernel: a bridge without one set takes the lowest MAC
    # of its ports, so killing (or adding) a machine could change it, and every other machine
    # would keep sending to the old one (its ARP entry stays valid) and lose etcd for seconds.
    procs.run(["ip", "link", "add", name, "address", bridge_mac(address), "type", "bridge"])
    procs.run(["ip", "addr", "add", f"{address}/{prefixlen}", "dev", name])
    procs.run(["ip", "link", "set", name, "up"])


def delete_bridge(name: str) -> bool:
    """Delete the bridge if it exists; True if there was one."""
    for link in links():
        if link.get("ifname") == name:
            kind = link.get("linkinfo", {}).get("info_kind")
            if kind not in (None, "bridge"):
                raise ClusterError(f"{name} is a {kind}, not our bridge; leaving it alone")
            procs.run(["ip", "link", "del", name])
            return True
    return False


def _host0(init_pid: int) -> dict[str, Any]:
    done = procs.run(["nsenter", "-t", str(init_pid), "-n", "ip", "-j", "link", "show", "host0"])
    parsed: list[dict[str, Any]] = json.loads(done.stdout)
    if not parsed:
        raise ClusterError(f"the machine with init pid {init_pid} has no host0")
    return parsed[0]


def host0_has_carrier(init_pid: int) -> bool:
    """Whether the machine's end of its veth sees the link up (it lags the host's end)."""
    return "LOWER_UP" in _host0(init_pid).get("flags", [])


def host_veth(init_pid: int) -> str:
    """The host-side veth of a machine, found from inside: host0's peer ifindex.

    nspawn names it `vb-<machine>` but shortens long names (with a hash in newer systemd), so
    guessing the name is fragile; the peer index of host0 is exact.
    """
    peer_index = _host0(init_pid).get("link_index")
    if peer_index is None:
        raise ClusterError(f"host0 of the machine with init pid {init_pid} has no peer")
    for link in links():
        if link.get("ifindex") == peer_index:
            return str(link["ifname"])
    raise ClusterError(f"no host link with ifindex {peer_index} (the peer of host0)")


def set_link(name: str, up: bool) -> None:
    procs.run(["ip", "link", "set", "dev", name, "up" if up else "down"])


def link_is_up(name: str) -> bool:
    for link in links():
        if link.get("ifname") == name:
            return "UP" in link.get("flags", [])
    return False


def configure_machine(init_pid: int, address: str, prefixlen: int, gateway: str) -> None:
    """Address host0 inside the machine and route everything through the bridge."""
    ns = ["nsenter", "-t", str(init_pid), "-n"]
    procs.run([*ns, "ip", "link", "set", "host0", "up"])
    procs.run([*ns, "ip", "addr", "replace", f"{address}/{prefixlen}", "dev", "host0"])
    procs.run([*ns, "ip", "route", "replace", "default", "via", gateway, "dev", "host0"])


def tcp_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def ssh_banner(host: str, port: int = 22, timeout: float = 1.0) -> bool:
    """True once sshd answers with its banner (an open port alone may be a half-started sshd)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            conn.settimeout(timeout)
            return conn.recv(8).startswith(b"SSH-")
    except OSError:
        return False


def free_port() -> int:
    """A TCP port nothing listens on now (the kernel picks; a race is possible but unlikely)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port
