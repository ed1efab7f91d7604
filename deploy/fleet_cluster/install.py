"""fleet in a machine the way an operator installs it: the wheel, in the machine's own venv.

A cluster is given a wheel (`fleet-cluster up --wheel`, `$FLEET_CLUSTER_WHEEL`, or one built
from this checkout) and never runs the host's tree: every machine creates `/opt/fleet/venv`
with Debian's python3, pip-installs the wheel into it, links `/usr/local/bin/fleetd` and
`fleetctl` to it and installs `fleet.service` and `fleet.socket` from the installed package,
the same steps deploy/cloud-config.yaml runs on a cloud machine.

Machines have no network beyond the bridge, so the wheel's dependencies are downloaded once on
the host (`pip download`, wheels only, for the machines' Python) into a cache keyed by the
dependency list, and each cluster gets a folder holding its wheel(s) and those dependencies,
bound read-only into every machine at `/opt/fleet/wheels`; pip inside runs with `--no-index`.
An upgrade adds the newer wheel (and its dependencies) to that folder and installs it in one
machine at a time.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from email.parser import Parser
from pathlib import Path

from .errors import ClusterError
from .machine import exec_in

MACHINE_PYTHON = "/usr/bin/python3"
MACHINE_VENV = "/opt/fleet/venv"
MACHINE_WHEELS = "/opt/fleet/wheels"
CACHE_ROOT = Path(os.environ.get("FLEET_CLUSTER_CACHE", "/var/cache/fleet-cluster"))
DIST_NAME = "fleet_py"
# The checkout this tool runs from, when it does (a wheel is built from it if none is given).
CHECKOUT = Path(__file__).resolve().parents[2]
PIP_TIMEOUT = 300.0


@dataclass(frozen=True)
class WheelInfo:
    path: Path
    name: str
    version: str
    requires: tuple[str, ...]


def wheel_info(path: Path) -> WheelInfo:
    """Name, version and runtime requirements (extras left out) of a wheel file."""
    if path.suffix != ".whl" or not path.is_file():
        raise ClusterError(f"{path} is not a wheel file (want a .whl, e.g. from `pip wheel .`)")
    try:
        with zipfile.ZipFile(path) as archive:
            metadata_name = next(
                n for n in archive.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)
            )
            text = archive.read(metadata_name).decode()
    except (zipfile.BadZipFile, StopIteration, OSError) as exc:
        raise ClusterError(f"{path}: not a readable wheel ({exc or 'no METADATA'})") from None
    message = Parser().parsestr(text)
    requires = tuple(
        sorted(r for r in message.get_all("Requires-Dist") or [] if "extra ==" not in r)
    )
    return WheelInfo(path, message["Name"] or "", message["Version"] or "", requires)


def build_wheel(source: Path, out_dir: Path) -> Path:
    """Build the project at `source` (a checkout) into a wheel in `out_dir`; return its path.

    Built from a copy of the tracked tree when `source` is a git checkout, so concurrent builds
    (two test sessions) never share setuptools' build/ folder and untracked files stay out.
    """
    if not (source / "pyproject.toml").is_file():
        raise ClusterError(
            f"no wheel given and {source} is not a checkout to build one from: "
            "pass --wheel PATH (or set FLEET_CLUSTER_WHEEL)"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fleet-wheel-") as tmp:
        tree = Path(tmp) / "src"
        if (source / ".git").exists():
            export_worktree(source, tree)
        else:
            shutil.copytree(source, tree, ignore=shutil.ignore_patterns("build", "*.egg-info"))
        before = set(out_dir.glob("*.whl"))
        done = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out_dir), "."],
            cwd=tree,
            capture_output=True,
            text=True,
            timeout=PIP_TIMEOUT,
            check=False,
        )
        if done.returncode != 0:
            raise ClusterError(f"building the wheel from {source} failed:\n{done.stderr[-2000:]}")
    made = sorted(set(out_dir.glob(f"{DIST_NAME}-*.whl")) - before) or sorted(
        out_dir.glob(f"{DIST_NAME}-*.whl"), key=lambda p: p.stat().st_mtime
    )
    if not made:
        raise ClusterError(f"pip wheel wrote no {DIST_NAME} wheel into {out_dir}")
    return made[-1]


def export_worktree(source: Path, tree: Path) -> None:
    """The checkout's working tree as it is (tracked and new files, not ignored ones)."""
    listed = subprocess.run(
        ["git", "-C", str(source), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    for relative in filter(None, listed.decode().split("\0")):
        origin = source / relative
        if not origin.exists() and not origin.is_symlink():
            continue  # deleted in the work tree
        target = tree / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if origin.is_symlink():
            target.symlink_to(os.readlink(origin))
        else:
            shutil.copy2(origin, target)


def machine_python_version() -> str:
    """`3.11`: the Python the machines' venvs use (the host's Debian python3)."""
    done = subprocess.run(
        [MACHINE_PYTHON, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if done.returncode != 0:
        raise ClusterError(f"{MACHINE_PYTHON} does not run: {done.stderr.strip()}")
    return done.stdout.strip()


def dependencies(info: WheelInfo, cache_root: Path = CACHE_ROOT) -> Path:
    """A folder of wheels for everything `info` requires, downloaded once per requirement set."""
    python = machine_python_version()
    key = hashlib.sha256("\n".join((python, *info.requires)).encode()).hexdigest()[:16]
    folder = cache_root / "wheelhouse" / key
    if (folder / ".complete").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=folder.parent))
    try:
        if info.requires:
            argv = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check"]
            argv += ["--only-binary=:all:", f"--python-version={python}", "-d", str(staging)]
            done = subprocess.run(
                [*argv, *info.requires],
                capture_output=True,
                text=True,
                timeout=PIP_TIMEOUT,
                check=False,
            )
            if done.returncode != 0:
                raise ClusterError(
                    f"downloading fleet's dependencies failed:\n{done.stderr[-2000:]}"
                )
        (staging / ".complete").write_text("\n".join(info.requires) + "\n")
        try:
            staging.rename(folder)
        except OSError:  # another session finished the same download first
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def stage(info: WheelInfo, wheels_dir: Path, cache_root: Path = CACHE_ROOT) -> str:
    """Put the wheel and its dependencies in a cluster's wheel folder; the wheel's file name."""
    deps = dependencies(info, cache_root)
    wheels_dir.mkdir(parents=True, exist_ok=True)
    for source in [*deps.glob("*.whl"), info.path]:
        target = wheels_dir / source.name
        if target.exists() and (source != info.path or os.path.samefile(source, target)):
            continue  # a rebuilt wheel of the same name replaces the staged one, below
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(source, tmp)
        except OSError:  # another file system
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    return info.path.name


def install_script(wheel_name: str) -> str:
    """What runs inside a machine to install (or upgrade to) the wheel `wheel_name`.

    `--force-reinstall --no-deps` first: a rebuilt wheel of the same version replaces the old
    one; the second pass brings the dependencies it needs (from the bound folder only).
    """
    venv, wheels = MACHINE_VENV, MACHINE_WHEELS
    pip = f"{venv}/bin/pip install -q --disable-pip-version-check --no-index --find-links {wheels}"
    return "\n".join(
        [
            "set -eu",
            f"[ -x {venv}/bin/python ] || {MACHINE_PYTHON} -m venv {venv}",
            f"{pip} --force-reinstall --no-deps {wheels}/{wheel_name}",
            f"{pip} {wheels}/{wheel_name}",
            f"ln -sf {venv}/bin/fleetd {venv}/bin/fleetctl /usr/local/bin/",
            f'units="$({venv}/bin/python -c "import fleetd.deploy as d; print(d.files())")"',
            'install -m 0644 "$units/fleet.service" "$units/fleet.socket" /etc/systemd/system/',
            f"{venv}/bin/fleetd --version",
        ]
    )


def install_in(init_pid: int, wheel_name: str) -> str:
    """Install the wheel in the machine whose init is `init_pid`; return fleetd's version."""
    done = exec_in(init_pid, ["sh", "-c", install_script(wheel_name)], timeout=PIP_TIMEOUT)
    if done.returncode != 0:
        raise ClusterError(
            f"installing {wheel_name} failed ({done.returncode}):\n{done.stderr.strip()[-2000:]}"
        )
    return version_of(done.stdout)


def version_of(output: str) -> str:
    """X of `fleetd version X` (`fleetd --version`), on the last line of `output`; "" if none."""
    lines = output.strip().splitlines()
    return lines[-1].rsplit(" ", 1)[-1] if lines else ""


def resolve_wheel(wheel: str | Path | None, out_dir: Path) -> WheelInfo:
    """The wheel to install: `wheel`, else $FLEET_CLUSTER_WHEEL, else one built from here."""
    chosen = wheel or os.environ.get("FLEET_CLUSTER_WHEEL") or None
    path = Path(chosen).resolve() if chosen else build_wheel(CHECKOUT, out_dir)
    info = wheel_info(path)
    if info.name.replace("-", "_").lower() != DIST_NAME:
        raise ClusterError(f"{path} is a wheel of {info.name!r}, not of fleet-py")
    return info
