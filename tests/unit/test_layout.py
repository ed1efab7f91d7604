"""The house rules: which room may import which (docs/architecture.md).

Every import of every module is read from its source (also imports inside functions and under
TYPE_CHECKING: a type import is still a dependency of the room). A rule broken names the module
and the import, so a new module lands in a room, or the rule is changed here on purpose.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("fleetd", "fleetctl", "deploy/fleet_cluster")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "deploy":
        parts = parts[1:]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.name.endswith("_pb2.py"):
                continue  # protoc's output
            found[module_name(path)] = path
    return found


MODULES = modules()


def imports(path: Path) -> Iterator[str]:
    """Every module `path` imports (for `from x import y`, both x and x.y, if y is one)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")
                parent = parent[: len(parent) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            yield base
            for alias in node.names:
                if f"{base}.{alias.name}" in MODULES:
                    yield f"{base}.{alias.name}"


def within(name: str, *rooms: str) -> bool:
    return any(name == room or name.startswith(room + ".") for room in rooms)


IMPORTS = {name: sorted(set(imports(path))) for name, path in MODULES.items()}


def imports_of(room: str, others: list[str]) -> list[str]:
    """Each import, by a module of `room`, of a module within `others`: "x imports y"."""
    return [
        f"{name} imports {imported}"
        for name, found in IMPORTS.items()
        if within(name, room)
        for imported in found
        if within(imported, *others)
    ]


# The planners and the vocabulary they use: pure functions of their input.
PURE = [
    "fleetd.engine.plan",
    "fleetd.engine.scheduler",
    "fleetd.engine.whatif",
    "fleetd.agent.plan",
    "fleetd.feasibility",
    "fleetd.omitempty",
    "fleetd.unit",
    "fleetd.model",
    "fleetd.errors",
]
# Modules that do I/O, keep time or schedule work: a planner importing one is not pure.
IO = [
    "asyncio",
    "socket",
    "ssl",
    "subprocess",
    "os",
    "time",
    "threading",
    "pathlib",
    "aiohttp",
    "dbus_fast",
    "structlog",
    "paramiko",
    "fleetd.registry",
    "fleetd.etcd",
    "fleetd.systemd",
    "fleetd.api",
    "fleetd.presence",
    "fleetd.server",
    "fleetd.config",
    "fleetd.machine",
]

# (room, rooms it must not import, why)
FORBIDDEN = [
    ("fleetd.registry", ["fleetd.etcd"], "the schema is written against the KV contract"),
    (
        "fleetd.registry",
        ["fleetd.engine", "fleetd.agent", "fleetd.api", "fleetd.server", "fleetd.presence"],
        "the registry serves every component and knows none of them",
    ),
    ("fleetd.etcd", ["fleetd.engine", "fleetd.agent", "fleetd.api", "fleetd.server"], "a client"),
    ("fleetd.agent", ["fleetd.engine"], "the agent follows etcd, not the engine's code"),
    ("fleetd.engine", ["fleetd.agent"], "the engine writes etcd, not the agent's code"),
    ("fleetd.api", ["fleetd.agent"], "the API reads etcd and probes, not the agent"),
    ("fleetd.systemd", ["fleetd.registry", "fleetd.etcd", "fleetd.engine"], "the machine only"),
    ("fleetd", ["fleetctl", "fleet_cluster"], "the daemon needs no client or cluster tool"),
    ("fleetctl", ["fleetd.agent", "fleetd.server"], "a client of the cluster"),
]

# The engine's pure planners: what the API and fleetctl may use of the engine, to ask it "what
# if?" (plan, why: fleetd/engine/whatif.py) on a snapshot they read. Never its loop
# (fleetd.engine.engine): election, watches and fenced writes are the leader's alone.
PLANNERS = ["fleetd.engine.plan", "fleetd.engine.scheduler", "fleetd.engine.whatif"]
# Rooms that may import those planners and nothing else of the engine.
PLANNER_USERS = ["fleetd.api", "fleetctl", "fleetd.whatif_load"]


@pytest.mark.parametrize("planner", PURE)
def test_planners_import_no_io(planner: str) -> None:
    assert planner in MODULES, f"{planner} moved: update the rule"
    bad = imports_of(planner, IO)
    assert not bad, f"planners do no I/O and read no clock: {bad}"


@pytest.mark.parametrize(("room", "others", "why"), FORBIDDEN, ids=[r for r, _, _ in FORBIDDEN])
def test_rooms_do_not_import_what_they_must_not(room: str, others: list[str], why: str) -> None:
    bad = imports_of(room, others)
    assert not bad, f"{why}: " + "; ".join(bad)


@pytest.mark.parametrize("room", PLANNER_USERS)
def test_clients_of_the_engine_use_only_its_pure_planners(room: str) -> None:
    # `from fleetd.engine import whatif` names the package too: its __init__ imports nothing.
    allowed = {"fleetd.engine", *PLANNERS}
    bad = [i for i in imports_of(room, ["fleetd.engine"]) if i.split(" imports ")[1] not in allowed]
    assert not bad, "only the engine's pure planners, never its loop: " + "; ".join(bad)


def test_the_planners_others_may_use_stay_pure_and_apart_from_the_loop() -> None:
    assert "fleetd.whatif_load" in MODULES, "the what-if loader moved: update the rule"
    assert "fleetd.engine.whatif" in IMPORTS["fleetd.whatif_load"], "update the rule"
    for planner in PLANNERS:
        assert planner in PURE, f"{planner} is used outside the engine: it must be pure"
        engine = [i for i in IMPORTS[planner] if within(i, "fleetd.engine")]
        assert set(engine) <= {"fleetd.engine", *PLANNERS}, f"{planner} imports {engine}"
    assert not [i for i in IMPORTS["fleetd.engine"] if within(i, "fleetd.engine.engine")]


def test_only_fleetctl_ssh_imports_paramiko() -> None:
    # One room holds the SSH library: the fleetctl.ssh package, one module per concern in it.
    users = sorted(n for n, found in IMPORTS.items() if any(within(i, "paramiko") for i in found))
    assert users, "nothing imports paramiko: update the rule"
    bad = [name for name in users if not within(name, "fleetctl.ssh")]
    assert not bad, f"only fleetctl/ssh/ imports paramiko, not {bad}"


def test_only_the_wiring_builds_presence_agent_and_engine_together() -> None:
    # The one composition root of a node (fleetd.node), for fleetd and for the simulator: they
    # build their machines through it and name none of the three themselves, so the
    # simulator runs what fleetd runs.
    components = ("fleetd.presence", "fleetd.agent", "fleetd.engine")
    together = sorted(
        name
        for name, found in IMPORTS.items()
        if all(any(within(i, room) for i in found) for room in components)
    )
    assert together == ["fleetd.node"]
    for wiring in ("fleetd.server", "fleetd.sim"):
        assert "fleetd.node" in IMPORTS[wiring], f"{wiring} no longer builds its node there"
        bad = [i for i in IMPORTS[wiring] if within(i, *components)]
        assert not bad, f"{wiring} imports {bad}: build the node in fleetd.node instead"


def test_the_agent_parts_do_not_import_the_agent_loop() -> None:
    # fleetd.agent.agent composes the record, the executor, the publisher and the fence; they
    # know one another only as it hands them in, never the loop itself.
    parts = [n for n in MODULES if within(n, "fleetd.agent") and n != "fleetd.agent.agent"]
    assert "fleetd.agent.tasks" in parts, "the agent's parts moved: update the rule"
    bad = [f"{n} imports {i}" for n in parts for i in IMPORTS[n] if i == "fleetd.agent.agent"]
    assert not bad, "; ".join(bad)


def test_only_the_cluster_tools_front_doors_import_its_facade() -> None:
    # fleet_cluster.cluster composes the parts (etcd members, provisioning, lifecycle, fleet,
    # partitions, status: issue 17) over their shared context; a part that reached back for
    # the facade would be one job calling into all of them.
    users = sorted(n for n, found in IMPORTS.items() if "fleet_cluster.cluster" in found)
    assert users == ["fleet_cluster", "fleet_cluster.cli"]


def test_every_package_says_what_its_room_is_for() -> None:
    missing = [
        name
        for name, path in MODULES.items()
        if path.name == "__init__.py"
        and not ast.get_docstring(ast.parse(path.read_text()))
        and name != "fleetctl"
    ]
    assert not missing, f"packages without a docstring: {missing}"


# fleetctl's logic modules return what they have to say (or hand it to a callback while they
# wait); the command layer prints it (issue 17).
SILENT = ["fleetctl.unitargs", "fleetctl.waiting"]


@pytest.mark.parametrize("module", SILENT)
def test_fleetctl_logic_modules_do_not_import_click(module: str) -> None:
    assert module in MODULES, f"{module} moved: update the rule"
    bad = [name for name in IMPORTS[module] if within(name, "click")]
    assert not bad, f"{module} imports {bad}: return the lines, the command layer prints them"


def test_only_the_registry_reaches_the_kv_through_a_registry() -> None:
    # The Registry is the one face of the schema: `something.registry.kv` (or `registry.kv`)
    # outside fleetd/registry/ goes round it. The wiring that builds the KV holds its own.
    def reaches(path: Path) -> list[int]:
        lines = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "kv":
                owner = node.value
                name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
                if name == "registry":
                    lines.append(node.lineno)
        return lines

    bad = [
        f"{name}:{line}"
        for name, path in MODULES.items()
        if within(name, "fleetd") and not within(name, "fleetd.registry")
        for line in reaches(path)
    ]
    assert not bad, f"reach the KV round the Registry: {bad}"


def test_nobody_outside_the_registry_builds_keys_or_watches_prefixes() -> None:
    # The key layout is the registry's (keys.py); a component follows records through a
    # Mirror (registry/mirror.py), never by watching prefixes it built itself. The default
    # prefix and its normalization are configuration, so fleetd.config and fleetctl use them.
    allowed_names = {"DEFAULT_PREFIX", "normalize_prefix"}
    bad = []
    for name, path in MODULES.items():
        if within(name, "fleetd.registry"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "fleetd.registry.keys":
                extra = {a.name for a in node.names} - allowed_names
                if extra:
                    bad.append(f"{name}:{node.lineno} imports {sorted(extra)} from keys")
            if isinstance(node, ast.Attribute) and node.attr in ("keys", "watch"):
                owner = node.value
                owner_name = owner.attr if isinstance(owner, ast.Attribute) else ""
                owner_name = owner_name or getattr(owner, "id", "")
                if owner_name == "registry":
                    bad.append(f"{name}:{node.lineno} uses registry.{node.attr}")
    assert not bad, f"the schema is the registry's: {bad}"
