"""What an endpoint's deliveries share in one process, however often its lane starts and stops."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from hookgate.egress.context import WorkerContext
from hookgate.egress.endpoint import Endpoint
from hookgate.egress.flow import CircuitState, FlowControl
from hookgate.egress.outcome import Outcomes
from hookgate.egress.send import Sender
from hookgate.observe.metrics import Metrics

log = logging.getLogger("hookgate.dispatcher")


@dataclass(eq=False)
class EndpointParts:
    """Flow control (rate limit and circuit), failure tracking and the sender of one endpoint."""

    flow: FlowControl
    outcomes: Outcomes
    sender: Sender

    @classmethod
    def build(cls, context: WorkerContext, endpoint: Endpoint) -> EndpointParts:
        # The same flow control for as long as its config is the same, shared with other processes.
        flow = context.states.limits.flow_for(endpoint, _CircuitLog(context.metrics, endpoint.name))
        return cls(flow, Outcomes(context, endpoint), Sender(endpoint, context.broker, context.hooks))


@dataclass(frozen=True)
class _CircuitLog:
    metrics: Metrics
    endpoint: str

    def __call__(self, old: CircuitState, new: CircuitState) -> None:
        log.warning("endpoint %s: circuit %s -> %s", self.endpoint, old, new)
        self.metrics.circuit_open.labels(self.endpoint).set(0 if new is CircuitState.CLOSED else 1)
