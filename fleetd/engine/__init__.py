"""The engine: where units run. One fleetd at a time leads it (a lease-bound leader key).

- `engine`: leader election, the watch-driven loop, the grace after etcd-side faults, and the
  fenced writes of each plan (every write is conditional on the leader key's revision).
- `plan`: the pure planner, (desired units, machines, what etcd says now) -> the smallest set
  of schedule, placement and global writes that makes etcd say what the scheduler decided.
- `scheduler`: the pure placement function (fleet's rules, made deterministic), with a reason
  for every unit it cannot place.

The planners do no I/O and read no clock (tests/unit/test_layout.py holds them to it).
"""
