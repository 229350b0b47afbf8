"""Consumers left by an earlier config or an earlier release, and the deliveries they still hold.

- `ordered-<endpoint>` of an endpoint that is no longer ordered: what waits in its ordered line
  moves to its shard, and the consumer goes.
- `endpoint-<endpoint>`: releases before the shards kept each endpoint's deliveries on
  `<prefix>.deliveries.<endpoint>` with a consumer of its own. Each one still present is drained
  into the endpoint's current subject and deleted. Retries those releases scheduled fire onto the
  old subjects until the retention ends, so the consumer LEGACY_CATCHER (created once, starting
  from its creation) moves whatever lands there for as long as the gateway runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from hookgate.broker import Broker, ConsumerSpec, InMsg
from hookgate.egress.endpoint import Endpoint
from hookgate.egress.forward import move_all

log = logging.getLogger("hookgate.dispatcher")

LEGACY_CATCHER = "legacy-deliveries"
ACK_WAIT = 30.0
RETRY_DELAY = 5.0


class Leftovers:
    def __init__(self, broker: Broker, endpoints: Callable[[], dict[str, Endpoint]]):
        self.broker = broker
        self.topology = broker.topology
        self.endpoints = endpoints

    async def run(self, stopping: trio.Event) -> None:
        """Look once at start (another replica may be moving the same ones: that is safe)."""
        t = self.topology
        try:
            filters = await self.broker.consumer_filters(t.deliveries_stream)
        except Exception as exc:
            log.warning("could not list the delivery consumers to move what earlier ones left: %s", exc)
            return
        legacy_prefix = t.legacy_delivery_filter.removesuffix("*")
        async with trio.open_nursery() as nursery:
            legacy_found = LEGACY_CATCHER in filters
            for durable, subject in filters.items():
                name = t.endpoint_of(subject or "")
                unordered = name in self.endpoints() and not self._ordered(name)
                if durable == t.ordered_consumer(name) and unordered:
                    nursery.start_soon(self._drain, durable, subject, stopping)
                elif durable == t.legacy_consumer(name) and subject == f"{legacy_prefix}{name}":
                    legacy_found = True
                    nursery.start_soon(self._drain, durable, subject, stopping)
            if legacy_found:
                nursery.start_soon(self._catch_legacy, stopping)

    def _ordered(self, name: str) -> bool:
        endpoint = self.endpoints().get(name)
        return endpoint is not None and endpoint.config.ordered

    def _destination(self, msg: InMsg) -> str:
        name = self.topology.endpoint_of(msg.subject)
        return self.topology.delivery_subject(name, ordered=self._ordered(name))

    def _spec(self, durable: str, subject: str | None, *, new_only: bool = False) -> ConsumerSpec:
        return ConsumerSpec(
            self.topology.deliveries_stream,
            durable,
            subject,
            ack_wait=ACK_WAIT,
            max_ack_pending=1 if durable.startswith("ordered-") else 1024,
            buffer=256,
            new_only=new_only,
        )

    async def _drain(self, durable: str, subject: str | None, stopping: trio.Event) -> None:
        log.info("moving the deliveries %s holds to their current subjects", durable)
        try:
            # The older release's copies are not purged: they expire with the retention.
            await move_all(
                self.broker,
                self._spec(durable, subject),
                self._destination,
                lambda: not stopping.is_set(),
                purge=durable.startswith("ordered-"),
            )
        except Exception as exc:
            log.warning("moving the deliveries %s holds stopped: %s", durable, exc)

    async def _catch_legacy(self, stopping: trio.Event) -> None:
        spec = self._spec(LEGACY_CATCHER, self.topology.legacy_delivery_filter, new_only=True)
        while not stopping.is_set():
            try:
                running = lambda: not stopping.is_set()  # noqa: E731
                await move_all(self.broker, spec, self._destination, running, purge=False, until_empty=False)
            except Exception as exc:
                log.warning("moving deliveries from the older layout's subjects failed: %s; again soon", exc)
                with trio.move_on_after(RETRY_DELAY):
                    await stopping.wait()
