"""The one error type commands raise to stop with a message and an exit code."""

from __future__ import annotations

from typing import IO, Any

import click


class CommandFailed(click.ClickException):
    """A failure already worded for the user (fleet's wording where fleet had one).

    Printed as-is to stderr, without click's "Error: " prefix, because scripts written for
    fleet match these lines; an empty message prints nothing (the command already explained).
    """

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        # click declares exit_code on the class; a per-failure status is what fleet has.
        self.exit_code = exit_code  # type: ignore[misc]

    def show(self, file: IO[Any] | None = None) -> None:
        if self.message:
            click.echo(self.message, err=True)
