"""Unit files as fleet sees them. Pure code, no I/O.

Everything here must agree with CoreOS fleet byte for byte where users or scripts can see it,
because the unit HASH (sha1 of the serialized options) is the identity of a unit body: it is
shown in `list-unit-files`, compared by `--replace`, and used as the content-addressed etcd key
of the body. A one-byte difference in parsing or serialization would make every existing unit
look changed. Where these modules go beyond fleet, they say so in a comment (hardening of
names, a body size limit, the strict round-trip check in `validate_options`, the
`PartitionPolicy` option).

- `file`: `UnitFile` and `UnitOption`, serialization and HASH, the parser (go-systemd's
  `unit.Deserialize`, quirks included), `parse_multivalue`.
- `names`: unit names (types, characters, the 255-byte limit), templates and instances,
  fleetctl's argument mangling.
- `xfleet`: the [X-Fleet] section: requirements, and the input checks before a unit is stored.
- `glob`: Go's path.Match, as fleet matches Conflicts, Replaces and MachineOf globs.
- `gotext`: Go's whitespace and %q quoting, for byte-exact trimming and fleet's messages.
"""
