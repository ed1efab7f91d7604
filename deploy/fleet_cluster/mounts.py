"""Reading the host's mount table, mounting and unmounting."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from . import procs
from .errors import ClusterError


@dataclass(frozen=True)
class Mount:
    target: Path
    fstype: str
    source: str
    super_options: str


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def table() -> list[Mount]:
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fstype, source, super_options = [*right.split(" "), "", "", ""][:3]
        found.append(Mount(Path(_unescape(left.split(" ")[4])), fstype, source, super_options))
    return found


def under(path: Path) -> list[Mount]:
    """Mounts at or below `path`, deepest first (the order to unmount them in)."""
    inside = [m for m in table() if m.target == path or path in m.target.parents]
    return sorted(inside, key=lambda m: len(m.target.parts), reverse=True)


def is_mounted(path: Path) -> bool:
    return any(m.target == path for m in table())


def mount(fstype: str, source: str, target: Path, options: str | None = None) -> None:
    argv = ["mount", "-t", fstype]
    if options:
        argv += ["-o", options]
    procs.run([*argv, source, str(target)])


def unmount(target: Path, timeout: float = 5.0) -> None:
    """Unmount, retrying while busy; as a last resort detach lazily and say so."""
    deadline = time.monotonic() + timeout
    while is_mounted(target):
        done = procs.run(["umount", str(target)], check=False)
        if done.returncode == 0:
            continue
        if time.monotonic() >= deadline:
            procs.run(["umount", "--lazy", str(target)], check=False)
            if is_mounted(target):
                raise ClusterError(f"cannot unmount {target}: {done.stderr.strip()}")
            raise ClusterError(f"{target} was busy; detached it lazily: {done.stderr.strip()}")
        time.sleep(0.1)
