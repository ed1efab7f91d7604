"""A machine's root file system: the host's own `/` under a writable overlay kept in a tmpfs.

systemd-nspawn refuses `-D /`, and `--volatile=state` on `/` fails on the pre-populated /dev; an
overlay with `lowerdir=/` and its upper and work directories in a per-machine tmpfs works. All
writes (the machine's identity, its config, whatever it does while running) land in the tmpfs,
and deleting a host file in it only writes a whiteout there: the host is never touched.

The tmpfs outlives the container (it is ours, not nspawn's), so a killed machine boots again
with the same machine-id and state; it goes away with `down`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from . import mounts
from .state import Layout

# Directories that must start empty in the machine rather than show the host's: nspawn sets up
# /dev itself and refuses a populated one, /run and /tmp hold the host's runtime state (here
# /run is even on the root file system, so it holds this very state directory), and the host's
# enabled timers would run apt and man-db in every machine. /opt/fleet is where a machine
# installs fleet from its wheel: the host's own install there (its venv) must never show.
OPAQUE_DIRS = ("dev", "run", "tmp", "etc/systemd/system/timers.target.wants", "opt/fleet")
MOUNT_SOURCE = "fleet-cluster"


def _copy_attributes(host_dir: Path, upper_dir: Path) -> None:
    # The upper directory's owner and mode become the merged directory's: mirror the host's.
    try:
        info = host_dir.stat()
    except FileNotFoundError:
        return
    os.chown(upper_dir, info.st_uid, info.st_gid)
    os.chmod(upper_dir, info.st_mode & 0o7777)


def _make_opaque(upper: Path, relative: str) -> None:
    """Create `relative` in the upper layer as an opaque (empty-looking) directory.

    Marking it opaque before the overlay is mounted costs nothing, whereas emptying it through
    the overlay would walk the host's directory and write a whiteout per entry.
    """
    current = upper
    host = Path("/")
    for part in Path(relative).parts:
        current = current / part
        host = host / part
        if not current.exists():
            current.mkdir()
            _copy_attributes(host, current)
    os.setxattr(current, "trusted.overlay.opaque", b"y")


def mount_root(layout: Layout, machine: str) -> Path:
    """Mount the tmpfs and the overlay of a machine; return the overlay (its root)."""
    fs = layout.machine_fs(machine)
    root = layout.machine_root(machine)
    fs.mkdir(parents=True, exist_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    if not mounts.is_mounted(fs):
        mounts.mount("tmpfs", MOUNT_SOURCE, fs, "mode=0755")
    upper = fs / "upper"
    work = fs / "work"
    if not upper.exists():
        upper.mkdir()
        work.mkdir()
        _copy_attributes(Path("/"), upper)
        for relative in OPAQUE_DIRS:
            _make_opaque(upper, relative)
    if not mounts.is_mounted(root):
        options = f"lowerdir=/,upperdir={upper},workdir={work}"
        mounts.mount("overlay", MOUNT_SOURCE, root, options)
    return root


def unmount_root(layout: Layout, machine: str) -> None:
    """Unmount the overlay, then the tmpfs under it (which frees the machine's writes)."""
    for path in (layout.machine_root(machine), layout.machine_fs(machine)):
        mounts.unmount(path)


def write(root: Path, relative: str, content: str | bytes, mode: int = 0o644) -> Path:
    """Write a file into the machine's root (through the overlay, so it is copied up)."""
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)  # never write through a host symlink
    data = content.encode() if isinstance(content, str) else content
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


def symlink(root: Path, relative: str, target: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() or path.exists():
        path.unlink()
    path.symlink_to(target)


def remove(root: Path, relative: str) -> None:
    """Delete a file in the machine (a whiteout in the upper layer; the host keeps its copy)."""
    path = root / relative
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
