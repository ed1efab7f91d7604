"""Network partitions of one machine: its host-side veth taken down, and brought up again.

network.py sets the link; this finds the machine's veth (exactly, from inside), records the
partition in the state, and returns only once the machine itself sees the change: its end of
the veth follows the host's asynchronously, and connections made in between would still get
through, or fail after a heal.
"""

from __future__ import annotations

from . import machine, network, procs
from .context import ClusterContext, MachineRef
from .etcd_members import EtcdMembers
from .state import MachineState, locked


class Partitions:
    def __init__(self, ctx: ClusterContext, etcd_members: EtcdMembers) -> None:
        self._ctx = ctx
        self._etcd = etcd_members

    def partition(self, m: MachineRef) -> None:
        """Cut a machine off the network: its host-side veth goes down.

        Returns once the machine's end has lost carrier, so nothing gets through afterwards.
        """
        target = self._ctx.machine(m)
        self._set_link(target, up=False, waiting_for="lose carrier")
        self._ctx.progress(target.name, f"partitioned ({target.veth} down)")

    def heal(self, m: MachineRef) -> None:
        """Undo `partition`; returns once the machine reaches etcd on the bridge again.

        Bringing the host end up is not enough to return: the machine's end gets its carrier
        back asynchronously (the kernel's link watch batches such events for up to a second),
        and connections made before that fail.
        """
        target = self._ctx.machine(m)
        self._set_link(target, up=True, waiting_for="get carrier back")
        self._etcd.wait_reachable(target)
        self._ctx.progress(target.name, f"healed ({target.veth} up)")

    def _set_link(self, target: MachineState, *, up: bool, waiting_for: str) -> None:
        """Set the link, record it, then wait until host0 in the machine has carrier or not."""
        init_pid = machine.require_running(target)
        with locked(self._ctx.layout):
            # Re-resolve: cheap, and exact even if the state file is stale.
            target.veth = network.host_veth(init_pid)
            network.set_link(target.veth, up)
            target.partitioned = not up
            self._ctx.save()
        init_pid = machine.require_running(target)
        procs.wait_for(
            lambda: True if network.host0_has_carrier(init_pid) == up else None,
            5.0,
            f"{target.name}'s host0 to {waiting_for}",
        )
