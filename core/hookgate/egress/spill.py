"""Spilling: deliveries that find their endpoint's lane full wait on a subject of the endpoint's own.

A shard carries many endpoints, so it cannot wait for one of them. When an endpoint's lane is full
(a backlog draining, or an endpoint that hangs), what else the shard brings for it is moved once
to `<prefix>.deliveries.spill.<endpoint>`, and a consumer of that subject (`spill-<endpoint>`)
feeds the lane as it has room: the endpoint is read at its own pace, and only while it is behind.
Once the subject is empty the consumer is deleted and the moved copies purged. Every SPILL_SCAN
seconds the stream is asked which endpoints have spilled deliveries, so a process also drains what
another one spilled, or what was spilled before a restart.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

import trio

from hookgate.broker import Broker, ConsumerSpec, InMsg, PullConsumer
from hookgate.egress.forward import consumer_until, moved

log = logging.getLogger("hookgate.dispatcher")

SPILL_SCAN = 5.0
SPILL_BATCH = 256
SPILL_MAX_ACK_PENDING = 1024
FETCH_WAIT = 1.0
ROOM_WAIT = 1.0  # the longest a drainer waits for its lane to have room before it looks again
ACK_WAIT = 30.0


class LaneRoom(Protocol):
    """What a drainer needs of the lanes."""

    def room(self, name: str) -> int:
        """Deliveries the endpoint's lane can take now."""
        ...

    def take(self, consumer: PullConsumer, msg: InMsg) -> None:
        """Queue a delivery in its lane, or give it back to `consumer` if the lane is full."""
        ...

    async def wait_for_room(self, name: str, timeout: float) -> None: ...


class Spills:
    def __init__(self, broker: Broker, lanes: LaneRoom, known: Callable[[str], bool]):
        self.broker = broker
        self.topology = broker.topology
        self.lanes = lanes
        self.known = known  # whether an endpoint of that name exists
        self._draining: set[str] = set()
        self.counts: dict[str, int] = {}  # spilled deliveries stored per endpoint, as last read
        self._nursery: trio.Nursery | None = None
        self._stopping: trio.Event | None = None

    def spill(self, msg: InMsg, name: str) -> None:
        self.broker.commit_later(moved(msg, self.topology.spill_subject(name)))
        self._start(name)

    async def run(self, stopping: trio.Event) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery, self._stopping = nursery, stopping
            prefix = self.topology.spill_filter.removesuffix("*")
            while not stopping.is_set():
                try:
                    stored = await self.broker.subject_counts(
                        self.topology.deliveries_stream, self.topology.spill_filter
                    )
                except Exception as exc:
                    log.debug("could not read which endpoints have spilled deliveries: %s", exc)
                else:
                    self.counts = {subject.removeprefix(prefix): n for subject, n in stored.items()}
                    for name in self.counts:
                        self._start(name)
                with trio.move_on_after(SPILL_SCAN):
                    await stopping.wait()
            self._nursery = None

    def _start(self, name: str) -> None:
        if name not in self._draining and self._nursery is not None and self.known(name):
            self._draining.add(name)
            self._nursery.start_soon(self._drain, name)

    async def _drain(self, name: str) -> None:
        assert self._stopping is not None
        stopping = self._stopping
        t = self.topology
        spec = ConsumerSpec(
            t.deliveries_stream,
            t.spill_consumer(name),
            t.spill_subject(name),
            ack_wait=ACK_WAIT,
            max_ack_pending=SPILL_MAX_ACK_PENDING,
            buffer=SPILL_BATCH,
        )
        try:
            # At the stream's consumer limit, the deliveries wait on the subject meanwhile.
            consumer = await consumer_until(self.broker, spec, stopping, max_backoff=30.0)
            if consumer is not None:
                await self._feed(name, spec, consumer, stopping)
        except Exception as exc:
            log.warning("endpoint %s: draining its spilled deliveries stopped: %s", name, exc)
        finally:
            self._draining.discard(name)

    async def _feed(
        self, name: str, spec: ConsumerSpec, consumer: PullConsumer, stopping: trio.Event
    ) -> None:
        """Hand the lane what it has room for, until the subject is empty."""
        last = 0
        empty = False
        try:
            while not stopping.is_set() and self.known(name):
                room = self.lanes.room(name)
                if room <= 0:
                    await self.lanes.wait_for_room(name, ROOM_WAIT)
                    continue
                msgs = await self.broker.fetch(consumer, min(room, SPILL_BATCH), FETCH_WAIT)
                for msg in msgs:
                    self.lanes.take(consumer, msg)
                    last = max(last, msg.stream_seq)
                if not msgs and (await self.broker.pending_counts([consumer])).get(spec.durable, 1) == 0:
                    empty = True
                    break
        finally:
            with trio.CancelScope(shield=True):
                await self.broker.release_consumer(consumer)
        if empty:
            await self.broker.delete_consumer(spec.stream, spec.durable)
            if last and spec.filter_subject is not None:
                await self.broker.purge_subject(spec.stream, spec.filter_subject, last + 1)
