"""The local cluster tool's pure parts: naming, addressing, config, state, prerequisites.

Booting real clusters is tested in tests/functional/test_cluster_tool.py (root only).
"""

from __future__ import annotations

import ipaddress
import json
import os
import zipfile
from pathlib import Path

import pytest
from fleet_cluster import (
    Cluster,
    ClusterError,
    NoSuchMachine,
    PrerequisiteError,
    cloud,
    install,
    prereqs,
)
from fleet_cluster.fleet_service import fleet_conf, parse_metadata
from fleet_cluster.network import bridge_address, bridge_mac, machine_address, parse_subnet
from fleet_cluster.options import parse_machine_metadata
from fleet_cluster.ssh import known_hosts_line
from fleet_cluster.state import ClusterState, EtcdState, MachineState

from fleetd import deploy


def test_metadata_for_one_machine_or_all() -> None:
    parsed = parse_machine_metadata(["m1:region=east,disk=ssd", "role=worker", "2:region=west"])
    assert parsed == {
        "m1": {"region": "east", "disk": "ssd"},
        "*": {"role": "worker"},
        "2": {"region": "west"},
    }


def test_metadata_value_may_contain_a_colon() -> None:
    assert parse_machine_metadata(["url=http://x:1"]) == {"*": {"url": "http://x:1"}}


@pytest.mark.parametrize("bad", ["novalue", "=v", "a=b,,=c"])
def test_bad_metadata_is_refused(bad: str) -> None:
    with pytest.raises(ClusterError):
        parse_metadata(bad)


def test_fleet_conf_quotes_values() -> None:
    text = fleet_conf(
        machine="fleet1",
        etcd_servers=["http://10.77.0.1:2379"],
        public_ip="10.77.0.11",
        metadata={"region": "east", "disk": "ssd"},
        agent_ttl="3s",
        etcd_key_prefix="/fleet/",
    )
    assert 'etcd_servers="http://10.77.0.1:2379"' in text
    assert 'public_ip="10.77.0.11"' in text
    assert 'metadata="region=east,disk=ssd"' in text
    assert 'agent_ttl="3s"' in text
    assert 'etcd_key_prefix="/fleet/"' in text


def test_fleet_conf_leaves_out_unset_options() -> None:
    text = fleet_conf(
        machine="m",
        etcd_servers=["http://a:1"],
        public_ip="10.0.0.2",
        metadata={},
        agent_ttl=None,
        etcd_key_prefix=None,
    )
    assert "metadata" not in text
    assert "agent_ttl" not in text
    assert "etcd_key_prefix" not in text


def _wheel(path: Path, metadata: str) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("fleet_py-9.1.0.dist-info/METADATA", metadata)
        archive.writestr("fleetd/__init__.py", "")
    return path


def test_wheel_info_reads_name_version_and_runtime_requirements(tmp_path: Path) -> None:
    metadata = (
        "Metadata-Version: 2.1\nName: fleet-py\nVersion: 9.1.0\n"
        "Requires-Dist: click>=8.1\nRequires-Dist: aiohttp>=3.9\n"
        'Requires-Dist: pytest>=8; extra == "dev"\n'
    )
    info = install.wheel_info(_wheel(tmp_path / "fleet_py-9.1.0-py3-none-any.whl", metadata))
    assert (info.name, info.version) == ("fleet-py", "9.1.0")
    assert info.requires == ("aiohttp>=3.9", "click>=8.1")  # the dev extra left out


def test_wheel_info_refuses_what_is_not_a_wheel(tmp_path: Path) -> None:
    (tmp_path / "x.whl").write_text("not a zip")
    with pytest.raises(ClusterError, match="not a readable wheel"):
        install.wheel_info(tmp_path / "x.whl")
    with pytest.raises(ClusterError, match="is not a wheel file"):
        install.wheel_info(tmp_path / "missing.whl")
    other = _wheel(tmp_path / "other-1.0-py3-none-any.whl", "Name: other\nVersion: 1.0\n")
    with pytest.raises(ClusterError, match="not of fleet-py"):
        install.resolve_wheel(other, tmp_path)


