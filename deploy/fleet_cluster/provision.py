"""A machine before it boots: its record in the state, and its root file system made its own.

rootfs.py mounts an overlay root; this gives the machine in it an identity (machine-id,
hostname, /etc/hosts naming every machine), its configuration (fleet.conf, or cloud-init's
seed in a cloud-config cluster) and its SSH keys (a host key of its own, the cluster's user
key, known_hosts for every machine). A cloud-config cluster's discovery token on the host's
etcd, which every seed names, is made here too.
"""

from __future__ import annotations

import ipaddress
import os
import uuid
from collections.abc import Mapping
from pathlib import Path

from . import cloud, etcd, network, rootfs, ssh
from .context import ClusterContext
from .etcd_members import EtcdMembers
from .fleet_service import FLEET_CONF, fleet_conf
from .state import MachineState


def new_machine(
    cluster: str,
    index: int,
    subnet: ipaddress.IPv4Network,
    metadata: Mapping[str, Mapping[str, str]],
) -> MachineState:
    """Machine `index`: its name and address, a new machine-id, and its metadata: the
    cluster's default (`*`) updated with what names it (`2`, `m2`, `<cluster>2`)."""
    name = f"{cluster}{index}"
    merged: dict[str, str] = dict(metadata.get("*", {}))
    for ref in (str(index), f"m{index}", name):
        merged.update(metadata.get(ref, {}))
    return MachineState(
        name=name,
        index=index,
        ip=str(network.machine_address(subnet, index)),
        machine_id=uuid.uuid4().hex,
        metadata=merged,
    )


class Provisioner:
    def __init__(self, ctx: ClusterContext, etcd_members: EtcdMembers) -> None:
        self._ctx = ctx
        self._etcd = etcd_members

    def prepare_cloud(self, source: Path) -> None:
        """A discovery token on the host's etcd and the user-data that names it."""
        ctx = self._ctx
        state = ctx.require_state()
        member = state.etcd_members[0]
        path = cloud.new_discovery(etcd.local_url(member), len(state.machines))
        state.discovery_url = f"http://{state.bridge_ip}:{member.client_port}{path}"
        ctx.layout.user_data.write_text(cloud.user_data(source.read_text(), state.discovery_url))
        cloud.debs()  # downloaded here, once, before the machines are prepared in parallel
        ctx.save()
        ctx.progress("cluster", f"cloud-init seed ready (discovery {state.discovery_url})")

    def prepare(self, m: MachineState) -> None:
        """Mount a machine's root and give it its identity and configuration."""
        ctx = self._ctx
        layout = ctx.layout
        state = ctx.require_state()
        root = rootfs.mount_root(layout, m.name)
        rootfs.write(root, "etc/machine-id", m.machine_id + "\n", 0o444)
        rootfs.write(root, "etc/hostname", m.name + "\n")
        self.write_hosts(m)
        if state.cloud_config:
            # fleet.conf, etcd and fleet itself are the user-data's doing.
            cloud.unpack(root, cloud.debs())
            cloud.seed(root, m.name, layout.user_data.read_text())
        else:
            rootfs.write(
                root,
                FLEET_CONF,
                fleet_conf(
                    machine=m.name,
                    etcd_servers=self._etcd.endpoints(),
                    public_ip=m.ip,
                    metadata=m.metadata,
                    agent_ttl=state.agent_ttl,
                    etcd_key_prefix=state.etcd_key_prefix,
                ),
            )
        for relative in ssh.HOST_KEYS_TO_HIDE:
            rootfs.remove(root, relative)
        ssh.keygen(root / ssh.HOST_KEY, f"root@{m.name}")
        rootfs.write(root, ssh.SSHD_CONFIG, ssh.SSHD_CONFIG_TEXT)
        user_public = layout.user_key.with_name(layout.user_key.name + ".pub")
        authorized = [user_public.read_text().strip(), *ssh.invoking_user_keys()]
        (root / "root/.ssh").mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(root / "root/.ssh", 0o700)
        rootfs.write(root, "root/.ssh/authorized_keys", "\n".join(authorized) + "\n", 0o600)
        # The cluster key inside too: `fleetctl ssh` from one machine reaches the others.
        rootfs.write(root, "root/.ssh/id_ed25519", layout.user_key.read_bytes(), 0o600)
        rootfs.write(root, "root/.ssh/id_ed25519.pub", user_public.read_bytes())
        ctx.progress(m.name, f"root file system ready (machine-id {m.machine_id})")

    def write_hosts(self, m: MachineState) -> None:
        """The host's /etc/hosts plus every machine of the cluster, in machine `m`."""
        ctx = self._ctx
        state = ctx.require_state()
        hosts = Path("/etc/hosts").read_text() if Path("/etc/hosts").exists() else ""
        peers = "".join(f"{p.ip}\t{p.name}\n" for p in state.machines)
        text = hosts + f"# fleet-cluster {ctx.name}\n" + peers
        rootfs.write(ctx.layout.machine_root(m.name), "etc/hosts", text)

    def write_known_hosts(self) -> None:
        """Every machine's host key, on the host (for ssh from there) and in every machine."""
        layout = self._ctx.layout
        lines = []
        for m in self._ctx.require_state().machines:
            public = (layout.machine_root(m.name) / (ssh.HOST_KEY + ".pub")).read_text()
            lines.append(ssh.known_hosts_line([m.ip, m.name], public))
        text = "\n".join(lines) + "\n"
        layout.known_hosts.write_text(text)
        for m in self._ctx.require_state().machines:
            rootfs.write(layout.machine_root(m.name), "root/.ssh/known_hosts", text)
