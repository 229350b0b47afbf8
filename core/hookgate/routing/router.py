"""The router: consumes the events stream and fans each event out into one delivery per endpoint.

Each delivery is published with `Nats-Msg-Id: <event id>:<endpoint>`, so a router that crashes
after publishing and before acking fans out again without duplicating anything. Every routing
decision, including "no route matched", is recorded in the log stream.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import msgspec
import trio

from hookgate.broker import Broker, Commit, ConsumerSpec, InMsg, OutMsg, PullConsumer
from hookgate.broker.events import event_from_stream
from hookgate.broker.ids import delivery_id
from hookgate.broker.records import DeliveryCreated, RoutingRecord, event_key
from hookgate.config import RouteConfig
from hookgate.config.filters import ParsedBody
from hookgate.observe.tracing import carried
from hookgate.plugin_host.hooks import Hooks
from hookgate.routing.routes import CompiledRoute
from hookgate.types import INTERNAL_SOURCE, Delivery, Event, Transform

log = logging.getLogger("hookgate.router")

FETCH_BATCH = 256
FETCH_WAIT = 1.0
ROUTE_RETRY_DELAY = 0.5


@dataclass(frozen=True)
class _Decision:
    event: Event | None
    routes: list[str]
    targets: list[str]
    variants: dict[str, Event]
    error: str | None


class Router:
    def __init__(
        self,
        broker: Broker,
        hooks: Hooks,
        routes: list[RouteConfig],
        endpoints: set[str],
        transforms: dict[int, Transform] | None = None,
        ordered: frozenset[str] = frozenset(),
    ):
        self.broker = broker
        self.hooks = hooks
        transforms = transforms or {}
        self.config_routes = [CompiledRoute.compile(i, r, transforms.get(i)) for i, r in enumerate(routes)]
        self.routes = list(self.config_routes)
        self.endpoints = endpoints
        self.ordered = ordered  # endpoints whose deliveries go to their own ordered line
        self._encode = msgspec.msgpack.Encoder().encode
        self._encode_json = msgspec.json.Encoder().encode
        self.consumer: PullConsumer | None = None

    def update(
        self, endpoints: set[str], implicit_routes: list[CompiledRoute], ordered: frozenset[str] = frozenset()
    ) -> None:
        """Swap in the current endpoints and, after the YAML routes, the API endpoints' subscriptions.

        Both are replaced whole, so an event being planned sees either the old set or the new one.
        """
        self.routes = [*self.config_routes, *implicit_routes]
        self.endpoints = endpoints
        self.ordered = ordered

    def consumer_spec(self) -> ConsumerSpec:
        t = self.broker.topology
        return ConsumerSpec(t.events_stream, t.router_consumer(), None, ack_wait=30.0, max_ack_pending=4096)

    async def run(
        self, stopping: trio.Event, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        (consumer,) = await self.broker.consumers([self.consumer_spec()])
        self.consumer = consumer
        task_status.started()
        backoff = 0.5
        try:
            while not stopping.is_set():
                try:
                    msgs = await self.broker.fetch(consumer, FETCH_BATCH, FETCH_WAIT)
                    if msgs:
                        with trio.CancelScope(shield=True):
                            await self.route_batch(msgs)
                    backoff = 0.5
                except Exception as exc:
                    log.warning("router: %s; retrying in %.1fs", exc, backoff)
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
        finally:
            # Events pulled but not routed yet go back at once, for the next router (here after a
            # restart, or on another replica), instead of waiting for ack_wait.
            with trio.CancelScope(shield=True):
                await self.broker.release_consumer(consumer)

    async def backlog(self) -> int | None:
        """Stored events not yet routed (pending or in hand), or None before the consumer exists."""
        if self.consumer is None:
            return None
        counts = await self.broker.bridge.pending_counts([self.consumer])
        return counts.get(self.consumer.spec.durable)

    def to_event(self, msg: InMsg) -> Event:
        return event_from_stream(
            self.broker.topology.publish_prefix,
            msg.subject,
            msg.data,
            msg.headers,
            msg.stream_seq,
            msg.timestamp,
        )

    async def plan(self, event: Event) -> tuple[list[str], list[str], dict[str, Event]]:
        """Matched route names, target endpoints, and the event each target gets if reshaped.

        An endpoint reached by several routes takes the first one's transform.
        """
        if event.to is not None:
            return ["explicit"], [e for e in event.to if e in self.endpoints], {}
        matched_routes: list[str] = []
        targets: list[str] = []
        variants: dict[str, Event] = {}
        body = ParsedBody.of(event)  # parsed at most once, and only if a filter reads it
        for route in self.routes:
            if not route.matches(event, body):
                continue
            matched_routes.append(route.name)
            fresh = [t for t in route.to if t not in targets]
            if route.transform is not None and fresh:
                shaped = route.transform.transform(event)
                if shaped is None:
                    continue  # the transform dropped the event for this route's endpoints
                if shaped is not event:
                    variants.update(dict.fromkeys(fresh, shaped))
            targets.extend(fresh)
        for extra in await self.hooks.call("hookgate_route", event=event, endpoints=list(targets)):
            for name in extra or []:
                if name not in self.endpoints:
                    log.warning("a routing plugin named unknown endpoint %r for event %s", name, event.id)
                elif name not in targets:
                    targets.append(name)
        return matched_routes, targets, variants

    async def event_for(self, event: Event, endpoint: str) -> Event:
        """The event as `endpoint` gets it under the current routes (its transform applied), for
        replaying a delivery whose original form was not kept."""
        _, _, variants = await self.plan(event)
        return variants.get(endpoint, event)

    async def route_batch(self, msgs: list[InMsg]) -> None:
        """Fan out a batch; each event is acked only once all its deliveries are stored."""
        commits = [self._route_one(msg, await self._event_or_error(msg)) for msg in msgs]
        results = await self.broker.commit_many(commits)
        failed = sum(1 for r in results if not all(p.ok for p in r))
        if failed:
            log.warning("router: %d of %d events not routed yet; they will be retried", failed, len(msgs))

    async def _event_or_error(self, msg: InMsg) -> _Decision:
        try:
            event = self.to_event(msg)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.error("router: unreadable message %s seq %d: %s", msg.subject, msg.stream_seq, exc)
            return _Decision(None, [], [], {}, f"unreadable event: {exc}")
        try:
            routes, targets, variants = await self.plan(event)
        except Exception as exc:
            # A failing transform or routing plugin must not wedge the router on this event.
            log.exception("router: routing event %s failed; it is recorded and not delivered", event.id)
            return _Decision(event, [], [], {}, f"routing failed: {type(exc).__name__}: {exc}")
        if not targets:
            log.debug("event %s (%s from %s) matched no route", event.id, event.type, event.source)
        return _Decision(event, routes, targets, variants, None)

    def _route_one(self, msg: InMsg, decided: _Decision) -> Commit:
        """One event's commit: its deliveries, its routing record and its deliveries' creation
        records, acked together."""
        now = time.time()
        event = decided.event
        deliveries = [] if event is None else self._deliveries(msg, event, decided, now)
        topology = self.broker.topology
        ordered = self.ordered
        out = [
            OutMsg(topology.delivery_subject(d.endpoint, ordered=d.endpoint in ordered), self._encode(d), h)
            for d, h in deliveries
        ]
        out.append(self._routing_record(msg, decided))
        if event is not None:
            out.extend(self._created_record(event, d, now) for d, _ in deliveries)
        # An unreadable event is recorded and acked: redelivering it would not make it readable.
        # The log's records are required too, so a delivery is never missing from the log.
        return Commit(out, ack=msg, required=len(out), nak_delay=ROUTE_RETRY_DELAY)

    def _deliveries(
        self, msg: InMsg, event: Event, decided: _Decision, now: float
    ) -> list[tuple[Delivery, dict[str, str]]]:
        """One delivery per target endpoint, each with its headers: the dedup id, and the event's
        trace, which each delivery continues."""
        trace = carried(msg.headers)
        return [
            (
                Delivery(
                    id=delivery_id(event.id, endpoint),
                    endpoint=endpoint,
                    attempt=1,
                    event=decided.variants.get(endpoint, event),
                    created_at=now,
                    routes=decided.routes,
                ),
                {"Nats-Msg-Id": f"{event.id}:{endpoint}", **trace},
            )
            for endpoint in decided.targets
        ]

    def _routing_record(self, msg: InMsg, decided: _Decision) -> OutMsg:
        event = decided.event
        event_id = event.id if event else msg.headers.get("Nats-Msg-Id") or f"evt_s{msg.stream_seq}"
        record = RoutingRecord(
            event_id=event_id,
            source=event.source if event else INTERNAL_SOURCE,
            type=event.type if event else "",
            received_at=event.received_at if event else msg.timestamp,
            routes=decided.routes,
            endpoints=decided.targets,
            error=decided.error,
            events_seq=msg.stream_seq,
        )
        return OutMsg(
            self.broker.topology.routed_subject(event_key(event_id)),
            self._encode_json(record),
            {"Nats-Msg-Id": f"routed:{event_id}"},
        )

    def _created_record(self, event: Event, delivery: Delivery, now: float) -> OutMsg:
        """The delivery log's creation record of a delivery, naming the event as it came in (a
        transform may have changed what the endpoint gets)."""
        created = DeliveryCreated(
            delivery_id=delivery.id,
            event_id=event.id,
            endpoint=delivery.endpoint,
            source=event.source,
            type=event.type,
            created_at=now,
            routes=delivery.routes,
        )
        return OutMsg(
            self.broker.topology.delivery_log_subject(delivery.endpoint, delivery.id),
            self._encode_json(created),
            {"Nats-Msg-Id": f"created:{delivery.id}"},
        )
