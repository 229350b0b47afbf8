"""Parking: a disabled endpoint's deliveries wait outside their shard until it is enabled.

A shard consumer is shared by many endpoints, so a disabled endpoint's deliveries cannot wait in
it: they would hold its ack slots, or come round again and again. Instead each is moved to the
endpoint's parked subject (`Topology.parked_subject`). Once the endpoint is enabled, every process
that knows of parked deliveries moves them back, in order, through a consumer made for that
(`parked-<endpoint>`), deleted with the moved copies once the subject is empty.

Which endpoints have parked deliveries is read from the stream every PARKED_SCAN seconds (one
request for all of them), so a process learns of what another replica parked, or what was
parked before a restart.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from hookgate.broker import Broker, ConsumerSpec, InMsg
from hookgate.egress.endpoint import Endpoint
from hookgate.egress.forward import move_all, moved
from hookgate.egress.state import EndpointStates

log = logging.getLogger("hookgate.dispatcher")

PARKED_SCAN = 5.0  # how often the stream is asked which endpoints have parked deliveries
UNPARK_POLL = 1.0  # how soon an endpoint enabled in this process starts moving its deliveries back
UNPARK_RETRY = 5.0


class Parking:
    def __init__(self, broker: Broker, states: EndpointStates, endpoints: Callable[[], dict[str, Endpoint]]):
        self.broker = broker
        self.topology = broker.topology
        self.states = states
        self.endpoints = endpoints
        self.counts: dict[str, int] = {}  # parked deliveries per endpoint, as last read or parked here
        self._unparking: set[str] = set()

    def park(self, msg: InMsg, name: str) -> None:
        self.broker.commit_later(moved(msg, self.topology.parked_subject(name)))
        self.counts[name] = self.counts.get(name, 0) + 1

    async def run(self, stopping: trio.Event) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._scan, stopping)
            while not stopping.is_set():
                for name in list(self.counts):
                    if name not in self._unparking and self._may_unpark(name):
                        self._unparking.add(name)
                        nursery.start_soon(self._unpark, name, stopping)
                with trio.move_on_after(UNPARK_POLL):
                    await stopping.wait()

    def _may_unpark(self, name: str) -> bool:
        return name in self.endpoints() and not self.states.disabled(name)

    async def _scan(self, stopping: trio.Event) -> None:
        prefix = self.topology.parked_filter.removesuffix("*")
        while not stopping.is_set():
            try:
                stored = await self.broker.subject_counts(
                    self.topology.deliveries_stream, self.topology.parked_filter
                )
            except Exception as exc:
                log.debug("could not read which endpoints have parked deliveries: %s", exc)
            else:
                counts = {subject.removeprefix(prefix): n for subject, n in stored.items()}
                # Parked here since the read was sent: kept until the next read.
                self.counts = {**{k: v for k, v in self.counts.items() if k in self._unparking}, **counts}
            with trio.move_on_after(PARKED_SCAN):
                await stopping.wait()

    async def _unpark(self, name: str, stopping: trio.Event) -> None:
        spec = ConsumerSpec(
            self.topology.deliveries_stream,
            self.topology.parked_consumer(name),
            self.topology.parked_subject(name),
            ack_wait=30.0,
            max_ack_pending=1024,
            buffer=256,
        )

        def destination(_msg: InMsg) -> str:
            endpoint = self.endpoints().get(name)
            ordered = endpoint is not None and endpoint.config.ordered
            return self.topology.delivery_subject(name, ordered=ordered)

        try:
            log.info("endpoint %s: moving its parked deliveries back", name)
            done = await move_all(
                self.broker,
                spec,
                destination,
                lambda: not stopping.is_set() and self._may_unpark(name),
                purge=True,
            )
            if done:
                self.counts.pop(name, None)
        except Exception as exc:
            # Another replica may have finished and deleted the consumer under us.
            log.info("endpoint %s: moving parked deliveries back stopped: %s", name, exc)
            with trio.move_on_after(UNPARK_RETRY):
                await stopping.wait()
        finally:
            self._unparking.discard(name)
