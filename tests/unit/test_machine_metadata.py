"""The machine metadata merge (`Machine.with_dynamic_metadata`): the registry's listing, the
API's live view and the agent show a machine with it."""

from __future__ import annotations

from fleetd.model import Machine


def test_dynamic_metadata_wins_and_is_sorted_in() -> None:
    machine = Machine.make("m1", "10.0.0.1", {"region": "eu", "disk": "ssd"}, "1.0", True)
    merged = machine.with_dynamic_metadata({"region": "us", "az": "b"})
    assert merged == Machine.make(
        "m1", "10.0.0.1", {"az": "b", "disk": "ssd", "region": "us"}, "1.0", True
    )
    assert merged.metadata == (("az", "b"), ("disk", "ssd"), ("region", "us"))
    assert machine.metadata_dict == {"region": "eu", "disk": "ssd"}  # unchanged


def test_no_dynamic_metadata_is_the_machine_itself() -> None:
    machine = Machine.make("m1", metadata={"a": "1"})
    assert machine.with_dynamic_metadata({}) is machine
    assert Machine("m2").with_dynamic_metadata({"a": "1"}).metadata == (("a", "1"),)
