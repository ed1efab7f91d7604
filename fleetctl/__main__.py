"""Entry point: `fleetctl` (console script) and `python -m fleetctl`."""

from __future__ import annotations

import logging

from fleetctl.cli import cli
from fleetd import collector
from fleetd.log import configure_logging


def main() -> None:
    # Logs go to stderr, never stdout (it carries the tables scripts parse), and only
    # warnings unless --debug: fleetctl's own messages are plain lines, not log records.
    configure_logging(0, json=False)
    # A listing of 10,000 units allocates a few hundred thousand objects that all live until
    # it is printed: fleetd's GC settings spare it collections that would find no garbage.
    collector.tune()
    logging.getLogger().setLevel(logging.WARNING)
    # A fixed program name: usage lines and click's completion variable
    # (_FLEETCTL_COMPLETE) are the same however fleetctl was started.
    cli.main(prog_name="fleetctl")


if __name__ == "__main__":
    main()
