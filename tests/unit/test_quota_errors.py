"""etcd's NOSPACE alarm as fleet reports it: a QuotaExceeded (retryable, a RegistryUnavailable)
naming the alarm and the fix, and the API's 503 with those words. The real alarm, on a real
etcd with a tiny quota: tests/integration/test_etcd_nospace.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from test_api_harness import HELLO, V1, Api, api_options, serving_api

from fleetd.errors import QuotaExceeded, RegistryUnavailable
from fleetd.etcd.client import EtcdConfig, _map_error
from fleetd.etcd.transport import RpcError, StatusCode

CONFIG = EtcdConfig(endpoints=["http://10.0.0.1:2379"])


def test_nospace_names_the_alarm_and_the_fix() -> None:
    error = _map_error(
        RpcError(StatusCode.RESOURCE_EXHAUSTED, "etcdserver: mvcc: database space exceeded"),
        "txn",
        CONFIG,
    )
    assert isinstance(error, QuotaExceeded)
    assert isinstance(error, RegistryUnavailable)  # fleetd's components retry it
    text = str(error)
    assert "http://10.0.0.1:2379" in text
    assert "NOSPACE alarm" in text
    for fix in ("etcdctl compact", "etcdctl defrag", "etcdctl alarm disarm"):
        assert fix in text


def test_other_resource_exhaustion_is_not_the_alarm() -> None:
    error = _map_error(
        RpcError(StatusCode.RESOURCE_EXHAUSTED, "etcdserver: too many requests"), "txn", CONFIG
    )
    assert isinstance(error, RegistryUnavailable)
    assert not isinstance(error, QuotaExceeded)
    assert "too many requests" in str(error)


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    async with serving_api() as harness:
        yield harness


async def test_api_answers_503_with_the_alarm(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    full = QuotaExceeded("etcd txn refused: NOSPACE alarm ... `etcdctl alarm disarm`")

    async def refused(*args: Any, **kwargs: Any) -> bool:
        raise full

    monkeypatch.setattr(api.registry, "create_unit", refused)
    status, body, _ = await api.call(
        "PUT",
        f"{V1}/units/hello.service",
        {"desiredState": "launched", "options": api_options(HELLO)},
    )
    assert status == 503
    assert body == {"error": {"code": 503, "message": str(full)}}
    assert await api.registry.get_unit("hello.service") is None
