"""Python's cyclic garbage collector, tuned for a process that holds a large, long-lived view.

An engine holds every unit, placement and state of the cluster; an agent its schedule and
systemd's view; the simulator 1,000 of each. With CPython's default thresholds (700, 10, 10)
the collector runs every 700 container allocations, and about every hundredth collection
scans the oldest generation, that is every object of those views: at 1,000 simulated machines
20 such scans took 0.28 s each (5.7 s of CPU, in pauses of the event loop), set off by the
allocations of planning and decoding, not by garbage. fleet's objects are nearly all acyclic
and freed by reference counting; the collector is only there for the rare cycle.

`tune()` makes the young generation 50,000 objects and freezes what exists at startup (the
imported modules, classes and functions, which live as long as the process), so collections
are rarer, and scans of the oldest generation skip what can never be garbage. In one
`python -m benchmarks place failover` run the collector took 7.3 s by default and 1.1 s
with a 50,000-object young generation (CHANGELOG.md, 0.1.0, "Performance work").
"""

from __future__ import annotations

import gc

YOUNG_GENERATION = 50_000  # CPython's default is 700
OLDER_GENERATIONS = (20, 10)  # young collections per middle one; middle per oldest


def tune() -> None:
    """Set the thresholds and freeze everything allocated so far; call once, at startup.

    No collection first: what exists after the imports is nearly all live, and a collection
    then costs about 11 ms, which every fleetctl run would pay.
    """
    gc.freeze()
    gc.set_threshold(YOUNG_GENERATION, *OLDER_GENERATIONS)
