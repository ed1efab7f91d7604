"""The one cache of parsed unit bodies (and their [X-Fleet] requirements) in a process.

Bodies are content-addressed (`bodies/<sha1>`), so an entry never goes stale: the only question
is when to let one go. The engine, the agent and the API's live listings of one fleetd share
this cache through their `Registry`, so a body parsed for one is never parsed again for another.

Eviction, two rules:

- A body the engine's collector deleted from etcd (gc.py) is dropped at once, with the
  requirements parsed from it: no unit names it any more.
- Beyond `max_bodies` entries the least recently used goes. The bound is far above a cluster's
  distinct bodies (10,000 units with bodies of their own is 10,000 entries, about 30 MB), so
  in a steady cluster nothing is evicted; it only keeps a long-lived fleetd that sees units
  replaced for months from growing without end. An evicted body is read again on its next use
  (one get), which costs time, never correctness.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from fleetd.model import Requirements
from fleetd.unit.file import UnitFile

# See the module docstring; the benchmarks' largest cluster has 10,000 distinct bodies.
MAX_BODIES = 50_000


class BodyCache:
    """Parsed bodies by hash, least recently used first; requirements by (hash, unit name)."""

    def __init__(self, max_bodies: int = MAX_BODIES) -> None:
        self.max_bodies = max_bodies
        self._bodies: OrderedDict[str, UnitFile] = OrderedDict()
        # By hash first, so a body's requirements go with it. Per unit name within: a template's
        # instances share one body but their specifiers (%i) make their requirements differ.
        self._requirements: dict[str, dict[str, Requirements]] = {}
        self.evicted = 0  # bodies dropped for the bound (tests, metrics)

    def __len__(self) -> int:
        return len(self._bodies)

    def __contains__(self, hash_: str) -> bool:
        return hash_ in self._bodies

    def get(self, hash_: str) -> UnitFile | None:
        body = self._bodies.get(hash_)
        if body is not None:
            self._bodies.move_to_end(hash_)
        return body

    def put(self, hash_: str, body: UnitFile) -> None:
        self._bodies[hash_] = body
        self._bodies.move_to_end(hash_)
        while len(self._bodies) > self.max_bodies:
            oldest, _ = self._bodies.popitem(last=False)
            self._requirements.pop(oldest, None)
            self.evicted += 1

    def discard(self, hashes: Iterable[str]) -> None:
        """Drop the bodies of `hashes` and the requirements parsed from them."""
        for hash_ in hashes:
            self._bodies.pop(hash_, None)
            self._requirements.pop(hash_, None)

    def retain(self, used: set[str]) -> None:
        """Drop every body not in `used` (an owner that knows every unit: no unit names the
        others)."""
        self.discard([h for h in self._bodies if h not in used])

    def requirements(self, name: str, hash_: str) -> Requirements | None:
        by_name = self._requirements.get(hash_)
        found = None if by_name is None else by_name.get(name)
        if found is not None:
            self._bodies.move_to_end(hash_)  # a use of the body: the engine's usual one
        return found

    def put_requirements(self, name: str, hash_: str, reqs: Requirements) -> None:
        # Only beside a cached body, so that evicting the body takes these along.
        if hash_ in self._bodies:
            self._requirements.setdefault(hash_, {})[name] = reqs
