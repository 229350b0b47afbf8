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
from hookgate.egress.worker import KEEPALIVE, MARK_DELIVERING_AFTER, EndpointWorker
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
    """One endpoint's queue in this process, and the tasks that take from it.

    Tasks start as deliveries wait, up to the endpoint's `concurrency`, and stay until the lane
    closes; a lane that only ever has one delivery at a time runs one task.
    """

    worker: EndpointWorker
    send: trio.MemorySendChannel[InMsg]
    receive: trio.MemoryReceiveChannel[InMsg]
    last_active: float
    stop: trio.Event = field(default_factory=trio.Event)  # stop now: shutdown, or a changed config
    closed: trio.Event = field(default_factory=trio.Event)  # nothing more comes (stopped, or idle)
    done: trio.Event = field(default_factory=trio.Event)
    overflowed: int = 0  # deliveries deferred since the lane last had room to spare
    tasks: int = 0
    nursery: trio.Nursery | None = None

    def close(self) -> None:
        self.send.close()
        self.closed.set()

    def add_task_if_needed(self) -> None:
        """A delivery was queued: start a task if none is free to take it."""
        stats = self.send.statistics()
        if (
            self.nursery is not None
            and stats.current_buffer_used > 0
            and stats.tasks_waiting_receive == 0
            and self.tasks < self.worker.concurrency
        ):
            self.tasks += 1
            self.nursery.start_soon(self._take)

    async def _take(self) -> None:
        worker = self.worker
        while True:
            try:
                msg = await self.receive.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                return
            try:
                await worker.work_on(msg)
            finally:
                worker.held.pop(msg.stream_seq, None)


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
        self._lanes: dict[str, _Lane] = {}  # the lanes deliveries go to, by endpoint
        self._running: set[_Lane] = set()  # those, and stopped ones still finishing
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
                nursery.start_soon(self._keep_alive)
                task_status.started()
                await stopping.wait()
                self.stop_all()
                while self._running:  # each finishes within the grace period
                    await next(iter(self._running)).done.wait()
                nursery.cancel_scope.cancel()  # the keep-alives, once nothing is held
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
        lane.add_task_if_needed()
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
        lane = _Lane(worker, send, receive, trio.current_time())
        self._lanes[name] = lane
        self._running.add(lane)
        self._nursery.start_soon(self._serve, lane, self._retiring.get(name))
        return lane

    async def _serve(self, lane: _Lane, previous: _Lane | None) -> None:
        """Run the lane's tasks until it closes; stopped, in-flight deliveries get the grace
        period, and those not started go back to the shard."""
        endpoint = lane.worker.endpoint
        try:
            if previous is not None:
                await previous.done.wait()
            working = trio.CancelScope()
            async with trio.open_nursery() as around:
                around.start_soon(self._stop_when_set, lane, working)
                with working:
                    async with trio.open_nursery() as tasks:
                        lane.nursery = tasks
                        for _ in range(len(lane.worker.held)):  # queued while `previous` finished
                            lane.add_task_if_needed()
                        await lane.closed.wait()
                        lane.nursery = None
                self._hand_back_waiting(lane)
                around.cancel_scope.cancel()
            if endpoint.transport is not None and self.endpoints.get(endpoint.name) is not endpoint:
                with trio.CancelScope(shield=True):
                    await endpoint.transport.aclose()
        finally:
            lane.done.set()
            self._running.discard(lane)
            if self._retiring.get(endpoint.name) is lane:
                del self._retiring[endpoint.name]

    async def _stop_when_set(self, lane: _Lane, working: trio.CancelScope) -> None:
        await lane.stop.wait()
        lane.worker.stopping = True  # what its tasks take from here on goes back to the shard
        working.deadline = trio.current_time() + self.context.grace

    def _hand_back_waiting(self, lane: _Lane) -> None:
        """What still waits in a lane cut off by the grace period was never started."""
        waiting = []
        with contextlib.suppress(trio.WouldBlock, trio.EndOfChannel):
            while True:
                waiting.append(lane.receive.receive_nowait())
        for msg in waiting:
            lane.worker.held.pop(msg.stream_seq, None)
        if waiting:
            self.broker.give_back(lane.worker.consumer, waiting)

    async def _keep_alive(self) -> None:
        """For every lane at once: tell the server what lanes hold is still being worked on (see
        `EndpointWorker._keep_alive`), and mark long attempts `delivering`."""
        last_keep_alive = trio.current_time()
        while True:
            await trio.sleep(MARK_DELIVERING_AFTER)
            for lane in self._running:
                if lane.worker.in_flight:
                    lane.worker.mark_long_attempts()
            if trio.current_time() - last_keep_alive >= KEEPALIVE:
                last_keep_alive = trio.current_time()
                held = [msg for lane in self._running for msg in lane.worker.held.values()]
                if held:
                    self.broker.commit_later(Commit(in_progress=held))

    @staticmethod
    def _stop(lane: _Lane) -> None:
        lane.stop.set()
        lane.close()

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
                    lane.close()
