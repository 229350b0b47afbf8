"""The dispatcher: one durable consumer and one connection pool per endpoint, retries by schedule.

It supervises one worker per endpoint (`hookgate.egress.worker`), started, restarted and stopped
as the catalog changes; how retries are scheduled is in `hookgate.egress.retry`.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import trio

from hookgate.broker import Broker, ConsumerSpec, PullConsumer
from hookgate.egress.context import WorkerContext
from hookgate.egress.endpoint import Endpoint
from hookgate.egress.state import EndpointStates
from hookgate.egress.worker import EndpointWorker
from hookgate.observe.metrics import Metrics
from hookgate.observe.tracing import OFF, Tracing
from hookgate.plugin_host.hooks import Hooks

log = logging.getLogger("hookgate.dispatcher")

ACK_WAIT = 30.0
BACKLOG_POLL = 5.0


class Dispatcher:
    """Serves each endpoint with its own worker, in one slot per endpoint."""

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
        self._slots: dict[str, _Slot] = {}
        self._nursery: trio.Nursery | None = None
        self._stopping: trio.Event | None = None

    def consumer_spec(self, endpoint: Endpoint) -> ConsumerSpec:
        t = self.broker.topology
        return ConsumerSpec(
            t.deliveries_stream,
            t.endpoint_consumer(endpoint.name),
            t.delivery_subject(endpoint.name),
            # Messages held here are kept alive every KEEPALIVE seconds however long they wait or
            # take; after a crash the server redelivers them once this passes.
            ack_wait=ACK_WAIT,
            # Ordered: the server hands out the next message only once the head is acked.
            max_ack_pending=1 if endpoint.config.ordered else max(64, endpoint.config.concurrency * 4),
            buffer=1 if endpoint.config.ordered else endpoint.config.concurrency,
        )

    async def run(
        self, stopping: trio.Event, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        # The consumers of the endpoints known at start are created (or updated) in one crossing,
        # before the gateway reports itself started.
        initial = dict(self.endpoints)
        consumers = await self.broker.consumers([self.consumer_spec(e) for e in initial.values()])
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._stopping = stopping
                for endpoint, consumer in zip(initial.values(), consumers, strict=True):
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

    def update(self, endpoints: dict[str, Endpoint]) -> None:
        """Serve these endpoints from now on: start new ones, restart changed ones, stop removed ones."""
        self.endpoints = dict(endpoints)
        self._reconcile()

    def _reconcile(self) -> None:
        if self._nursery is None or self._stopping is None or self._stopping.is_set():
            return  # not running yet (run() starts what is current), or shutting down
        for name, slot in self._slots.items():
            wanted = self.endpoints.get(name)
            if wanted is not slot.endpoint:
                slot.wanted = wanted
                slot.stop.set()
        for name, endpoint in self.endpoints.items():
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
                    consumer = await self._consumer(endpoint, slot.stop)
                slot.consumer = consumer
                if consumer is not None:
                    await EndpointWorker(self._worker_context(), endpoint, consumer).run(slot.stop)
                if endpoint.transport is not None and all(e is not endpoint for e in self.endpoints.values()):
                    with trio.CancelScope(shield=True):
                        await endpoint.transport.aclose()
                if stopping.is_set():
                    return
                if slot.wanted is None:  # removed (the worker released its pull as it stopped)
                    self._forget_metrics(name)
                    log.info("endpoint %s: stopped delivering (removed)", name)
                    return
                log.info("endpoint %s: restarting with its new config", name)
                slot.endpoint, slot.stop = slot.wanted, trio.Event()
                consumer = None  # created again: its settings follow the new config
        finally:
            if self._slots.get(name) is slot:
                del self._slots[name]
        # Re-added while this one was stopping: serve it again. Not from a `finally`: when the
        # gateway is cancelled from outside, each new worker would be cancelled at once and would
        # start the next, without end.
        self._reconcile()

    async def _consumer(self, endpoint: Endpoint, stop: trio.Event) -> PullConsumer | None:
        """Create or update the endpoint's durable consumer, retrying until it exists or `stop`."""
        backoff = 0.5
        while not stop.is_set():
            try:
                (consumer,) = await self.broker.consumers([self.consumer_spec(endpoint)])
                return consumer
            except Exception as exc:
                log.warning("endpoint %s: cannot create its consumer: %s; retrying", endpoint.name, exc)
            with trio.move_on_after(backoff):
                await stop.wait()
            backoff = min(backoff * 2, 5.0)
        return None

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
        """Backlog gauges from consumer info: what each endpoint still has to take."""
        while not stopping.is_set():
            consumers = {
                slot.consumer.spec.durable: name
                for name, slot in self._slots.items()
                if slot.consumer is not None
            }
            try:
                counts = await self.broker.bridge.pending_counts(
                    [s.consumer for s in self._slots.values() if s.consumer is not None]
                )
            except Exception as exc:
                log.debug("could not read consumer info: %s", exc)
            else:
                for durable, count in counts.items():
                    name = consumers.get(durable)
                    if name is not None and name in self._slots:
                        self.metrics.backlog.labels(name).set(count)
            for name in list(self._slots):
                self.metrics.endpoint_disabled.labels(name).set(1 if self.states.disabled(name) else 0)
            with trio.move_on_after(BACKLOG_POLL):
                await stopping.wait()


@dataclass(eq=False)
class _Slot:
    """One endpoint served by this dispatcher: its running config, and the one it should run."""

    endpoint: Endpoint
    wanted: Endpoint | None = None  # set with `stop`: the next config, or None once removed
    stop: trio.Event = field(default_factory=trio.Event)
    consumer: PullConsumer | None = None
