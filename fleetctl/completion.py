"""Shell completion of unit and machine arguments.

click provides the completion scripts: `eval "$(_FLEETCTL_COMPLETE=bash_source fleetctl)"`
(or zsh_source, fish_source).

Commands that take local unit files complete file names; commands on existing units complete
the cluster's unit names; `plan --kill` completes machine ids. Completion must never hang or
print errors into the shell, so the cluster is asked with a short deadline and any failure
completes nothing.
"""

from __future__ import annotations

import asyncio
from typing import Any

import click
from click.shell_completion import CompletionItem

from fleetctl import client as client_module
from fleetctl.command import warn
from fleetctl.settings import Settings

DEADLINE = 2.0  # seconds: a slow cluster must not freeze the user's shell


def complete_files(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    return [CompletionItem(incomplete, type="file")]


def _settings(ctx: click.Context) -> Settings:
    """Global flags as typed so far (root callbacks do not run while completing)."""
    params = ctx.find_root().params
    fields = Settings.__dataclass_fields__
    return Settings(**{k: v for k, v in params.items() if k in fields and v is not None})


async def _unit_names(settings: Settings) -> list[str]:
    async with client_module.make_client(settings, warn=warn) as client:
        return [u.name for u in await client.units()]


def complete_units(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    try:
        names = asyncio.run(asyncio.wait_for(_unit_names(_settings(ctx)), DEADLINE))
    except Exception:  # completion must never fail noisily, whatever went wrong
        return []
    return [CompletionItem(n) for n in names if n.startswith(incomplete)]


async def _machine_ids(settings: Settings) -> list[str]:
    async with client_module.make_client(settings, warn=warn) as client:
        return [m.id for m in await client.machines()]


def complete_machines(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    """Machine ids (`plan --kill`); the part after the last comma of a list is completed."""
    head, comma, tail = incomplete.rpartition(",")
    try:
        ids = asyncio.run(asyncio.wait_for(_machine_ids(_settings(ctx)), DEADLINE))
    except Exception:  # completion must never fail noisily, whatever went wrong
        return []
    return [CompletionItem(head + comma + i) for i in ids if i.startswith(tail)]
