"""The agent: runs on every machine what the engine scheduled to it, through systemd.

- `agent`: the loop. Follows this machine's schedule and the global units, reconciles after
  each change (and when a failed task's retry time comes), and composes the parts below.
- `plan`: the pure planner, (desired units, what this agent did) -> the ordered tasks, fleet's
  per-unit task table, and the pure rules of retries and fencing.
- `tasks`: the task executor. Runs the planned tasks (write the unit file, daemon-reload,
  start, stop, unload) through the unit manager, one failing unit alone, with retries.
- `record`: what the agent did (a file under /run), so a restart changes nothing.
- `publisher`: follows systemd's state of the units and publishes it on the machine's lease.
- `fence`: stops PartitionPolicy=stop units when the lease goes unrenewed, and holds them.
- `lease`: what the agent needs of its machine's lease (presence).

The planner does no I/O (tests/unit/test_layout.py holds it to it).
"""
