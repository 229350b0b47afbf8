"""The broker as trio code sees it: topology names, batched publishing and settling, consumers.

Everything crosses into nats-py through `hookgate.bridge`. Concurrent callers are coalesced: each
`publish()` or `settle()` call waits on a shared batch that one flusher task sends in a single
crossing, so a hundred concurrent webhooks cost a handful of crossings, not a hundred.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import trio

from hookgate.bridge import (
    BrokerUnavailable,
    ConnectOptions,
    ConsumerSpec,
    InMsg,
    NatsBridge,
    OutMsg,
    PubResult,
    PullConsumer,
    StoredMsg,
    StreamSpec,
)
from hookgate.config import BrokerConfig
from hookgate.units import seconds

__all__ = [
    "Broker",
    "BrokerUnavailable",
    "InMsg",
    "OutMsg",
    "PubResult",
    "PullConsumer",
    "StoredMsg",
    "Topology",
]

log = logging.getLogger("hookgate.broker")

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Topology:
    """Subject and stream names, all under one configurable prefix."""

    prefix: str = "hookgate"

    @property
    def stream_prefix(self) -> str:
        return self.prefix.upper().replace("-", "_").replace(".", "_") + "_"

    @property
    def events_stream(self) -> str:
        return self.stream_prefix + "EVENTS"

    @property
    def deliveries_stream(self) -> str:
        return self.stream_prefix + "DELIVERIES"

    @property
    def log_stream(self) -> str:
        return self.stream_prefix + "LOG"

    @property
    def dead_stream(self) -> str:
        return self.stream_prefix + "DEAD"

    def event_subject(self, source: str) -> str:
        return f"{self.prefix}.events.{source}"

    def publish_subject(self, event_type: str) -> str:
        return f"{self.prefix}.publish.{event_type}"

    @property
    def publish_prefix(self) -> str:
        return f"{self.prefix}.publish."

    def delivery_subject(self, endpoint: str) -> str:
        return f"{self.prefix}.deliveries.{endpoint}"

    def schedule_subject(self, endpoint: str, delivery_id: str, attempt: int) -> str:
        return f"{self.prefix}.schedules.{endpoint}.{delivery_id}.{attempt}"

    def attempt_subject(self, endpoint: str) -> str:
        return f"{self.prefix}.log.attempts.{endpoint}"

    def routed_subject(self, source: str) -> str:
        return f"{self.prefix}.log.routed.{source}"

    def dead_subject(self, endpoint: str) -> str:
        return f"{self.prefix}.dead.{endpoint}"

    def router_consumer(self) -> str:
        return "router"

    def endpoint_consumer(self, endpoint: str) -> str:
        return f"endpoint-{endpoint}"

    def streams(self, config: BrokerConfig) -> list[StreamSpec]:
        retention = seconds(config.retention)
        dedup = seconds(config.dedup_window)
        replicas = config.replicas
        p = self.prefix
        return [
            StreamSpec(self.events_stream, [f"{p}.events.>", f"{p}.publish.>"], retention, dedup, replicas),
            StreamSpec(
                self.deliveries_stream,
                [f"{p}.deliveries.>", f"{p}.schedules.>"],
                retention,
                dedup,
                replicas,
                allow_msg_schedules=True,
            ),
            StreamSpec(self.log_stream, [f"{p}.log.>"], retention, 120.0, replicas),
            StreamSpec(self.dead_stream, [f"{p}.dead.>"], retention, 120.0, replicas),
        ]


@dataclass
class _Pending(Generic[T, R]):
    item: T
    done: trio.Event = field(default_factory=trio.Event)
    result: R | None = None


class _Coalescer(Generic[T, R]):
    """Collects items from concurrent callers and hands them to `flush` in batches."""

    def __init__(self, name: str, max_batch: int):
        self.name = name
        self.max_batch = max_batch
        self._queue: list[_Pending[T, R]] = []
        self._wakeup = trio.Event()

    async def submit(self, item: T) -> R | None:
        pending: _Pending[T, R] = _Pending(item)
        self._queue.append(pending)
        self._wakeup.set()
        await pending.done.wait()
        return pending.result

    def take(self) -> list[_Pending[T, R]]:
        batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
        if not self._queue:
            self._wakeup = trio.Event()
        return batch

    async def wait(self) -> None:
        await self._wakeup.wait()


class Broker:
    """A connected broker: topology plus batched operations, used by ingress, router, dispatcher."""

    def __init__(self, bridge: NatsBridge, config: BrokerConfig, publish_timeout: float):
        self.bridge = bridge
        self.config = config
        self.topology = Topology(config.prefix)
        self.publish_timeout = publish_timeout
        self._publishes: _Coalescer[OutMsg, PubResult] = _Coalescer("publish", 512)
        self._acks: _Coalescer[tuple[InMsg, bool], None] = _Coalescer("settle", 1024)

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls, config: BrokerConfig, url: str | list[str], publish_timeout: float = 5.0
    ) -> AsyncIterator[Broker]:
        options = connect_options(config, url)
        async with NatsBridge.open(options) as bridge:
            broker = cls(bridge, config, publish_timeout)
            await bridge.ensure_streams(broker.topology.streams(config))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(broker._flush_publishes)
                nursery.start_soon(broker._flush_settles)
                try:
                    yield broker
                finally:
                    nursery.cancel_scope.cancel()

    @property
    def connected(self) -> bool:
        return self.bridge.connected

    async def ready(self) -> bool:
        names = [s.name for s in self.topology.streams(self.config)]
        return self.connected and await self.bridge.streams_present(names)

    # --- publishing ------------------------------------------------------------------------

    async def publish(self, msg: OutMsg) -> PubResult:
        """JetStream-publish one message, coalesced with concurrent publishes; never raises."""
        result = await self._publishes.submit(msg)
        return result if result is not None else PubResult(error="publish was not attempted")

    async def publish_many(self, msgs: list[OutMsg]) -> list[PubResult]:
        if not msgs:
            return []
        try:
            return await self.bridge.publish(msgs, self.publish_timeout)
        except Exception as exc:
            return [PubResult(error=f"{type(exc).__name__}: {exc}")] * len(msgs)

    async def _flush_publishes(self) -> None:
        while True:
            await self._publishes.wait()
            batch = self._publishes.take()
            if not batch:
                continue
            results = await self.publish_many([p.item for p in batch])
            for pending, result in zip(batch, results, strict=True):
                pending.result = result
                pending.done.set()

    async def publish_core(self, msgs: list[OutMsg]) -> None:
        await self.bridge.publish_core(msgs)

    # --- consuming -------------------------------------------------------------------------

    async def consumers(self, specs: list[ConsumerSpec]) -> list[PullConsumer]:
        return await self.bridge.ensure_consumers(specs)

    async def fetch(self, consumer: PullConsumer, batch: int, timeout: float) -> list[InMsg]:
        return await self.bridge.fetch(consumer, batch, timeout)

    async def ack(self, msg: InMsg) -> None:
        await self._acks.submit((msg, True))

    async def nak(self, msg: InMsg) -> None:
        """Ask for redelivery now (used on shutdown for deliveries that did not finish)."""
        await self._acks.submit((msg, False))

    async def settle_many(self, acks: list[InMsg], naks: list[InMsg] | None = None) -> None:
        await self.bridge.settle(acks, naks)

    async def _flush_settles(self) -> None:
        while True:
            await self._acks.wait()
            batch = self._acks.take()
            if not batch:
                continue
            acks = [p.item[0] for p in batch if p.item[1]]
            naks = [p.item[0] for p in batch if not p.item[1]]
            try:
                await self.bridge.settle(acks, naks)
            except Exception as exc:
                # An ack that did not reach the server means a redelivery later, never a loss.
                log.warning("could not ack %d messages: %s", len(batch), exc)
            for pending in batch:
                pending.done.set()

    async def read_stream(self, stream: str, subject: str | None = None) -> list[StoredMsg]:
        return await self.bridge.read_stream(stream, subject)


def connect_options(config: BrokerConfig, url: str | list[str]) -> ConnectOptions:
    servers = [url] if isinstance(url, str) else list(url)
    tls = None
    if config.tls is not None:
        tls = ssl.create_default_context(cafile=config.tls.ca_file)
        if config.tls.cert_file:
            tls.load_cert_chain(config.tls.cert_file, config.tls.key_file)
    return ConnectOptions(
        servers=servers,
        token=config.token,
        user=config.user,
        password=config.password,
        creds_file=config.creds,
        tls=tls,
    )
