"""The agent: runs on every machine what the engine scheduled to it, through systemd.

- `agent`: follows this machine's schedule and the global units, runs each task (write the
  unit file, daemon-reload, start, stop, unload) through the unit manager, records what it did
  (a file under /run), publishes unit states, and fences PartitionPolicy=stop units.
- `plan`: the pure planner, (desired units, what this agent did) -> the ordered tasks, fleet's
  per-unit task table.

The planner does no I/O (tests/unit/test_layout.py holds it to it).
"""
