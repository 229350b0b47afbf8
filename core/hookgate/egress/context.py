"""What an endpoint's worker uses of the gateway, handed to it explicitly by the dispatcher."""

from __future__ import annotations

import msgspec

from hookgate.broker import Broker
from hookgate.egress.state import EndpointStates
from hookgate.observe.metrics import Metrics
from hookgate.observe.tracing import Tracing
from hookgate.plugin_host.hooks import Hooks


class WorkerContext(msgspec.Struct, frozen=True, kw_only=True):
    """What a worker uses of the gateway, handed to it by the dispatcher."""

    broker: Broker
    hooks: Hooks
    metrics: Metrics
    states: EndpointStates
    tracing: Tracing
    grace: float  # how long deliveries in flight may finish once the worker is stopped
