"""Per-endpoint lanes: where the deliveries pulled from a shard wait for their endpoint.

A shard consumer carries the deliveries of many endpoints (see `Topology.delivery_subject`). Each
endpoint gets a lane in each process: started when its first delivery arrives, stopped once it
has been idle for LANE_IDLE, so an idle endpoint costs nothing but its config. A lane holds at
most `lane_capacity` deliveries (running or waiting, as the per-endpoint consumers' max_ack_pending
did); a delivery past that is deferred, not counted as an attempt, so an endpoint that hangs never
holds up the others in its shard. A disabled endpoint's deliveries are parked
(`hookgate.egress.parking`) until it is enabled.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
import time
from dataclasses import dataclass, field

import msgspec
import trio

from hookgate.broker import Commit, InMsg, PullConsumer, Topology
from hookgate.egress.context import WorkerContext
from hookgate.egress.endpoint import Endpoint
from hookgate.egress.forward import moved
from hookgate.egress.parking import Parking
from hookgate.egress.parts import EndpointParts
from hookgate.egress.retry import schedule_next
from hookgate.egress.worker import EndpointWorker
from hookgate.types import Delivery

log = logging.getLogger("hookgate.dispatcher")

LANE_IDLE = 30.0  # a lane with nothing to do for this long stops (its endpoint's parts stay)
SWEEP_EVERY = 5.0
# A delivery that finds its lane full is deferred: by OVERFLOW_DELAY at first, doubling while the
# lane stays full, up to OVERFLOW_DELAY_MAX, so a hanging endpoint's backlog is not churned.
OVERFLOW_DELAY = 1.0
OVERFLOW_DELAY_MAX = 60.0
# A delivery for an endpoint this process does not know (created a moment ago on another
# replica, or deleted): redelivered after UNKNOWN_RETRY_DELAY, and dropped after UNKNOWN_GIVE_UP
# deliveries (a minute), as its endpoint is gone.
UNKNOWN_RETRY_DELAY = 2.0
UNKNOWN_GIVE_UP = 30

_delivery_decoder = msgspec.msgpack.Decoder(Delivery)


def lane_capacity(endpoint: Endpoint) -> int:
    return max(64, endpoint.config.concurrency * 4)


@dataclass(eq=False)
class _Lane:
    worker: EndpointWorker
    send: trio.MemorySendChannel[InMsg]
    stop: trio.Event
    last_active: float
    overflowed: int = 0  # deliveries deferred since the lane last had room to spare
    done: trio.Event = field(default_factory=trio.Event)


class Lanes:
    """The lanes of one process, fed by its shard pullers."""

    def __init__(self, context: WorkerContext, endpoints: dict[str, Endpoint], parking: Parking):
        self.context = context
        self.broker = context.broker
        self.topology = context.broker.topology
        self.endpoints = endpoints
        self.parking = parking
        self.closing = False
        self.finished = trio.Event()  # every lane has stopped, after shutdown
        self._lanes: dict[str, _Lane] = {}
        # Lanes stopped for a changed endpoint, until their deliveries in flight are done: the
        # lane on the new config starts sending only then.
        self._retiring: dict[str, _Lane] = {}
        self._parts: dict[str, tuple[Endpoint, EndpointParts]] = {}
        self._nursery: trio.Nursery | None = None

    def held(self) -> dict[str, int]:
        """Deliveries each running lane holds (running or waiting)."""
        return {name: len(lane.worker.held) for name, lane in self._lanes.items()}

    async def run(
        self, stopping: trio.Event, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._sweep, stopping)
                task_status.started()
                await stopping.wait()
                self.stop_all()
        finally:
            self._nursery = None
            self.finished.set()

    def offer(self, consumer: PullConsumer, msg: InMsg) -> None:
        """Hand a delivery pulled from `consumer` to its endpoint's lane; never waits."""
        if self.closing:
            self.broker.give_back(consumer, [msg])
            return
        name = Topology.endpoint_of(msg.subject)
        endpoint = self.endpoints.get(name)
        if endpoint is None:
            self._unknown(msg, name)
        elif self.context.states.disabled(name):
            self.parking.park(msg, name)
        elif endpoint.config.ordered:
            # Stored before the endpoint became ordered, or by a replay: into its ordered line.
            self.broker.commit_later(moved(msg, self.topology.delivery_subject(name, ordered=True)))
        else:
            self._enqueue(self._lanes.get(name) or self._open(endpoint, consumer), msg)

    def update(self, endpoints: dict[str, Endpoint]) -> None:
        """A lane whose endpoint changed or went stops; the next delivery opens one on the new config."""
        self.endpoints = endpoints
        for name, lane in list(self._lanes.items()):
            if endpoints.get(name) is not lane.worker.endpoint:
                del self._lanes[name]
                self._retiring[name] = lane
                self._stop(lane)
        for name, (endpoint, _) in list(self._parts.items()):
            if endpoints.get(name) is not endpoint:
                del self._parts[name]

    def stop_all(self) -> None:
        self.closing = True
        for lane in self._lanes.values():
            self._stop(lane)
        self._lanes.clear()

    def _enqueue(self, lane: _Lane, msg: InMsg) -> None:
        try:
            lane.send.send_nowait(msg)
        except trio.WouldBlock:
            self._overflow(lane, msg)
            return
        lane.worker.held[msg.stream_seq] = msg
        lane.last_active = trio.current_time()
        if len(lane.worker.held) * 2 < lane.send.statistics().max_buffer_size:
            lane.overflowed = 0

    def _open(self, endpoint: Endpoint, consumer: PullConsumer) -> _Lane:
        assert self._nursery is not None
        name = endpoint.name
        parts = self._parts.get(name)
        if parts is None or parts[0] is not endpoint:
            parts = (endpoint, EndpointParts.build(self.context, endpoint))
            self._parts[name] = parts
        park = functools.partial(self.parking.park, name=name)
        worker = EndpointWorker(self.context, endpoint, consumer, parts[1], park=park)
        send, receive = trio.open_memory_channel[InMsg](lane_capacity(endpoint))
        lane = _Lane(worker, send, trio.Event(), trio.current_time())
        self._lanes[name] = lane
        self._nursery.start_soon(self._serve, lane, receive, self._retiring.get(name))
        return lane

    async def _serve(
        self, lane: _Lane, receive: trio.MemoryReceiveChannel[InMsg], previous: _Lane | None
    ) -> None:
        endpoint = lane.worker.endpoint
        try:
            if previous is not None:
                await previous.done.wait()
            await lane.worker.run_lane(receive, lane.stop)
            if endpoint.transport is not None and self.endpoints.get(endpoint.name) is not endpoint:
                with trio.CancelScope(shield=True):
                    await endpoint.transport.aclose()
        finally:
            lane.done.set()
            if self._retiring.get(endpoint.name) is lane:
                del self._retiring[endpoint.name]

    @staticmethod
    def _stop(lane: _Lane) -> None:
        lane.stop.set()
        lane.send.close()

    def _overflow(self, lane: _Lane, msg: InMsg) -> None:
        name = lane.worker.endpoint.name
        try:
            delivery = _delivery_decoder.decode(msg.data)
        except msgspec.DecodeError as exc:
            log.error("endpoint %s: dropping unreadable delivery seq %d: %s", name, msg.stream_seq, exc)
            self.broker.commit_later(Commit(ack=msg))
            return
        capacity = lane.send.statistics().max_buffer_size
        doublings = min(lane.overflowed // capacity, 6)
        delay = min(OVERFLOW_DELAY_MAX, OVERFLOW_DELAY * 2**doublings) + random.uniform(0, OVERFLOW_DELAY)
        lane.overflowed += 1
        self.context.metrics.deferrals.labels(name, "lane_full").inc()
        self.broker.commit_later(
            schedule_next(self.topology, name, msg, delivery, time.time() + delay, counted=False)
        )

    def _unknown(self, msg: InMsg, name: str) -> None:
        if msg.num_delivered < UNKNOWN_GIVE_UP:
            self.broker.commit_later(Commit(nak=msg, nak_delay=UNKNOWN_RETRY_DELAY))
            return
        log.warning(
            "dropping delivery seq %d for endpoint %s: no such endpoint here for a minute (deleted?)",
            msg.stream_seq,
            name,
        )
        self.broker.commit_later(Commit(ack=msg))

    async def _sweep(self, stopping: trio.Event) -> None:
        """Stop lanes idle for LANE_IDLE. Nothing runs between the check and the removal, so a
        delivery offered next opens a new lane rather than land in a closed one."""
        while not stopping.is_set():
            with trio.move_on_after(SWEEP_EVERY):
                await stopping.wait()
            now = trio.current_time()
            for name, lane in list(self._lanes.items()):
                if not lane.worker.held and now - lane.last_active >= LANE_IDLE:
                    del self._lanes[name]
                    with contextlib.suppress(trio.ClosedResourceError):
                        lane.send.close()
