"""A local fleet cluster: etcd on the host, N systemd-nspawn machines on a bridge, fleetd in each.

`Cluster` is the library API (pytest fixtures use it) and what the CLI drives. Its state lives
in `<state root>/<name>/state.json` so that separate CLI invocations can operate one cluster.

Teardown is the part that must never fail quietly: `down()` tries every step even when some
fail, finds leftovers by where they live (mounts under the state directory, processes in the
cluster's cgroups or naming its paths), not only through the state file, and reports whatever
it could not remove.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from . import (
    cgroups,
    cloud,
    etcd,
    install,
    machine,
    mounts,
    network,
    prereqs,
    procs,
    rootfs,
    signals,
    ssh,
)
from .errors import (
    ClusterError,
    ClusterExists,
    NoSuchCluster,
    PrerequisiteError,
    TeardownIncomplete,
)
from .fleet_service import (
    FLEET_CONF,
    FleetdStatus,
    fleet_conf,
    fleetd_state,
    parse_metadata,
    restart_fleetd,
    start_fleetd,
    stop_fleetd,
)
from .state import STATE_ROOT, ClusterState, EtcdState, Layout, MachineState, load, locked, save
from .teardown import teardown

Progress = Callable[[str, str], None]
"""Called as progress(subject, message): subject is a machine name, "etcd", "network"..."""

MachineRef = MachineState | str | int
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9-]{0,9}$")


def _quiet(subject: str, message: str) -> None:
    del subject, message


class Cluster:
    """A local cluster. `with Cluster(...) as c:` boots it and always tears it down."""

    def __init__(
        self,
        name: str = "fleet",
        n: int = 3,
        *,
        subnet: str = "10.77.0.0/24",
        agent_ttl: str | None = None,
        metadata: Mapping[str, Mapping[str, str]] | None = None,
        etcd_key_prefix: str = "/fleet/",
        fleetd: bool = True,
        etcd_port: int = 0,
        etcd_members: int = 1,
        binds: Sequence[str] = (),
        wheel: str | Path | None = None,
        install_fleet: bool | None = None,
        cloud_config: str | Path | None = None,
        state_root: Path = STATE_ROOT,
        progress: Progress | None = None,
        boot_timeout: float = 60.0,
        stop_grace: float = 5.0,
        fleetd_settle: float = 0.5,
        keep_on_failure: bool = False,
    ) -> None:
        if not NAME_PATTERN.match(name):
            raise ClusterError(
                f"bad cluster name {name!r}: 1-10 characters, lowercase letters, digits and "
                "dashes, starting with a letter (it names the bridge and the machines)"
            )
        if not 1 <= n <= 200:
            raise ClusterError(f"machine count {n} out of range 1..200")
        if etcd_members not in (1, 3, 5):
            raise ClusterError(f"etcd member count {etcd_members}: use 1, 3 or 5")
        self.name = name
        self.n = n
        self.subnet = network.parse_subnet(subnet)
        self.agent_ttl = agent_ttl
        self.metadata = {str(k): dict(v) for k, v in (metadata or {}).items()}
        refs = {r for i in range(1, n + 1) for r in (str(i), f"m{i}", f"{name}{i}")}
        unknown = set(self.metadata) - refs - {"*"}
        if unknown:
            raise ClusterError(f"metadata for unknown machines: {', '.join(sorted(unknown))}")
        self.etcd_key_prefix = etcd_key_prefix
        self.fleetd = fleetd
        self.etcd_port = etcd_port
        self.etcd_members = etcd_members
        # Extra host paths every machine sees read-only at the same path (tests bind a probe).
        self.binds = list(binds)
        self.wheel = wheel
        # fleet is installed from its wheel in each machine when fleetd runs there, or on
        # request (a machine with fleet installed but fleetd not started).
        self.install_fleet = fleetd if install_fleet is None else install_fleet
        self.cloud_config = Path(cloud_config) if cloud_config is not None else None
        if self.cloud_config is not None:
            if not self.cloud_config.is_file():
                raise ClusterError(f"no cloud-config file {self.cloud_config}")
            # What the user-data's own files decide is not the tool's to set; said, not ignored.
            given = [
                flag
                for flag, used in (
                    ("--etcd-members", etcd_members != 1),
                    ("--agent-ttl", agent_ttl is not None),
                    ("--metadata", bool(metadata)),
                    ("--etcd-key-prefix", etcd_key_prefix != "/fleet/"),
                    ("--no-fleetd", not fleetd),
                )
                if used
            ]
            if given:
                raise ClusterError(
                    f"{', '.join(given)} cannot be combined with --cloud-config: the user-data "
                    "configures etcd and fleet (edit its /etc/default/etcd and fleet.conf)"
                )
            # The user-data installs and starts fleet; the wheels must be there for it.
            self.install_fleet = True
        self.layout = Layout(state_root / name)
        self.progress: Progress = progress or _quiet
        self.boot_timeout = boot_timeout
        self.stop_grace = stop_grace
        self.fleetd_settle = fleetd_settle
        self.keep_on_failure = keep_on_failure
        try:
            self.state: ClusterState | None = load(self.layout)
        except PrerequisiteError:  # not root: every operation that needs it will say so
            self.state = None
        self._save_lock = threading.Lock()
        self._cancel = threading.Event()
        self._hierarchies: cgroups.Hierarchies | None = None

    @classmethod
    def attach(
        cls, name: str = "fleet", *, state_root: Path = STATE_ROOT, progress: Progress | None = None
    ) -> Cluster:
        """The cluster `name` that an earlier `up` (maybe another process) left running."""
        state = load(Layout(state_root / name))
        if state is None:
            raise NoSuchCluster(f"no cluster {name!r} (no {state_root / name / 'state.json'})")
        cluster = cls(
            name,
            max(1, len(state.machines)),
            subnet=state.subnet,
            agent_ttl=state.agent_ttl,
            etcd_key_prefix=state.etcd_key_prefix,
            fleetd=state.fleetd,
            etcd_members=max(1, len(state.etcd_members)),
            binds=state.binds,
            state_root=state_root,
            progress=progress,
        )
        return cluster

    # -- what the cluster is -------------------------------------------------------------

    @property
    def bridge(self) -> str:
        return f"{self.name}br0"

    @property
    def machines(self) -> list[MachineState]:
        return list(self._require_state().machines)

    def machine(self, ref: MachineRef) -> MachineState:
        if isinstance(ref, MachineState):
            return ref
        return self._require_state().machine(ref)

    @property
    def etcd_endpoint(self) -> str:
        """etcd's client URL as the machines (and the host) reach it: on the bridge.

        With several members, the first one's; `etcd_endpoints` names them all.
        """
        return self.etcd_endpoints[0]

    @property
    def etcd_endpoints(self) -> list[str]:
        """Every etcd member's client URL on the bridge (what fleetd's etcd_servers lists).

        In a cloud-config cluster, the members in the machines (on fleet's port 2379).
        """
        state = self._require_state()
        if state.cloud_config:
            return [f"http://{m.ip}:2379" for m in state.machines]
        if not state.etcd_members:
            raise ClusterError(f"cluster {self.name!r} has no etcd")
        return [f"http://{state.bridge_ip}:{m.client_port}" for m in state.etcd_members]

    @property
    def ssh_key(self) -> Path:
        return self.layout.user_key

    @property
    def known_hosts(self) -> Path:
        return self.layout.known_hosts

    def _require_state(self) -> ClusterState:
        if self.state is None:
            raise NoSuchCluster(f"cluster {self.name!r} is not up")
        return self.state

    def _save(self) -> None:
        with self._save_lock:
            if self.state is not None and self.layout.root.is_dir():
                save(self.layout, self.state)

    def _cgroup_dirs(self, name: str) -> list[Path]:
        if self._hierarchies is None:
            self._hierarchies = cgroups.discover()
        return cgroups.machine_dirs(self._hierarchies, self.name, name)

    # -- up ------------------------------------------------------------------------------

    def up(self) -> None:
        """Boot the cluster. On any failure (or Ctrl-C) what was built is torn down again."""
        prereqs.check_host()
        if self.state is not None or self.layout.state_file.exists():
            raise ClusterExists(
                f"cluster {self.name!r} already exists (state in {self.layout.root}); "
                f"use it, or run `fleet-cluster down --name {self.name}` first"
            )
        # Checks that build nothing come first: failing them needs no teardown.
        self._hierarchies = cgroups.discover()
        network.check_free(self.subnet, self.bridge)
        self._cancel.clear()
        try:
            self._up()
        except BaseException as failure:
            self._cancel.set()
            if not self.keep_on_failure:
                self.progress("cluster", "boot failed; tearing down what was built")
                try:
                    self.down()
                except ClusterError as exc:
                    # Keep the boot failure as the error, but never hide a dirty teardown.
                    self.progress("cluster", str(exc))
                    failure.add_note(str(exc))
            raise

    def _up(self) -> None:
        started = time.monotonic()
        bridge_ip = network.bridge_address(self.subnet)
        self.layout.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.layout.root, 0o700)  # it holds the cluster's private SSH key
        self.state = ClusterState(
            name=self.name,
            state_dir=str(self.layout.root),
            subnet=str(self.subnet),
            bridge=self.bridge,
            bridge_ip=str(bridge_ip),
            prefixlen=self.subnet.prefixlen,
            agent_ttl=self.agent_ttl,
            etcd_key_prefix=self.etcd_key_prefix,
            fleetd=self.fleetd,
            binds=self.binds,
            machines=[self._new_machine(i) for i in range(1, self.n + 1)],
            cloud_config=str(self.cloud_config) if self.cloud_config else None,
        )
        with locked(self.layout):
            self._save()  # first thing: `down` can find whatever follows
            if self.install_fleet:
                self._stage_wheel(self.wheel)
            network.create_bridge(self.bridge, bridge_ip, self.subnet.prefixlen)
            self.progress("network", f"bridge {self.bridge} {bridge_ip}/{self.subnet.prefixlen}")
            self._start_etcd(str(bridge_ip))
            if self.cloud_config is not None:
                self._prepare_cloud(self.cloud_config)
            ssh.ensure_user_key(self.layout, self.name)
            self._parallel(self._prepare, self.state.machines)
            self._write_known_hosts()
            self._parallel(self._boot, self.state.machines)
        took = time.monotonic() - started
        boots = ", ".join(f"{m.name} {m.boot_seconds:.2f} s" for m in self.state.machines)
        self.progress("cluster", f"{self.n} machine(s) up in {took:.2f} s (boot: {boots})")

    def _prepare_cloud(self, source: Path) -> None:
        """A discovery token on the host's etcd and the user-data that names it."""
        state = self._require_state()
        member = state.etcd_members[0]
        path = cloud.new_discovery(etcd.local_url(member), len(state.machines))
        state.discovery_url = f"http://{state.bridge_ip}:{member.client_port}{path}"
        self.layout.user_data.write_text(cloud.user_data(source.read_text(), state.discovery_url))
        cloud.debs()  # downloaded here, once, before the machines are prepared in parallel
        self._save()
        self.progress("cluster", f"cloud-init seed ready (discovery {state.discovery_url})")

    def _stage_wheel(self, wheel: str | Path | None) -> install.WheelInfo:
        """Put fleet's wheel (given, or built from this checkout) and its dependencies in the
        folder the machines install from; it becomes what new machines get."""
        state = self._require_state()
        started = time.monotonic()
        info = install.resolve_wheel(wheel, self.layout.root / "build")
        state.wheels_dir = str(self.layout.wheels_dir)
        state.wheel = install.stage(info, self.layout.wheels_dir)
        self._save()
        took = time.monotonic() - started
        self.progress("cluster", f"fleet {info.version} staged ({info.path.name}, {took:.2f} s)")
        return info

    def _install_fleet(self, m: MachineState, wheel: str) -> None:
        """Install the staged wheel `wheel` in a running machine's own venv."""
        init_pid = machine.require_running(m)
        m.fleet_version = install.install_in(init_pid, wheel)
        m.fleet_wheel = wheel
        self._save()

    def _new_machine(self, index: int) -> MachineState:
        name = f"{self.name}{index}"
        metadata: dict[str, str] = dict(self.metadata.get("*", {}))
        for ref in (str(index), f"m{index}", name):
            metadata.update(self.metadata.get(ref, {}))
        return MachineState(
            name=name,
            index=index,
            ip=str(network.machine_address(self.subnet, index)),
            machine_id=uuid.uuid4().hex,
            metadata=metadata,
        )

    def _start_etcd(self, bridge_ip: str) -> None:
        state = self._require_state()
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
                client_port=port(self.etcd_port if i == 1 else 0),
                peer_port=port(),
                index=i,
            )
            for i in range(1, self.etcd_members + 1)
        ]
        self._save()
        self.start_etcd()

    def _etcd_members(self, indexes: Sequence[int] | None) -> list[EtcdState]:
        members = self._require_state().etcd_members
        if indexes is None:
            return list(members)
        known = {m.index: m for m in members}
        unknown = [i for i in indexes if i not in known]
        if unknown:
            raise ClusterError(
                f"no etcd member {unknown[0]} in cluster {self.name!r} (members 1..{len(members)})"
            )
        return [known[i] for i in indexes]

    def start_etcd(self, members: Sequence[int] | None = None, timeout: float = 30.0) -> None:
        """Start stopped etcd members (all by default) on their data and ports; wait healthy.

        Members that run already are left alone. All of them start before any is waited
        on: a member that restarts with its peers down is healthy only once it has a quorum.
        """
        state = self._require_state()
        chosen = [m for m in self._etcd_members(members) if not etcd.running(m, self.layout)]
        for member in chosen:
            member.pid = etcd.start(
                self.layout,
                self.name,
                state.bridge_ip,
                member,
                state.etcd_members,
                discovery=state.cloud_config is not None,
            )
            self._save()
        for member in chosen:
            etcd.wait_healthy(self.layout, member, timeout)
            self.progress(
                "etcd",
                f"member {member.index} healthy at http://{state.bridge_ip}:"
                f"{member.client_port} (pid {member.pid})",
            )

    def stop_etcd(self, members: Sequence[int] | None = None, *, kill: bool = False) -> None:
        """Stop etcd members (all by default): SIGTERM, or SIGKILL as a crash with `kill`.

        Their data stays; `start_etcd` brings them back.
        """
        for member in self._etcd_members(members):
            if kill:
                etcd.kill(member, self.layout)
            else:
                left = etcd.stop_member(member, self.layout, self.stop_grace)
                if left:
                    raise ClusterError(f"etcd member {member.index} (pid {left}) would not die")
            member.pid = 0
            self._save()
            self.progress("etcd", f"member {member.index} {'killed' if kill else 'stopped'}")

    def pause_etcd(self, members: Sequence[int] | None = None) -> None:
        """Freeze etcd members (all by default) with SIGSTOP: they hold their connections and
        answer nothing, unlike a stopped member; `resume_etcd` lets them go on."""
        for member in self._etcd_members(members):
            etcd.pause(member, self.layout)
            self.progress("etcd", f"member {member.index} paused (SIGSTOP)")

    def resume_etcd(self, members: Sequence[int] | None = None) -> None:
        for member in self._etcd_members(members):
            etcd.pause(member, self.layout, resume=True)
            self.progress("etcd", f"member {member.index} resumed (SIGCONT)")

    def etcd_leader(self, among: Sequence[int] | None = None) -> int | None:
        """The index of etcd's raft leader as the running members see it, or None.

        None also while the members disagree (an election in progress). `among` asks only
        those members (leave a paused one out: it answers nothing).
        """
        seen: dict[str, int] = {}
        leaders: set[str] = set()
        for member in self._etcd_members(among):
            if not etcd.running(member, self.layout):
                continue
            status = etcd.status(etcd.local_url(member))
            if status is None:
                return None
            seen[status["member"]] = member.index
            leaders.add(status["leader"])
        if len(leaders) != 1:
            return None
        return seen.get(leaders.pop())

    def _parallel(self, work: Callable[[MachineState], None], items: list[MachineState]) -> None:
        """Run `work` for every machine at once; Ctrl-C cancels the others' waits."""
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(len(items), 32) or 1)
        futures = {pool.submit(work, item): item for item in items}
        try:
            concurrent.futures.wait(futures)
        except BaseException:
            self._cancel.set()
            raise
        finally:
            pool.shutdown(wait=True)
        errors = [(futures[f].name, f.exception()) for f in futures if f.exception() is not None]
        if errors:
            lines = "\n".join(f"  {name}: {exc}" for name, exc in errors)
            raise ClusterError(f"{len(errors)} machine(s) failed:\n{lines}")

    def _prepare(self, m: MachineState) -> None:
        """Mount a machine's root and give it its identity and configuration."""
        state = self._require_state()
        root = rootfs.mount_root(self.layout, m.name)
        rootfs.write(root, "etc/machine-id", m.machine_id + "\n", 0o444)
        rootfs.write(root, "etc/hostname", m.name + "\n")
        self._write_hosts(m)
        if state.cloud_config:
            # fleet.conf, etcd and fleet itself are the user-data's doing.
            cloud.unpack(root, cloud.debs())
            cloud.seed(root, m.name, self.layout.user_data.read_text())
        else:
            rootfs.write(
                root,
                FLEET_CONF,
                fleet_conf(
                    machine=m.name,
                    etcd_servers=self.etcd_endpoints,
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
        user_public = self.layout.user_key.with_name(self.layout.user_key.name + ".pub")
        authorized = [user_public.read_text().strip(), *ssh.invoking_user_keys()]
        (root / "root/.ssh").mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(root / "root/.ssh", 0o700)
        rootfs.write(root, "root/.ssh/authorized_keys", "\n".join(authorized) + "\n", 0o600)
        # The cluster key inside too: `fleetctl ssh` from one machine reaches the others.
        rootfs.write(root, "root/.ssh/id_ed25519", self.layout.user_key.read_bytes(), 0o600)
        rootfs.write(root, "root/.ssh/id_ed25519.pub", user_public.read_bytes())
        self.progress(m.name, f"root file system ready (machine-id {m.machine_id})")

    def _write_hosts(self, m: MachineState) -> None:
        """The host's /etc/hosts plus every machine of the cluster, in machine `m`."""
        state = self._require_state()
        hosts = Path("/etc/hosts").read_text() if Path("/etc/hosts").exists() else ""
        peers = "".join(f"{p.ip}\t{p.name}\n" for p in state.machines)
        text = hosts + f"# fleet-cluster {self.name}\n" + peers
        rootfs.write(self.layout.machine_root(m.name), "etc/hosts", text)

    def _write_known_hosts(self) -> None:
        lines = []
        for m in self._require_state().machines:
            public = (self.layout.machine_root(m.name) / (ssh.HOST_KEY + ".pub")).read_text()
            lines.append(ssh.known_hosts_line([m.ip, m.name], public))
        text = "\n".join(lines) + "\n"
        self.layout.known_hosts.write_text(text)
        for m in self._require_state().machines:
            rootfs.write(self.layout.machine_root(m.name), "root/.ssh/known_hosts", text)

    def _boot(self, m: MachineState) -> None:
        """Boot a prepared machine: nspawn, systemd running, network, sshd, then fleetd."""
        state = self._require_state()
        started = time.monotonic()

        def step(message: str) -> None:
            self.progress(m.name, f"{message} ({time.monotonic() - started:.2f} s)")

        dirs = self._cgroup_dirs(m.name)
        for directory in dirs:  # leftovers of a previous boot would confuse systemd
            cgroups.remove(directory)
        procs_files = cgroups.create(dirs)
        m.status = "booting"
        binds = list(state.binds)
        if state.wheels_dir:
            binds.append(f"{state.wheels_dir}:{install.MACHINE_WHEELS}")
        m.nspawn_pid = machine.launch(self.layout, m.name, state.bridge, binds, procs_files)
        self._save()
        step(f"systemd-nspawn started (pid {m.nspawn_pid})")
        m.init_pid = machine.find_init(
            self.layout, m.name, m.nspawn_pid, self.boot_timeout, self._cancel
        )
        self._save()
        system = machine.wait_running(self.layout, m, self.boot_timeout, self._cancel)
        step(f"systemd {system} (init pid {m.init_pid})")
        network.configure_machine(m.init_pid, m.ip, state.prefixlen, state.bridge_ip)
        m.veth = network.host_veth(m.init_pid)
        m.partitioned = False
        self._save()
        step(f"network {m.ip}/{state.prefixlen} via {state.bridge_ip} (host side {m.veth})")
        self._wait_etcd_reachable(m)
        step("etcd reachable from inside")
        self._start_sshd(m)
        step("sshd ready")
        m.status = "running"
        m.boot_seconds = round(time.monotonic() - started, 3)
        self._save()
        if state.cloud_config:
            self._run_cloud_init(m, step)
            return
        # Installed once per machine root: a restarted machine keeps its venv (and version).
        root = self.layout.machine_root(m.name)
        if state.wheel and not (root / install.MACHINE_VENV.lstrip("/") / "bin/fleetd").exists():
            self._install_fleet(m, state.wheel)
            step(f"fleet {m.fleet_version} installed from {state.wheel}")
        if state.fleetd:
            try:
                status = self.start_fleetd(m)
            except ClusterError as exc:  # a broken fleetd must not fail the boot
                status = FleetdStatus(False, "error", str(exc))
                m.fleetd = status.summary
            detail = "\n".join(status.detail.splitlines()[-8:])
            step(f"fleetd {status.summary}" + ("" if status.ok else f"\n{detail}"))

    def _run_cloud_init(self, m: MachineState, step: Callable[[str], None]) -> None:
        """cloud-init's stages, then what they started: etcd's member, fleetd.

        A machine booted again (same root) has run its user-data already: cloud-init skips
        the per-instance modules, and the services the user-data enabled are started as a
        full boot would (these machines boot basic.target, which does not want them).
        """
        assert m.init_pid is not None
        ran_before = (self.layout.machine_root(m.name) / "var/lib/cloud/instance").exists()
        m.fleetd = "cloud-init running"
        self._save()
        status = cloud.run(m.init_pid, timeout=max(300.0, self.boot_timeout))
        step(f"cloud-init {status}")
        if ran_before:
            argv = ["systemctl", "start", "etcd.service", "fleet.socket", "fleet.service"]
            machine.exec_in(m.init_pid, argv, timeout=150)
        version = machine.exec_in(m.init_pid, ["fleetd", "--version"], timeout=30)
        m.fleet_version = install.version_of(version.stdout) or None
        m.fleetd = fleetd_state(m)
        self._save()
        step(f"fleetd {m.fleetd} (fleet {m.fleet_version})")

    def _wait_etcd_reachable(self, m: MachineState) -> None:
        """Wait until the machine reaches a running etcd member (any, if all are down)."""
        state = self._require_state()
        assert m.init_pid is not None
        init_pid = m.init_pid
        members = [x for x in state.etcd_members if etcd.running(x, self.layout)]
        member = (members or state.etcd_members)[0]
        target = f"{state.bridge_ip}/{member.client_port}"
        probe_argv = ["bash", "-c", f"exec 3<>/dev/tcp/{target}"]
        procs.wait_for(
            lambda: True if machine.exec_in(init_pid, probe_argv).returncode == 0 else None,
            10.0,
            f"{m.name} to reach etcd at {target}",
            cancel=self._cancel,
        )

    def _start_sshd(self, m: MachineState) -> None:
        assert m.init_pid is not None
        machine.exec_in(
            m.init_pid,
            [
                "systemd-run",
                f"--unit={ssh.SSHD_UNIT}",
                "--description=sshd for fleet-cluster",
                "--property=RuntimeDirectory=sshd",
                "--property=RuntimeDirectoryMode=0755",
                "--property=Restart=on-failure",
                "/usr/sbin/sshd",
                "-D",
                "-e",
                "-f",
                f"/{ssh.SSHD_CONFIG}",
            ],
            check=True,
            timeout=20,
        )
        procs.wait_for(
            lambda: True if network.ssh_banner(m.ip) else None,
            10.0,
            f"sshd on {m.name} ({m.ip}:22)",
            cancel=self._cancel,
        )

    # -- operating a running cluster -----------------------------------------------------

    def exec(
        self,
        m: MachineRef,
        argv: Sequence[str],
        *,
        check: bool = False,
        timeout: float | None = 60.0,
        input_text: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside a machine (nsenter into all its namespaces): CompletedProcess[str]."""
        target = self.machine(m)
        init_pid = machine.require_running(target)
        return machine.exec_in(init_pid, argv, check=check, timeout=timeout, input_text=input_text)

    def ssh_argv(
        self, m: MachineRef, command: Sequence[str] = (), *, tty: bool = False
    ) -> list[str]:
        return ssh.client_argv(self.layout, self.machine(m).ip, command, tty=tty)

    def kill(self, m: MachineRef) -> None:
        """SIGKILL a machine (as a crash would); its overlay is kept for `restart`."""
        target = self.machine(m)
        with locked(self.layout):
            machine.kill(self.layout, target, self._cgroup_dirs(target.name))
            target.status = "killed"
            target.fleetd = None
            self._save()
        self.progress(target.name, "killed")

    def stop(self, m: MachineRef) -> None:
        """Shut a machine down cleanly (SIGKILL after the grace period); overlay kept."""
        target = self.machine(m)
        with locked(self.layout):
            machine.stop(self.layout, target, self._cgroup_dirs(target.name), self.stop_grace)
            target.status = "stopped"
            target.fleetd = None
            self._save()
        self.progress(target.name, "stopped")

    def restart(self, m: MachineRef) -> None:
        """Boot a killed or stopped machine again (a running one is stopped first).

        Same overlay, so same machine-id, host key and whatever the machine wrote.
        """
        target = self.machine(m)
        prereqs.check_host()
        if target.nspawn_pid is not None or target.init_pid is not None:
            self.stop(target)
        self._cancel.clear()
        with locked(self.layout):
            if not mounts.is_mounted(self.layout.machine_root(target.name)):
                # Unmounted by hand: the machine's writes are gone; give it its identity again.
                self._prepare(target)
                self._write_known_hosts()
            self._boot(target)
        self.progress(target.name, f"restarted in {target.boot_seconds:.2f} s")

    def add_machine(
        self, metadata: Mapping[str, str] | None = None, *, machine_id: str | None = None
    ) -> MachineState:
        """Boot one more machine (the next index and address) into the running cluster.

        It gets a new machine-id (or `machine_id`: a clone of another machine's, as a copied
        VM image would have), the cluster's default metadata (`*`) updated with `metadata`,
        and fleetd if the cluster runs fleetd; the others learn its name and host key. A
        machine that fails to boot stays in the state, so `down` removes it too.
        """
        state = self._require_state()
        if state.cloud_config:
            raise ClusterError(
                "a cloud-config cluster's etcd members found each other through discovery, "
                "which only bootstraps; adding a machine needs `etcdctl member add` first"
            )
        prereqs.check_host()
        self._cancel.clear()
        with locked(self.layout):
            index = max((m.index for m in state.machines), default=0) + 1
            new = self._new_machine(index)
            new.metadata.update(metadata or {})
            if machine_id is not None:
                new.machine_id = machine_id
            state.machines.append(new)
            self.n = len(state.machines)
            self._save()  # first: `down` finds the machine whatever happens next
            self._prepare(new)
            for other in state.machines:
                if other is not new and mounts.is_mounted(self.layout.machine_root(other.name)):
                    self._write_hosts(other)
            self._write_known_hosts()
            self._boot(new)
        self.progress(new.name, f"added in {new.boot_seconds:.2f} s")
        return new

    def partition(self, m: MachineRef) -> None:
        """Cut a machine off the network: its host-side veth goes down.

        Returns once the machine's end has lost carrier, so nothing gets through afterwards.
        """
        target = self.machine(m)
        self._set_link(target, up=False)
        init_pid = machine.require_running(target)
        procs.wait_for(
            lambda: None if network.host0_has_carrier(init_pid) else True,
            5.0,
            f"{target.name}'s host0 to lose carrier",
        )
        self.progress(target.name, f"partitioned ({target.veth} down)")

    def heal(self, m: MachineRef) -> None:
        """Undo `partition`; returns once the machine reaches etcd on the bridge again.

        Bringing the host end up is not enough to return: the machine's end gets its carrier
        back asynchronously (the kernel's link watch batches such events for up to a second),
        and connections made before that fail.
        """
        target = self.machine(m)
        self._set_link(target, up=True)
        init_pid = machine.require_running(target)
        procs.wait_for(
            lambda: True if network.host0_has_carrier(init_pid) else None,
            5.0,
            f"{target.name}'s host0 to get carrier back",
        )
        self._wait_etcd_reachable(target)
        self.progress(target.name, f"healed ({target.veth} up)")

    def _set_link(self, target: MachineState, *, up: bool) -> None:
        init_pid = machine.require_running(target)
        with locked(self.layout):
            # Re-resolve: cheap, and exact even if the state file is stale.
            target.veth = network.host_veth(init_pid)
            network.set_link(target.veth, up)
            target.partitioned = not up
            self._save()

    def start_fleetd(self, m: MachineRef) -> FleetdStatus:
        target = self.machine(m)
        if self._require_state().wheel is None:
            raise ClusterError(
                f"cluster {self.name!r} was booted with --no-fleetd: fleet is not installed in "
                f"{target.name} (boot the cluster without --no-fleetd)"
            )
        status = start_fleetd(target, settle=self.fleetd_settle)
        target.fleetd = status.summary
        self._save()
        return status

    def upgrade(
        self, machines: Sequence[MachineRef] = (), *, wheel: str | Path | None = None
    ) -> list[tuple[str, str, str]]:
        """Roll fleet to `wheel` (default: built from this checkout), one machine at a time.

        Each machine gets the wheel in its venv, then `systemctl restart fleet.service` (which
        fleetd tells from a stop: its units keep running, its lease and placements stay) and
        must be back active before the next one is touched; a machine whose fleetd does not
        come back stops the roll there. New machines get the new wheel from then on.
        Returns (machine, version before, version after) per machine.
        """
        state = self._require_state()
        targets = [self.machine(r) for r in machines] or list(state.machines)
        for target in targets:
            machine.require_running(target)
        with locked(self.layout):
            info = self._stage_wheel(wheel)
            assert state.wheel is not None
            done: list[tuple[str, str, str]] = []
            for target in targets:
                init_pid = machine.require_running(target)
                if machine.exec_in(init_pid, ["test", "-d", install.MACHINE_WHEELS]).returncode:
                    raise ClusterError(
                        f"{target.name} booted without fleet's wheel folder "
                        f"({install.MACHINE_WHEELS}: a --no-fleetd cluster, or one made by an "
                        f"older fleet-cluster); `fleet-cluster restart {target.name}` first"
                    )
                before = target.fleet_version or "-"
                started = time.monotonic()
                self._install_fleet(target, state.wheel)
                status = self.restart_fleetd(target)
                if status.ok:
                    status = self._wait_serving(target, info.version)
                took = time.monotonic() - started
                self.progress(
                    target.name, f"fleet {before} -> {info.version}: {status} ({took:.2f} s)"
                )
                if not status.ok:
                    raise ClusterError(
                        f"{target.name}: fleetd {info.version} did not come back after the "
                        f"upgrade, the roll stops here:\n{status.detail}"
                    )
                done.append((target.name, before, info.version))
        return done

    def _wait_serving(self, m: MachineState, version: str, timeout: float = 60.0) -> FleetdStatus:
        """Until the machine's fleetd of `version` answers its API, which it does only once
        registered in etcd: systemd calls it active earlier (READY=1 comes before that)."""
        init_pid = machine.require_running(m)
        argv = ["fleetctl", "--driver=api", "--endpoint=unix:///var/run/fleet.sock"]
        argv += ["version", "-o", "json"]

        def serving() -> bool | None:
            done = machine.exec_in(init_pid, argv, timeout=30)
            try:
                found = json.loads(done.stdout or "{}").get("fleetd") or []
            except ValueError:
                return None
            return True if [v["version"] for v in found] == [version] else None

        try:
            procs.wait_for(
                serving, timeout, f"fleetd {version} on {m.name} to register", interval=0.25
            )
        except ClusterError as exc:
            return FleetdStatus(False, "not registered", str(exc))
        return FleetdStatus(True, f"active/running, registered as {version}")

    def restart_fleetd(self, m: MachineRef) -> FleetdStatus:
        """`systemctl restart fleet.service` (units stay up), or a start if it was not running."""
        target = self.machine(m)
        status = restart_fleetd(target, settle=self.fleetd_settle)
        target.fleetd = status.summary
        self._save()
        return status

    def stop_fleetd(self, m: MachineRef) -> str:
        target = self.machine(m)
        result = stop_fleetd(target)
        target.fleetd = result
        self._save()
        return result

    # -- status --------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """A live look at the cluster (processes, systemd and fleet state, etcd health)."""
        state = self._require_state()
        machines = []
        for m in state.machines:
            alive = m.init_pid is not None and procs.is_alive(m.init_pid)
            entry: dict[str, Any] = {
                "name": m.name,
                "status": m.status if alive or m.status != "running" else "dead",
                "ip": m.ip,
                "machine_id": m.machine_id,
                "nspawn_pid": m.nspawn_pid,
                "init_pid": m.init_pid,
                "veth": m.veth,
                "partitioned": m.partitioned,
                "metadata": m.metadata,
                "boot_seconds": m.boot_seconds,
                "fleet_version": m.fleet_version,
                "systemd": "-",
                "fleet": "-",
            }
            if alive and m.init_pid is not None:
                entry["systemd"] = machine.system_state(m.init_pid)
                try:
                    entry["fleet"] = fleetd_state(m)
                except ClusterError as exc:
                    entry["fleet"] = f"unknown ({exc})"
            machines.append(entry)
        etcd_info: dict[str, Any] = {"endpoint": None, "pid": None, "healthy": False}
        members = [
            {
                "index": m.index,
                "endpoint": f"http://{state.bridge_ip}:{m.client_port}",
                "pid": m.pid,
                "healthy": etcd.running(m, self.layout) and etcd.healthy(etcd.local_url(m)),
            }
            for m in state.etcd_members
        ]
        if members:
            etcd_info = {**members[0], "members": members}
        return {
            "name": state.name,
            "state_dir": state.state_dir,
            "bridge": state.bridge,
            "bridge_ip": f"{state.bridge_ip}/{state.prefixlen}",
            "etcd": etcd_info,
            "etcd_key_prefix": state.etcd_key_prefix,
            "agent_ttl": state.agent_ttl,
            "machines": machines,
        }

    # -- down ----------------------------------------------------------------------------

    def down(self) -> None:
        """Tear everything down; safe to repeat, and to run on a half-built cluster."""
        with signals.deferred():
            self._down()

    def _down(self) -> None:
        self._cancel.set()  # a boot still waiting in another thread gives up
        with locked(self.layout):
            self._teardown()

    def _teardown(self) -> None:
        state = self.state or load(self.layout)
        bridge = state.bridge if state else self.bridge
        problems = teardown(
            self.name, self.layout, state, bridge, grace=self.stop_grace, report=self.progress
        )
        self.state = None
        if problems:
            raise TeardownIncomplete(
                f"cluster {self.name!r} teardown left things behind:\n  " + "\n  ".join(problems)
            )
        self.progress("cluster", f"{self.name!r} is down")

    # -- context manager -----------------------------------------------------------------

    def __enter__(self) -> Cluster:
        self.up()  # tears down by itself when it fails
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.down()


def parse_machine_metadata(specs: Sequence[str]) -> dict[str, dict[str, str]]:
    """CLI `--metadata` values: `m1:k=v,k2=v2` for one machine, `k=v` for all of them."""
    result: dict[str, dict[str, str]] = {}
    for spec in specs:
        head, sep, rest = spec.partition(":")
        if sep and "=" not in head:
            target, pairs = head.strip(), rest
        else:
            target, pairs = "*", spec
        result.setdefault(target, {}).update(parse_metadata(pairs))
    return result


__all__ = ["Cluster", "FleetdStatus", "MachineState", "parse_machine_metadata"]