def test_staging_a_wheel_twice_or_rebuilt_replaces_it(tmp_path: Path) -> None:
    if not Path(install.MACHINE_PYTHON).exists():
        pytest.skip(f"{install.MACHINE_PYTHON} is missing")
    built = tmp_path / "dist" / "fleet_py-9.1.0-py3-none-any.whl"
    built.parent.mkdir()
    _wheel(built, "Name: fleet-py\nVersion: 9.1.0\n")
    info = install.wheel_info(built)
    staged = tmp_path / "cluster" / "wheels"
    for _ in range(2):  # the same file again (an upgrade to what is installed) is no error
        assert install.stage(info, staged, tmp_path / "cache") == built.name
    built.unlink()
    _wheel(built, "Name: fleet-py\nVersion: 9.1.0\nSummary: rebuilt\n")
    install.stage(info, staged, tmp_path / "cache")
    assert (staged / built.name).read_bytes() == built.read_bytes()
    assert sorted(p.name for p in staged.iterdir()) == [built.name]  # no temporary left


def test_install_script_installs_offline_into_the_machines_venv() -> None:
    script = install.install_script("fleet_py-9.1.0-py3-none-any.whl")
    assert "/usr/bin/python3 -m venv /opt/fleet/venv" in script
    # Only the bound folder: machines have no index to reach.
    assert script.count("--no-index --find-links /opt/fleet/wheels") == 2
    assert "ln -sf /opt/fleet/venv/bin/fleetd /opt/fleet/venv/bin/fleetctl /usr/local/bin/" in (
        script
    )
    # The units come from the installed package, not from this checkout.
    assert "import fleetd.deploy" in script
    assert set(deploy.UNIT_FILES) <= set(script.replace('"', " ").replace("/", " ").split())


def test_user_data_gets_the_local_discovery_url_and_nothing_else() -> None:
    original = (Path(install.CHECKOUT) / "deploy/cloud-config.yaml").read_text()
    url = "http://10.77.0.1:2379/v2/keys/_etcd/registry/abc"
    replaced = cloud.user_data(original, url)
    changed = [
        (a, b) for a, b in zip(original.splitlines(), replaced.splitlines(), strict=True) if a != b
    ]
    assert changed == [(changed[0][0], f'      ETCD_DISCOVERY="{url}"')]
    assert "discovery.etcd.io" in changed[0][0]


def test_user_data_without_cloud_config_marker_or_discovery_is_refused() -> None:
    with pytest.raises(ClusterError, match="#cloud-config"):
        cloud.user_data("write_files: []\n", "http://x")
    with pytest.raises(ClusterError, match="ETCD_DISCOVERY"):
        cloud.user_data("#cloud-config\nruncmd: [true]\n", "http://x")


def test_options_the_user_data_decides_are_refused_with_cloud_config() -> None:
    user_data = Path(install.CHECKOUT) / "deploy/cloud-config.yaml"
    with pytest.raises(ClusterError, match="--agent-ttl, --metadata cannot be combined"):
        Cluster("c", cloud_config=user_data, agent_ttl="3s", metadata={"*": {"a": "b"}})
    with pytest.raises(ClusterError, match="no cloud-config file"):
        Cluster("c", cloud_config=user_data.with_name("missing.yaml"))


def test_the_deployed_cloud_config_never_listens_on_all_addresses() -> None:
    text = (Path(install.CHECKOUT) / "deploy/cloud-config.yaml").read_text()
    listens = [line for line in text.splitlines() if "ETCD_LISTEN_" in line]
    assert len(listens) == 2
    assert not [line for line in listens if "0.0.0.0" in line]
    assert "SECURITY" in text  # and says why it is plaintext


