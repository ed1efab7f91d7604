"""plan and why against a real fleetd on a real etcd: the real engine placed the units, the API
answers `POST /fleet/v1/plan` and `GET /fleet/v1/why/<unit>`, fleetctl's etcd driver answers
the same from etcd itself, and neither writes anything (etcd's revision is unchanged)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetctl.api_client import ApiClient
from fleetctl.client import RegistryClient
from fleetd.engine.whatif import Action, Start
from fleetd.errors import FleetError, InvalidInput
from fleetd.etcd.client import EtcdConfig, EtcdKV
from fleetd.model import TargetState
from fleetd.registry.registry import Registry
from fleetd.unit.file import parse_unit
from tests.integration.etcd_fixture import EtcdServer
from tests.integration.inprocess import M1, fleetd, fleetd_config, wait_launched
from tests.integration.waits import wait_for

pytestmark = pytest.mark.integration

HELLO = "[Unit]\nDescription=Hello\n\n[Service]\nExecStart=/bin/sleep 1000\n"
DB = HELLO + "\n[X-Fleet]\nMachineMetadata=role=db\n"


async def test_plan_and_why_on_a_real_cluster(
    etcd_server: EtcdServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = fleetd_config(tmp_path, etcd_server.endpoints, etcd_request_timeout=5.0)
    socket_path = tmp_path / "fleet.sock"
    kv = EtcdKV(EtcdConfig(endpoints=etcd_server.endpoints))
    api = ApiClient(f"unix://{socket_path}", unix_socket=str(socket_path), timeout=10.0)
    etcd = RegistryClient(Registry(kv))

    async def registered() -> bool:
        try:
            return bool(await api.machines())
        except FleetError:  # 503 until this machine is registered
            return False

    try:
        async with fleetd(config, tmp_path, monkeypatch):
            await etcd.create_unit("hello.service", parse_unit(HELLO), TargetState.LAUNCHED)
            await etcd.create_unit("db.service", parse_unit(DB), TargetState.LAUNCHED)
            await wait_for(registered, "registration")
            await wait_launched(api, "hello.service")
            revision = await kv.current_revision()

            by_api = await api.plan([], [M1[:6]])
            by_etcd = await etcd.plan([], [M1[:6]])
            assert by_api == by_etcd
            outcomes = {u.name: u for u in by_api.units}
            assert outcomes["hello.service"].action is Action.UNPLACED  # the only machine
            assert outcomes["hello.service"].reason.startswith(f"machine {M1} went away")
            assert "db.service" not in outcomes  # placed nowhere before, nowhere after
            assert by_api.pending == 0

            new = [Start("new.service", parse_unit(HELLO.replace("Hello", "New")))]
            started = await api.plan(new, [])
            assert [(u.name, u.action, u.after) for u in started.units] == [
                ("new.service", Action.PLACE, M1)
            ]
            assert started == await etcd.plan(new, [])

            why = await api.why("db.service")
            assert why is not None
            assert why == await etcd.why("db.service")
            assert why.reason == "no machine has metadata role=db (machines: 1)"
            assert why.fixes[0].change == "add metadata role=db to one more machine"
            assert await api.why("nope.service") is None

            with pytest.raises(InvalidInput, match="no machine matches"):
                await api.plan([], ["zz"])
            with pytest.raises(InvalidInput, match="no machine matches"):
                await etcd.plan([], ["zz"])
            assert await kv.current_revision() == revision  # nothing was written
    finally:
        await api.close()
        await kv.close()
