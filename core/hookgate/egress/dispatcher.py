"""The dispatcher: a bounded set of shard consumers, one lane per busy endpoint, retries by schedule.

Unordered endpoints share SHARDS shard consumers (see `Topology.delivery_subject`); a shard's
puller hands each delivery to its endpoint's lane (`hookgate.egress.lanes`), so the consumer
count, and the cost of an idle endpoint, do not grow with the endpoints. An ordered endpoint keeps
a consumer of its own with one message in flight, in a slot that starts, restarts and stops its
worker (`hookgate.egress.worker`) as the catalog changes. How retries are scheduled is in
`hookgate.egress.retry`.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import trio

from hookgate.broker import Broker, ConsumerSpec, PullConsumer
from hookgate.egress.context import WorkerContext
from hookgate.egress.endpoint import Endpoint
from hookgate.egress.forward import consumer_until, move_all
from hookgate.egress.lanes import Lanes
from hookgate.egress.leftovers import Leftovers
from hookgate.egress.parking import Parking
from hookgate.egress.state import EndpointStates
from hookgate.egress.watching import cancel_when_set
from hookgate.egress.worker import EndpointWorker
from hookgate.observe.metrics import Metrics
from hookgate.observe.tracing import OFF, Tracing
from hookgate.plugin_host.hooks import Hooks

log = logging.getLogger("hookgate.dispatcher")

ACK_WAIT = 30.0
BACKLOG_POLL = 5.0
# How long one fetch from a shard waits when there is nothing: a delivery that arrives ends the
# wait at once, so this only sets how often an idle shard's puller wakes (16 shards: ~3 per second).
FETCH_WAIT = 5.0
SHARD_BATCH = 256  # deliveries taken from a shard per fetch, and pulled ahead of it
# Deliveries of one shard held at once, in all processes together: running, waiting in a lane,
# or being deferred. Lanes hold at most `lane_capacity` each, so a shard stalls only once this
# many are held by its endpoints (about 120 hanging endpoints of the default concurrency).
SHARD_MAX_ACK_PENDING = 10_000


class Dispatcher:
    """Pulls the shards into per-endpoint lanes, and serves each ordered endpoint in its own slot."""

    def __init__(
        self,
        broker: Broker,
        hooks: Hooks,
        endpoints: dict[str, Endpoint],
        grace: float,
        metrics: Metrics,
        states: EndpointStates | None = None,
        tracing: Tracing = OFF,
    ):
        self.broker = broker
        self.hooks = hooks
        self.endpoints = endpoints
        self.grace = grace
        self.metrics = metrics
        self.states = states or EndpointStates(broker)
        self.tracing = tracing
        self.parking = Parking(broker, self.states, lambda: self.endpoints)
        self.lanes = Lanes(self._worker_context(), endpoints, self.parking)
        self._slots: dict[str, _Slot] = {}
        self._nursery: trio.Nursery | None = None
        self._stopping: trio.Event | None = None
        self._gauged: set[str] = set()
        self._disabled_gauged: dict[str, int] = {}

    def shard_specs(self) -> list[ConsumerSpec]:
        t = self.broker.topology
        return [
            ConsumerSpec(
                t.deliveries_stream,
                t.shard_consumer(shard),
                t.shard_filter(shard),
                # Messages held here are kept alive every KEEPALIVE seconds however long they wait or
                # take; after a crash the server redelivers them once this passes.
                ack_wait=ACK_WAIT,
                max_ack_pending=SHARD_MAX_ACK_PENDING,
                buffer=SHARD_BATCH,
            )
            for shard in range(t.shards)
        ]

    def consumer_spec(self, endpoint: Endpoint) -> ConsumerSpec:
        """An ordered endpoint's own consumer: the server hands out the next message only once the
        head is acked."""
        t = self.broker.topology
        return ConsumerSpec(
            t.deliveries_stream,
            t.ordered_consumer(endpoint.name),
            t.delivery_subject(endpoint.name, ordered=True),
            ack_wait=ACK_WAIT,
            max_ack_pending=1,
            buffer=1,
        )

    async def run(
        self, stopping: trio.Event, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        # The shard consumers, and those of the ordered endpoints known at start, are created (or
        # updated) in one crossing, before the gateway reports itself started.
        shards = self.shard_specs()
        ordered = [e for e in self.endpoints.values() if e.config.ordered]
        consumers = await self.broker.consumers(shards + [self.consumer_spec(e) for e in ordered])
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._stopping = stopping
                await nursery.start(self.lanes.run, stopping)
                nursery.start_soon(self.parking.run, stopping)
                nursery.start_soon(Leftovers(self.broker, lambda: self.endpoints).run, stopping)
                for consumer in consumers[: len(shards)]:
                    nursery.start_soon(self._pull_shard, consumer, stopping)
                for endpoint, consumer in zip(ordered, consumers[len(shards) :], strict=True):
                    self._start(endpoint, consumer)
                task_status.started()
                self._reconcile()  # endpoints that changed while the consumers were being created
                nursery.start_soon(self._measure_backlog, stopping)
                await stopping.wait()
                for slot in self._slots.values():
                    slot.stop.set()
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True):
                for endpoint in self.endpoints.values():
                    if endpoint.transport is not None:
                        await endpoint.transport.aclose()

    async def _pull_shard(self, consumer: PullConsumer, stopping: trio.Event) -> None:
        """Hand what the shard delivers to the lanes until `stopping`; then, once every lane has
        stopped (handing back what it had not started), release the pull."""
        with trio.CancelScope() as fetching:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(cancel_when_set, stopping, fetching)
                backoff = 0.5
                while True:
                    try:
                        msgs = await self.broker.fetch(consumer, SHARD_BATCH, FETCH_WAIT)
                        backoff = 0.5
                    except Exception as exc:
                        durable = consumer.spec.durable
                        log.warning("%s: fetch failed: %s; retrying in %.1fs", durable, exc, backoff)
                        await trio.sleep(backoff)
                        backoff = min(backoff * 2, 5.0)
                        continue
                    for msg in msgs:
                        self.lanes.offer(consumer, msg)
        await self.lanes.finished.wait()
        with trio.CancelScope(shield=True):
            await self.broker.release_consumer(consumer)

    def update(self, endpoints: dict[str, Endpoint]) -> None:
        """Serve these endpoints from now on: start new ones, restart changed ones, stop removed ones."""
        for name in self.endpoints.keys() - endpoints.keys():
            self._forget_metrics(name)
            self.states.limits.forget(name)
            self._disabled_gauged.pop(name, None)
        self.endpoints = dict(endpoints)
        self.lanes.update(self.endpoints)
        self._reconcile()

    def _reconcile(self) -> None:
        if self._nursery is None or self._stopping is None or self._stopping.is_set():
            return  # not running yet (run() starts what is current), or shutting down
        ordered = {name: e for name, e in self.endpoints.items() if e.config.ordered}
        for name, slot in self._slots.items():
            wanted = ordered.get(name)
            if wanted is not slot.endpoint:
                slot.wanted = wanted
                slot.stop.set()
        for name, endpoint in ordered.items():
            if name not in self._slots:
                self._start(endpoint, None)

    def _start(self, endpoint: Endpoint, consumer: PullConsumer | None) -> None:
        assert self._nursery is not None and self._stopping is not None
        slot = _Slot(endpoint)
        self._slots[endpoint.name] = slot
        self._nursery.start_soon(self._serve, slot, consumer, self._stopping)

    async def _serve(self, slot: _Slot, consumer: PullConsumer | None, stopping: trio.Event) -> None:
        """One endpoint's worker, restarted with the new config whenever the endpoint changes.

        A change stops the worker the way shutdown does: no new fetches, and in-flight deliveries
        finish within the grace period. The worker releases its pull as it stops (what it had
        buffered is nak'ed for the next worker), and the durable consumer stays.
        """
        name = slot.endpoint.name
        try:
            while True:
                endpoint = slot.endpoint
                if consumer is None:
                    consumer = await consumer_until(self.broker, self.consumer_spec(endpoint), slot.stop)
                slot.consumer = consumer
                if consumer is not None:
                    await EndpointWorker(self._worker_context(), endpoint, consumer).run(slot.stop)
                if endpoint.transport is not None and all(e is not endpoint for e in self.endpoints.values()):
                    with trio.CancelScope(shield=True):
                        await endpoint.transport.aclose()
                if stopping.is_set():
                    return
                if slot.wanted is None:  # removed, or no longer ordered
                    if consumer is not None and name in self.endpoints:
                        await self._unorder(consumer.spec, stopping)
                    log.info("endpoint %s: stopped delivering in order", name)
                    return
                log.info("endpoint %s: restarting with its new config", name)
                slot.endpoint, slot.stop = slot.wanted, trio.Event()
                consumer = None  # created again: its settings follow the new config
        finally:
            if self._slots.get(name) is slot:
                del self._slots[name]

    async def _unorder(self, spec: ConsumerSpec, stopping: trio.Event) -> None:
        """An endpoint that is no longer ordered: what waits in its ordered line moves to its shard,
        and its own consumer is deleted."""
        name = self.broker.topology.endpoint_of(spec.filter_subject or "")
        try:
            await move_all(
                self.broker,
                spec,
                lambda _msg: self.broker.topology.delivery_subject(name),
                lambda: not stopping.is_set() and name in self.endpoints,
                purge=True,
            )
        except Exception as exc:
            log.warning("endpoint %s: could not move its ordered deliveries to its shard: %s", name, exc)

    def _worker_context(self) -> WorkerContext:
        """What a worker uses of the gateway, given to it rather than reached through this dispatcher."""
        return WorkerContext(
            broker=self.broker,
            hooks=self.hooks,
            metrics=self.metrics,
            states=self.states,
            tracing=self.tracing,
            grace=self.grace,
        )

    def _forget_metrics(self, name: str) -> None:
        for gauge in (self.metrics.backlog, self.metrics.circuit_open, self.metrics.endpoint_disabled):
            with contextlib.suppress(KeyError):
                gauge.remove(name)

    async def _measure_backlog(self, stopping: trio.Event) -> None:
        """Backlog gauges: what each endpoint's lane holds, what is spilled or parked for it, and
        what waits in an ordered endpoint's own consumer. What waits in a shard is not told apart
        by endpoint."""
        while not stopping.is_set():
            backlog = dict.fromkeys(self._gauged, 0)
            spilled, parked = self.lanes.spills.counts, self.parking.counts
            for name, count in [*self.lanes.held().items(), *spilled.items(), *parked.items()]:
                backlog[name] = backlog.get(name, 0) + count
            own = {n: s.consumer for n, s in self._slots.items() if s.consumer is not None}
            consumers = {consumer.spec.durable: n for n, consumer in own.items()}
            try:
                pending = await self.broker.pending_counts(list(own.values()))
            except Exception as exc:
                log.debug("could not read consumer info: %s", exc)
            else:
                for durable, count in pending.items():
                    if durable in consumers:
                        backlog[consumers[durable]] = backlog.get(consumers[durable], 0) + count
            for name, count in backlog.items():
                if name in self.endpoints:
                    self.metrics.backlog.labels(name).set(count)
            self._gauged = {name for name, count in backlog.items() if count}
            for name in self.endpoints:
                value = 1 if self.states.disabled(name) else 0
                if self._disabled_gauged.get(name) != value:  # a gauge per endpoint, set only when it changes
                    self.metrics.endpoint_disabled.labels(name).set(value)
                    self._disabled_gauged[name] = value
            with trio.move_on_after(BACKLOG_POLL):
                await stopping.wait()


@dataclass(eq=False)
class _Slot:
    """One endpoint served by this dispatcher: its running config, and the one it should run."""

    endpoint: Endpoint
    wanted: Endpoint | None = None  # set with `stop`: the next config, or None once removed
    stop: trio.Event = field(default_factory=trio.Event)
    consumer: PullConsumer | None = None
