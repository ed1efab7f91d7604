"""fleet's HTTP API v1 (reference §6), plus /metrics and /health, served by every fleetd.

Modules: app (routing, 503 gate, errors), units / state / machines / discovery (resources),
pagination (fleet's page tokens), body (request bodies), errors (fleet's error format),
metrics (Prometheus), listeners (unix socket, TCP+TLS, socket activation), server (ApiServer).
"""

from fleetd.api.context import ApiContext
from fleetd.api.metrics import Metrics
from fleetd.api.server import ApiServer

__all__ = ["ApiContext", "ApiServer", "Metrics"]
