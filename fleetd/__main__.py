"""Entry point: `python -m fleetd` and the `fleetd` console script (`fleetd.__main__:main`)."""

from __future__ import annotations

from typing import NoReturn

from fleetd import cli


def main() -> NoReturn:
    # SystemExit rather than a return value: `python -m` ignores what main() returns.
    raise SystemExit(cli.main())


if __name__ == "__main__":
    main()
