"""The cluster's etcd members as its state records them: made, started, failed on purpose.

etcd.py runs one member's process; this is the cluster's view: which members there are, on
which ports, which are up, where the machines reach them, who the raft leader is. Every
change of a member's pid is saved at once, so `down` (maybe another process) finds it.
"""

from __future__ import annotations

from collections.abc import Sequence

from . import etcd, machine, network, procs
from .context import ClusterContext
from .errors import ClusterError
from .state import EtcdState, MachineState


class EtcdMembers:
    def __init__(self, ctx: ClusterContext) -> None:
        self._ctx = ctx

    def create(self, count: int, client_port: int = 0) -> None:
        """Give `count` members ports (the first member `client_port`, if not 0), save, start."""
        state = self._ctx.require_state()
        ports: set[int] = set()

        def port(fixed: int = 0) -> int:
            while True:
                chosen = fixed or network.free_port()
                if chosen not in ports:
                    ports.add(chosen)
                    return chosen

        state.etcd_members = [
            EtcdState(
                pid=0,
                client_port=port(client_port if i == 1 else 0),
                peer_port=port(),
                index=i,
            )
            for i in range(1, count + 1)
        ]
        self._ctx.save()
        self.start()

    def endpoints(self) -> list[str]:
        """Every etcd member's client URL on the bridge (what fleetd's etcd_servers lists).

        In a cloud-config cluster, the members in the machines (on fleet's port 2379).
        """
        state = self._ctx.require_state()
        if state.cloud_config:
            return [f"http://{m.ip}:2379" for m in state.machines]
        if not state.etcd_members:
            raise ClusterError(f"cluster {self._ctx.name!r} has no etcd")
        return [f"http://{state.bridge_ip}:{m.client_port}" for m in state.etcd_members]

    def select(self, indexes: Sequence[int] | None) -> list[EtcdState]:
        """The members numbered `indexes` (all of them for None); an unknown number is refused."""
        members = self._ctx.require_state().etcd_members
        if indexes is None:
            return list(members)
        known = {m.index: m for m in members}
        unknown = [i for i in indexes if i not in known]
        if unknown:
            raise ClusterError(
                f"no etcd member {unknown[0]} in cluster {self._ctx.name!r} "
                f"(members 1..{len(members)})"
            )
        return [known[i] for i in indexes]

    def start(self, members: Sequence[int] | None = None, timeout: float = 30.0) -> None:
        """Start stopped etcd members (all by default) on their data and ports; wait healthy.

        Members that run already are left alone. All of them start before any is waited
        on: a member that restarts with its peers down is healthy only once it has a quorum.
        """
        ctx = self._ctx
        state = ctx.require_state()
        chosen = [m for m in self.select(members) if not etcd.running(m, ctx.layout)]
        for member in chosen:
            member.pid = etcd.start(
                ctx.layout,
                ctx.name,
                state.bridge_ip,
                member,
                state.etcd_members,
                discovery=state.cloud_config is not None,
            )
            ctx.save()
        for member in chosen:
            etcd.wait_healthy(ctx.layout, member, timeout)
            ctx.progress(
                "etcd",
                f"member {member.index} healthy at http://{state.bridge_ip}:"
                f"{member.client_port} (pid {member.pid})",
            )

    def stop(self, members: Sequence[int] | None = None, *, kill: bool = False) -> None:
        """Stop etcd members (all by default): SIGTERM, or SIGKILL as a crash with `kill`.

        Their data stays; `start` brings them back.
        """
        ctx = self._ctx
        for member in self.select(members):
            if kill:
                etcd.kill(member, ctx.layout)
            else:
                left = etcd.stop_member(member, ctx.layout, ctx.stop_grace)
                if left:
                    raise ClusterError(f"etcd member {member.index} (pid {left}) would not die")
            member.pid = 0
            ctx.save()
            ctx.progress("etcd", f"member {member.index} {'killed' if kill else 'stopped'}")

    def pause(self, members: Sequence[int] | None = None) -> None:
        """Freeze etcd members (all by default) with SIGSTOP: they hold their connections and
        answer nothing, unlike a stopped member; `resume` lets them go on."""
        for member in self.select(members):
            etcd.pause(member, self._ctx.layout)
            self._ctx.progress("etcd", f"member {member.index} paused (SIGSTOP)")

    def resume(self, members: Sequence[int] | None = None) -> None:
        for member in self.select(members):
            etcd.pause(member, self._ctx.layout, resume=True)
            self._ctx.progress("etcd", f"member {member.index} resumed (SIGCONT)")

    def leader(self, among: Sequence[int] | None = None) -> int | None:
        """The index of etcd's raft leader as the running members see it, or None.

        None also while the members disagree (an election in progress). `among` asks only
        those members (leave a paused one out: it answers nothing).
        """
        seen: dict[str, int] = {}
        leaders: set[str] = set()
        for member in self.select(among):
            if not etcd.running(member, self._ctx.layout):
                continue
            status = etcd.status(etcd.local_url(member))
            if status is None:
                return None
            seen[status["member"]] = member.index
            leaders.add(status["leader"])
        if len(leaders) != 1:
            return None
        return seen.get(leaders.pop())

    def wait_reachable(self, m: MachineState) -> None:
        """Wait until the machine reaches a running etcd member (any, if all are down)."""
        ctx = self._ctx
        state = ctx.require_state()
        assert m.init_pid is not None
        init_pid = m.init_pid
        members = [x for x in state.etcd_members if etcd.running(x, ctx.layout)]
        member = (members or state.etcd_members)[0]
        target = f"{state.bridge_ip}/{member.client_port}"
        probe_argv = ["bash", "-c", f"exec 3<>/dev/tcp/{target}"]
        procs.wait_for(
            lambda: True if machine.exec_in(init_pid, probe_argv).returncode == 0 else None,
            10.0,
            f"{m.name} to reach etcd at {target}",
            cancel=ctx.cancel,
        )
