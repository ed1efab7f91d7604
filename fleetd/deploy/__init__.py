"""fleetd's deployment files, shipped in the wheel: what a machine needs beside the program.

`fleet.service` and `fleet.socket` (fleetd as a systemd service, the API socket-activated),
`fleet-unprivileged.conf` + `50-fleet.rules` (running fleetd as user `fleet`), and
`fleet.conf.sample` (every option, commented). The repository's `deploy/` links to these files,
so a checkout and an installed wheel carry the same bytes; an installed machine copies them from
here (`text(name)`, or the path `files() / name`), and so does the local cluster tool.
"""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable

UNIT_FILES = ("fleet.service", "fleet.socket")


def files() -> Traversable:
    """The folder of deployment files inside the installed package."""
    return resources.files(__name__)


def text(name: str) -> str:
    """One deployment file's text; FileNotFoundError names it if the package lacks it."""
    return (files() / name).read_text(encoding="utf-8")
