"""Progress lines while a scenario runs, and the figures it reports."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextlib.asynccontextmanager
async def progress(
    label: str, status: Callable[[], str], interval: float = 1.0
) -> AsyncIterator[None]:
    """Print `[label  12.0s] <status()>` every `interval` seconds while the block runs."""
    started = time.monotonic()

    async def loop() -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                line = status()
            except Exception as e:  # a status that cannot be read must not end the run
                line = f"(status unavailable: {e})"
            say(f"  [{label} {time.monotonic() - started:6.1f}s] {line}")

    task = asyncio.ensure_future(loop())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@dataclass
class Figure:
    """One reported figure: a name, a value with its unit, and optionally a target verdict."""

    name: str
    value: float | int | str | None
    unit: str = ""
    target: str = ""  # e.g. ">= 500 units/s"
    met: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "unit": self.unit,
            "target": self.target or None,
            "met": self.met,
        }


@dataclass
class ScenarioResult:
    scenario: str
    figures: list[Figure] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None
    error: str | None = None

    def add(
        self,
        name: str,
        value: float | int | str | None,
        unit: str = "",
        target: str = "",
        met: bool | None = None,
    ) -> Figure:
        fig = Figure(name, value, unit, target, met)
        self.figures.append(fig)
        return fig

    def as_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "skipped": self.skipped,
            "error": self.error,
            "figures": [f.as_dict() for f in self.figures],
            "details": self.details,
        }


def _fmt(value: float | int | str | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return value


def table(results: list[ScenarioResult]) -> str:
    rows: list[tuple[str, str, str, str, str]] = []
    for r in results:
        if r.skipped:
            rows.append((r.scenario, "skipped", "", "", r.skipped))
            continue
        if r.error:
            rows.append((r.scenario, "FAILED", "", "", r.error.splitlines()[0][:100]))
        for f in r.figures:
            verdict = "" if f.met is None else ("met" if f.met else "NOT MET")
            rows.append(
                (r.scenario, f.name, f"{_fmt(f.value)} {f.unit}".strip(), f.target, verdict)
            )
    headers = ("scenario", "figure", "value", "target", "verdict")
    widths = [
        max(len(h), *(len(row[i]) for row in rows)) if rows else len(h)
        for i, h in enumerate(headers)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)
