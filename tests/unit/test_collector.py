"""fleetd/collector.py: the GC settings fleetd, fleetctl and the simulator start with."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from fleetd import collector


@pytest.fixture
def restored_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("restored_gc")
def test_tune_sets_the_thresholds_and_freezes_what_exists() -> None:
    survivor = [object()]  # something alive before tune(): it must end up frozen
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    collector.tune()
    assert gc.get_threshold() == (collector.YOUNG_GENERATION, *collector.OLDER_GENERATIONS)
    assert gc.get_freeze_count() > 0
    assert not any(o is survivor for o in gc.get_objects())  # frozen: out of every generation
