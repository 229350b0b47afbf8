"""Endpoint states (enabled or disabled) kept in a JetStream KV bucket, and operational events.

The endpoint's shared limits (rate, circuit, failing streak) are `limits`, started with the states.

Every replica follows the bucket with one KV watch (one consumer on its stream, however long it
idles), so an endpoint disabled by one (on a 410, or after failing for
`disable_after`) or through the API stops for all of them. Its deliveries stay in JetStream and
flow again once it is enabled. Operational events go to `hookgate.ops.<kind>` and, when
`ops.endpoint` is configured, to that endpoint as internal events of type `hookgate.<kind>`.
"""

from __future__ import annotations

import logging
import time

import msgspec
import trio

from hookgate.broker import Broker, Commit, KvUpdate, OutMsg
from hookgate.broker.events import encode_event
from hookgate.broker.ids import new_event_id
from hookgate.egress.limits import SharedLimits
from hookgate.egress.watching import cancel_when_set, follow_bucket
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
        # Rate limits, circuits and failing streaks, shared with every process through KV.
        self.limits = SharedLimits(broker)

    def disabled(self, endpoint: str) -> bool:
        status = self.current.get(endpoint)
        return status is not None and status.disabled

    async def run(
        self, stopping: trio.Event, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Follow the bucket, and the shared limits, until `stopping`; started once the current
        states are known.

        One watch for the whole process: a change made by any replica or the API arrives here as
        it is stored, with no polling, and the watch's one consumer lives as long as the process.
        """
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancel_when_set, stopping, nursery.cancel_scope)
            await nursery.start(
                follow_bucket,
                self.broker,
                self.broker.topology.endpoints_bucket,
                lambda batch, snapshot: self._apply(batch, snapshot=snapshot),
                log,
                "endpoint states",
            )
            await nursery.start(self.limits.run, stopping)
            task_status.started()

    def _apply(self, batch: list[KvUpdate], *, snapshot: bool) -> None:
        """A snapshot replaces every state (a watch started again may have missed deletes)."""
        states = {} if snapshot else dict(self.current)
        for update in batch:
            status = None if update.value is None else _decode(update.key, update.value)
            if status is None:
                states.pop(update.key, None)
            else:
                states[update.key] = status
        self.current = states

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


def _decode(endpoint: str, value: bytes) -> EndpointStatus | None:
    try:
        return _status_decoder.decode(value)
    except msgspec.DecodeError:
        log.warning("ignoring an unreadable state for endpoint %s", endpoint)
        return None
