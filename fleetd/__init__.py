"""fleetd: the fleet daemon (agent, leader-elected engine, HTTP API) over etcd v3."""

__version__ = "0.2.0"
