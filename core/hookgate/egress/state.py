"""Endpoint states (enabled or disabled) kept in a JetStream KV bucket, and operational events.

Every replica reads the bucket, so an endpoint disabled by one (on a 410, or after failing for
`disable_after`) or through the API stops for all of them. Its deliveries stay in JetStream and
flow again once it is enabled. Operational events go to `hookgate.ops.<kind>` and, when
`ops.endpoint` is configured, to that endpoint as internal events of type `hookgate.<kind>`.
"""

from __future__ import annotations

import logging
import time

import msgspec

from hookgate.broker import Broker, Commit, OutMsg
from hookgate.broker.events import encode_event
from hookgate.broker.ids import new_event_id
from hookgate.types import INTERNAL_SOURCE, Event

log = logging.getLogger("hookgate.endpoints")

OpsKind = str  # endpoint.disabled, endpoint.recovered, delivery.exhausted, delivery.failing


class EndpointStatus(msgspec.Struct, kw_only=True):
    disabled: bool = False
    reason: str = ""
    since: float = 0.0


class OpsEvent(msgspec.Struct, kw_only=True, omit_defaults=True):
    kind: OpsKind
    endpoint: str
    at: float
    reason: str = ""
    delivery_id: str | None = None
    event_id: str | None = None


_status_decoder = msgspec.json.Decoder(EndpointStatus)
_encode = msgspec.json.Encoder().encode


class EndpointStates:
    def __init__(self, broker: Broker, ops_endpoint: str | None = None):
        self.broker = broker
        self.ops_endpoint = ops_endpoint
        self.current: dict[str, EndpointStatus] = {}

    def disabled(self, endpoint: str) -> bool:
        status = self.current.get(endpoint)
        return status is not None and status.disabled

    async def refresh(self) -> dict[str, EndpointStatus]:
        raw = await self.broker.kv_get_all(self.broker.topology.endpoints_bucket)
        states = {}
        for name, value in raw.items():
            try:
                states[name] = _status_decoder.decode(value)
            except msgspec.DecodeError:
                log.warning("ignoring an unreadable state for endpoint %s", name)
        self.current = states
        return states

    async def set(self, endpoint: str, disabled: bool, reason: str) -> None:
        status = EndpointStatus(disabled=disabled, reason=reason, since=time.time())
        await self.broker.kv_put(self.broker.topology.endpoints_bucket, endpoint, _encode(status))
        self.current[endpoint] = status
        kind = "endpoint.disabled" if disabled else "endpoint.recovered"
        log.warning("endpoint %s %s: %s", endpoint, "disabled" if disabled else "enabled", reason)
        self.emit(kind, endpoint, reason=reason)

    def emit(self, kind: OpsKind, endpoint: str, **fields: str | None) -> None:
        """Publish an operational event (without waiting), and hand it to the ops endpoint."""
        ops = OpsEvent(kind=kind, endpoint=endpoint, at=time.time(), **fields)  # type: ignore[arg-type]
        body = _encode(ops)
        msgs = [OutMsg(self.broker.topology.ops_subject(kind), body)]
        if self.ops_endpoint is not None and self.ops_endpoint != endpoint:
            # Never about itself: an ops endpoint that fails must not feed itself events.
            event = Event(
                id=new_event_id(),
                source=INTERNAL_SOURCE,
                type=f"hookgate.{kind}",
                received_at=ops.at,
                body=body,
                to=[self.ops_endpoint],
            )
            msgs.append(OutMsg(self.broker.topology.event_subject(INTERNAL_SOURCE), encode_event(event)))
        self.broker.commit_later(Commit(msgs))