def test_state_of_format_1_loads(tmp_path: Path) -> None:
    raw = {
        "name": "old",
        "state_dir": str(tmp_path),
        "subnet": "10.77.0.0/24",
        "bridge": "oldbr0",
        "bridge_ip": "10.77.0.1",
        "prefixlen": 24,
        "agent_ttl": None,
        "etcd_key_prefix": "/fleet/",
        "fleetd": True,
        "venv": "/opt/fleet/venv",
        "binds": [],
        "version": 1,
    }
    state = ClusterState.from_json(json.dumps(raw))
    assert (state.wheel, state.wheels_dir) == (None, None)


def test_addresses() -> None:
    subnet = parse_subnet("10.77.5.0/24")
    assert str(bridge_address(subnet)) == "10.77.5.1"
    assert str(machine_address(subnet, 1)) == "10.77.5.11"
    with pytest.raises(ClusterError):
        machine_address(subnet, 245)


def test_bridge_mac_is_fixed_local_unicast_and_names_the_bridge_address() -> None:
    mac = bridge_mac(ipaddress.IPv4Address("10.77.5.1"))
    assert mac == "02:00:0a:4d:05:01"
    first = int(mac.split(":")[0], 16)
    assert first & 0b10  # locally administered
    assert not first & 0b01  # unicast


@pytest.mark.parametrize("bad", ["10.77.0.0/28", "8.8.8.0/24", "nonsense"])
def test_bad_subnets_are_refused(bad: str) -> None:
    with pytest.raises(ClusterError):
        parse_subnet(bad)


@pytest.mark.parametrize("bad", ["", "Fleet", "1abc", "a" * 11, "a_b"])
def test_bad_cluster_names_are_refused(bad: str) -> None:
    with pytest.raises(ClusterError, match="bad cluster name"):
        Cluster(bad)


def test_state_round_trips_and_resolves_machine_references() -> None:
    state = ClusterState(
        name="fleet",
        state_dir="/run/fleet-cluster/fleet",
        subnet="10.77.0.0/24",
        bridge="fleetbr0",
        bridge_ip="10.77.0.1",
        prefixlen=24,
        agent_ttl="3s",
        etcd_key_prefix="/fleet/",
        fleetd=True,
        binds=["/work/main"],
        wheel="fleet_py-0.2.0-py3-none-any.whl",
        wheels_dir="/run/fleet-cluster/fleet/wheels",
        etcd_members=[EtcdState(pid=10, client_port=2379, peer_port=2380)],
        machines=[
            MachineState("fleet1", 1, "10.77.0.11", "a" * 32, {"region": "east"}),
            MachineState("fleet2", 2, "10.77.0.12", "b" * 32),
        ],
    )
    again = ClusterState.from_json(state.to_json())
    assert again == state
    for ref in ("fleet2", "m2", "2", 2, "10.77.0.12"):
        assert again.machine(ref).name == "fleet2"
    with pytest.raises(NoSuchMachine, match="fleet1, fleet2"):
        again.machine("m3")


def test_known_hosts_line() -> None:
    line = known_hosts_line(["10.77.0.11", "fleet1"], "ssh-ed25519 AAAAC3Nz root@fleet1")
    assert line == "10.77.0.11,fleet1 ssh-ed25519 AAAAC3Nz"


def test_subnet_type() -> None:
    assert isinstance(parse_subnet("10.77.0.0/16"), ipaddress.IPv4Network)


def test_refuses_without_root_or_binaries_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(PrerequisiteError, match="must run as root"):
        prereqs.check_host()
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setitem(prereqs.BINARIES, "definitely-not-a-binary", "some-package")
    with pytest.raises(PrerequisiteError, match="apt-get install -y some-package"):
        prereqs.check_host()


def test_metadata_for_a_machine_the_cluster_will_not_have_is_refused() -> None:
    with pytest.raises(ClusterError, match="unknown machines: m4"):
        Cluster("fleet", 3, metadata={"m4": {"a": "b"}})
    Cluster("fleet", 3, metadata={"m3": {"a": "b"}, "fleet1": {"c": "d"}, "*": {"e": "f"}})
