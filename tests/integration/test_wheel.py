"""The package as users install it: `python -m build`, then the wheel in a fresh venv.

The venv is made with Debian's python3 in a temporary directory, outside the checkout, with
`PYTHONPATH` empty and the working directory elsewhere, so nothing can be imported from the
checkout: the wheel goes in with `pip install --no-deps`, then exactly the dependencies its
metadata declares (from a folder of wheels downloaded once, no index), and fleetd, fleetctl
and fleet-cluster must run from it, fleetctl against a real etcd.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from fleet_cluster import install

from fleetd import __version__
from tests.integration.etcd_fixture import EtcdServer

pytestmark = pytest.mark.integration

DEBIAN_PYTHON = Path(install.MACHINE_PYTHON)
HELLO = """[Unit]
Description=Hello World

[Service]
ExecStart=/bin/bash -c "while true; do echo hello; sleep 1; done"
"""


@dataclass(frozen=True)
class Built:
    wheel: Path
    sdist: Path
    venv: Path
    home: Path  # a directory with nothing of the checkout in it: the commands' cwd


def _clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "FLEETCTL_"))}
    env.update(PYTHONPATH="", HOME=str(home), PYTHONNOUSERSITE="1")
    env.pop("VIRTUAL_ENV", None)
    return env


def _run(argv: list[str], home: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        argv,
        cwd=home,
        env=_clean_env(home),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"{argv} exited {done.returncode}:\n{done.stdout}{done.stderr}"
    return done


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    if not DEBIAN_PYTHON.exists():
        pytest.skip(f"{DEBIAN_PYTHON} is missing (Debian's python3 with python3-venv)")
    try:
        import build  # noqa: F401
    except ImportError:
        pytest.skip("the build package (a dev dependency) is not installed")
    root = tmp_path_factory.mktemp("wheel")
    tree, dist, home = root / "src", root / "dist", root / "home"
    home.mkdir()
    install.export_worktree(install.CHECKOUT, tree)
    # Plain `python -m build`: the sdist first, then the wheel built from the sdist, so a file
    # the sdist leaves out is missing from the wheel too.
    _run([sys.executable, "-m", "build", "--outdir", str(dist), str(tree)], home, timeout=600)
    (wheel,) = dist.glob("*.whl")
    (sdist,) = dist.glob("*.tar.gz")
    venv = root / "venv"
    _run([str(DEBIAN_PYTHON), "-m", "venv", str(venv)], home)
    pip = [str(venv / "bin/pip"), "install", "-q", "--disable-pip-version-check"]
    _run([*pip, "--no-deps", str(wheel)], home)
    info = install.wheel_info(wheel)
    cache = install.CACHE_ROOT if os.access(install.CACHE_ROOT.parent, os.W_OK) else root
    deps = install.dependencies(info, cache)
    _run([*pip, "--no-index", "--find-links", str(deps), *info.requires], home)
    return Built(wheel, sdist, venv, home)


def test_wheel_carries_every_package_the_units_and_the_etcd_messages(built: Built) -> None:
    names = set(zipfile.ZipFile(built.wheel).namelist())
    for package in ("fleetd", "fleetctl", "fleet_cluster"):
        assert f"{package}/__init__.py" in names
        assert f"{package}/py.typed" in names
    for generated in ("rpc_pb2.py", "kv_pb2.py", "auth_pb2.py"):
        assert f"fleetd/etcd/etcdpb/{generated}" in names
    for unit in ("fleet.service", "fleet.socket"):
        assert f"fleetd/deploy/{unit}" in names
    # The OpenAPI document fleetd serves at /fleet/v1/openapi.json (package data).
    assert "fleetd/api/openapi.json" in names
    # Every subpackage of the source tree made it (the bug this guards against).
    for base, package in ((".", "fleetd"), (".", "fleetctl"), ("deploy", "fleet_cluster")):
        top = install.CHECKOUT / base
        for init in (top / package).glob("**/__init__.py"):
            relative = init.relative_to(top).as_posix()
            assert relative in names, f"{relative} is not in the wheel"
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/"))]


def test_sdist_builds_and_names_the_version(built: Built) -> None:
    with tarfile.open(built.sdist) as archive:
        members = archive.getnames()
    top = f"fleet_py-{__version__}"
    assert f"{top}/pyproject.toml" in members
    assert f"{top}/fleetd/etcd/etcdpb/rpc_pb2.py" in members
    assert built.wheel.name.startswith(f"fleet_py-{__version__}-")


def test_installed_commands_run_from_the_venv_not_the_checkout(built: Built) -> None:
    bin_dir = built.venv / "bin"
    assert _run([str(bin_dir / "fleetd"), "--version"], built.home).stdout.split()[-1] == (
        __version__
    )
    assert _run([str(bin_dir / "fleetctl"), "--version"], built.home).stdout.strip() == (
        f"fleetctl version {__version__}"
    )
    _run([str(bin_dir / "fleet-cluster"), "--help"], built.home)
    where = "import fleetd, fleetctl, fleet_cluster as c; print(fleetd.__file__, c.__file__)"
    paths = _run([str(bin_dir / "python"), "-c", where], built.home).stdout.split()
    for path in paths:
        assert path.startswith(str(built.venv / "lib")), path
    # Every declared dependency is there and consistent.
    _run([str(bin_dir / "pip"), "check"], built.home)


def test_installed_fleetctl_submits_and_lists_against_real_etcd(
    built: Built, etcd_server: EtcdServer
) -> None:
    (built.home / "hello.service").write_text(HELLO)
    fleetctl = [
        str(built.venv / "bin/fleetctl"),
        "--driver=etcd",
        f"--endpoint={etcd_server.client_url}",
    ]
    done = _run([*fleetctl, "submit", "hello.service"], built.home)
    assert "Unit hello.service inactive" in done.stdout
    listed = _run([*fleetctl, "list-unit-files", "--no-legend"], built.home).stdout
    assert listed.split()[0] == "hello.service", listed
    assert listed.split()[2:4] == ["inactive", "inactive"], listed
    cat = _run([*fleetctl, "cat", "hello.service"], built.home).stdout
    assert cat.strip() == HELLO.strip()
