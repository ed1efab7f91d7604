"""`python -m fleet_cluster` and the `fleet-cluster` console script."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    main()
