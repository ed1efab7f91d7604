"""Logging for fleetd: structlog, one format for our events and for every stdlib logger.

Output goes to stderr (journald adds its own metadata). On a TTY it is structlog's console
renderer; otherwise (the daemon under systemd) one JSON object per line::

    {"event": "unit_start_fenced", "unit": "hello.service", "level": "info",
     "logger": "fleetd.agent", "timestamp": "2024-05-01T12:00:00.000000Z"}

Event-name convention, so logs can be grepped and alerted on across releases:

- the event is a stable ``snake_case`` name, ``<subject>_<past-tense verb or state>``:
  ``engine_leadership_acquired``, ``state_publish_failed``, ``schema_too_new``; never an
  interpolated sentence (docs/troubleshooting.md lists the ones operators meet);
- variable parts go in key/value fields (``unit=``, ``machine=``, ``error=``), never in the
  event; the same field name always means the same thing (``machine`` is a machine ID);
- renaming an event is a breaking change: add the new name and keep the old one for a release.

Levels: ``verbosity > 0`` enables debug (fleet's rule). The chatty third-party loggers
(hpack logs every header it decodes at debug, aiohttp.access every request) stay at warning
unless ``verbosity >= 2``.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog
from structlog.typing import Processor

# Marks the handler we install, so reconfiguring (SIGHUP) replaces it instead of adding another.
_HANDLER_NAME = "fleetd"
_CHATTY_LOGGERS = ("hpack", "aiohttp.access", "asyncio")


def _shared_processors() -> list[Processor]:
    """Run for our events and for stdlib records alike, so both carry the same keys."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


def _renderer(json: bool, stream: TextIO) -> list[Processor]:
    if json:
        # Tracebacks become one "exception" string field, keeping one event per line.
        return [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    return [structlog.dev.ConsoleRenderer(colors=_is_tty(stream))]


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or fake stream
        return False


def configure_logging(
    verbosity: int, json: bool | None = None, stream: TextIO | None = None
) -> None:
    """Route structlog and stdlib logging to `stream` (stderr) in one format.

    json=None picks JSON unless the stream is a TTY. stream=None means sys.stderr as it is at
    call time (so pytest's capture sees it). Safe to call again (e.g. on SIGHUP).
    """
    stream = sys.stderr if stream is None else stream
    use_json = not _is_tty(stream) if json is None else json
    shared = _shared_processors()
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: structlog.testing.capture_logs() and reconfiguration must reach loggers
        # that were already used; the lookup costs little next to rendering.
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *_renderer(use_json, stream),
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter)
    _install(handler, verbosity)


def _install(handler: logging.Handler, verbosity: int) -> None:
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbosity > 0 else logging.INFO)
    chatty_level = logging.DEBUG if verbosity >= 2 else logging.WARNING
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(chatty_level)


def get_logger(name: str, **initial_values: Any) -> structlog.stdlib.BoundLogger:
    """A logger named `name` (use the module's __name__), optionally with bound fields."""
    return structlog.stdlib.get_logger(name, **initial_values)
