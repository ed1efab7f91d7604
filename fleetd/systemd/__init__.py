"""The machine's systemd, as the agent sees it.

- `manager`: the `UnitManager` protocol, its value types and the unit-name check.
- `dbus`: `DBusUnitManager`, real systemd over D-Bus (dbus-fast): unit files written under the
  units directory, daemon-reload, start/stop jobs, unit properties.
- `fake`: `FakeUnitManager`, in memory, for unit tests and the simulator.
"""
