"""The broker as trio code sees it: topology names, batched publishing and settling, consumers.

Everything crosses into nats-py through `hookgate.broker.bridge`. Concurrent callers are coalesced: each
`publish()` or `settle()` call waits on a shared batch that one flusher task sends in a single
crossing, so a hundred concurrent webhooks cost a handful of crossings, not a hundred.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import ssl
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime

import trio

from hookgate.broker import kv
from hookgate.broker.bridge import NatsBridge
from hookgate.broker.connect import ConnectOptions
from hookgate.broker.kv import Swapped
from hookgate.broker.messages import (
    BrokerRefused,
    Commit,
    ConsumerSpec,
    InMsg,
    KvUpdate,
    OutMsg,
    PubResult,
    StoredMsg,
    StreamSpec,
)
from hookgate.broker.pull import PullConsumer
from hookgate.config import BrokerConfig
from hookgate.observe.logs import Summary
from hookgate.plugin_kit.units import seconds

__all__ = ["MIN_SERVER_VERSION", "Broker", "Topology"]

log = logging.getLogger("hookgate.broker")

DELIVERY_DEDUP_WINDOW = 2 * 3600.0

# Retries are JetStream scheduled messages (`Nats-Schedule: @at ...`, ADR-51), which nats-server
# has since 2.12.0. An older server stores the schedule as a plain message on the schedules
# subject and never fires it, so every retry would be lost: it is refused at startup.
MIN_SERVER_VERSION = (2, 12, 0)
MIN_SERVER_NEEDS = "retries are JetStream scheduled messages, Nats-Schedule, new in nats-server 2.12"


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

    @property
    def ops_stream(self) -> str:
        return self.stream_prefix + "OPS"

    @property
    def endpoints_bucket(self) -> str:
        return self.stream_prefix + "ENDPOINTS"

    @property
    def endpoint_configs_bucket(self) -> str:
        """Endpoints created through the API, one JSON document per endpoint name."""
        return self.stream_prefix + "ENDPOINT_CONFIGS"

    @property
    def rates_bucket(self) -> str:
        """Shared rate limits: one key per endpoint, the time its token bucket is full again."""
        return self.stream_prefix + "RATES"

    @property
    def health_bucket(self) -> str:
        """Shared endpoint health: `circuit.<endpoint>` (open, half-open with its probe) and
        `failing.<endpoint>` (since when every attempt failed), followed by every replica."""
        return self.stream_prefix + "HEALTH"

    def ops_subject(self, kind: str) -> str:
        return f"{self.prefix}.ops.{kind}"

    def event_subject(self, source: str) -> str:
        return f"{self.prefix}.events.{source}"

    def publish_subject(self, event_type: str) -> str:
        return f"{self.prefix}.publish.{event_type}"

    @property
    def publish_prefix(self) -> str:
        return f"{self.prefix}.publish."

    # Deliveries. An endpoint's deliveries go to one of `shards` subjects, each read by one shard
    # consumer, so the consumer count stays bounded however many endpoints there are; the gateway
    # keeps each endpoint apart in its own lane (see hookgate.egress.lanes). Ordered endpoints keep
    # a consumer of their own, which hands out the next message only once the head is acked.
    # `shards` is fixed: changing it would strand deliveries stored under the old numbers.

    shards: int = 16

    def shard_of(self, endpoint: str) -> int:
        return zlib.crc32(endpoint.encode()) % self.shards

    def delivery_subject(self, endpoint: str, *, ordered: bool = False) -> str:
        if ordered:
            return f"{self.prefix}.deliveries.ordered.{endpoint}"
        return f"{self.prefix}.deliveries.{self.shard_of(endpoint)}.{endpoint}"

    def shard_filter(self, shard: int) -> str:
        return f"{self.prefix}.deliveries.{shard}.*"

    def parked_subject(self, endpoint: str) -> str:
        """Where a disabled endpoint's deliveries wait, out of their shard, until it is enabled."""
        return f"{self.prefix}.deliveries.parked.{endpoint}"

    @property
    def parked_filter(self) -> str:
        return f"{self.prefix}.deliveries.parked.*"

    def spill_subject(self, endpoint: str) -> str:
        """Where deliveries wait that found the endpoint's lane full: read at its pace from there."""
        return f"{self.prefix}.deliveries.spill.{endpoint}"

    @property
    def spill_filter(self) -> str:
        return f"{self.prefix}.deliveries.spill.*"

    @property
    def legacy_delivery_filter(self) -> str:
        """Deliveries stored by releases before the shards (one subject, and consumer, per endpoint)."""
        return f"{self.prefix}.deliveries.*"

    @staticmethod
    def endpoint_of(delivery_subject: str) -> str:
        return delivery_subject.rpartition(".")[2]

    def schedule_subject(self, endpoint: str, delivery_id: str, attempt: int) -> str:
        return f"{self.prefix}.schedules.{endpoint}.{delivery_id}.{attempt}"

    # The delivery log (see hookgate.broker.records). `endpoint` or `delivery_id` may be "*" in a filter.

    def delivery_log_subject(self, endpoint: str, delivery_id: str) -> str:
        """A delivery's creation record and its attempt records."""
        return f"{self.prefix}.log.deliveries.{endpoint}.{delivery_id}"

    def marker_subject(self, endpoint: str, delivery_id: str) -> str:
        """A delivery's state changes that are not attempts (few deliveries have any)."""
        return f"{self.prefix}.log.markers.{endpoint}.{delivery_id}"

    def routed_subject(self, event_key: str) -> str:
        return f"{self.prefix}.log.routed.{event_key}"

    def job_subject(self, key: str) -> str:
        return f"{self.prefix}.log.jobs.{key}"

    def dead_subject(self, endpoint: str, delivery_id: str) -> str:
        return f"{self.prefix}.dead.{endpoint}.{delivery_id}"

    @property
    def event_subjects(self) -> list[str]:
        return [f"{self.prefix}.events.>", f"{self.prefix}.publish.>"]

    def router_consumer(self) -> str:
        return "router"

    def shard_consumer(self, shard: int) -> str:
        return f"shard-{shard}"

    def ordered_consumer(self, endpoint: str) -> str:
        return f"ordered-{endpoint}"

    def parked_consumer(self, endpoint: str) -> str:
        return f"parked-{endpoint}"

    def spill_consumer(self, endpoint: str) -> str:
        return f"spill-{endpoint}"

    def legacy_consumer(self, endpoint: str) -> str:
        """An endpoint's own consumer in releases before the shards."""
        return f"endpoint-{endpoint}"

    def streams(self, config: BrokerConfig) -> list[StreamSpec]:
        retention = seconds(config.retention)
        dedup = seconds(config.dedup_window)
        replicas = config.replicas
        p = self.prefix
        return [
            StreamSpec(self.events_stream, self.event_subjects, retention, dedup, replicas),
            StreamSpec(
                self.deliveries_stream,
                [f"{p}.deliveries.>", f"{p}.schedules.>"],
                retention,
                # Only a router that redelivers its batch republishes a delivery, within minutes;
                # a shorter window than the events stream's halves the dedup memory.
                min(dedup, DELIVERY_DEDUP_WINDOW),
                replicas,
                allow_msg_schedules=True,
            ),
            StreamSpec(self.log_stream, [f"{p}.log.>"], retention, 120.0, replicas),
            StreamSpec(self.dead_stream, [f"{p}.dead.>"], retention, 120.0, replicas),
            StreamSpec(self.ops_stream, [f"{p}.ops.>"], retention, 120.0, replicas),
        ]


@dataclass
class _Pending:
    commit: Commit
    done: trio.Event | None  # None: the caller does not wait
    results: list[PubResult] = field(default_factory=list)


class Broker:
    """A connected broker: topology plus batched operations, used by ingress, router, dispatcher.

    `commit()` calls from concurrent tasks are queued and sent together: a flusher takes whatever
    is queued and crosses into nats-py once for all of it. Two flushers run, so one batch can be
    on its way while the next one gathers.
    """

    FLUSHERS = 2
    MAX_BATCH = 1024

    def __init__(self, bridge: NatsBridge, config: BrokerConfig, publish_timeout: float):
        self.bridge = bridge
        self.config = config
        self.topology = Topology(config.prefix)
        self.publish_timeout = publish_timeout
        self._queue: list[_Pending] = []
        self._wakeup = trio.Event()
        self._in_flight = 0
        self._idle = trio.Event()
        self._idle.set()
        # Publishers retry every few hundred ms through a leader election, each try a failed
        # store: one line per error, then a count every interval, not a line per try.
        self.store_failures = Summary(log, logging.WARNING)

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls,
        config: BrokerConfig,
        url: str | list[str],
        publish_timeout: float = 5.0,
        *,
        nkey_seed_file: str | None = None,
    ) -> AsyncIterator[Broker]:
        """`nkey_seed_file`: the embedded server's credentials (an external one's are in `config`)."""
        options = connect_options(config, url)
        if nkey_seed_file is not None:
            options = dataclasses.replace(options, nkey_seed_file=nkey_seed_file)
        async with NatsBridge.open(options) as bridge:
            broker = cls(bridge, config, publish_timeout)
            await bridge.ensure_streams(broker.topology.streams(config))
            await bridge.ensure_kv(broker.topology.endpoints_bucket, config.replicas)
            await bridge.ensure_kv(broker.topology.endpoint_configs_bucket, config.replicas)
            await bridge.ensure_kv(broker.topology.rates_bucket, config.replicas)
            await bridge.ensure_kv(broker.topology.health_bucket, config.replicas)
            async with trio.open_nursery() as nursery:
                for _ in range(cls.FLUSHERS):
                    nursery.start_soon(broker._flush)
                nursery.start_soon(broker.store_failures.run)
                try:
                    yield broker
                finally:
                    with trio.CancelScope(shield=True), trio.move_on_after(publish_timeout + 1):
                        await broker.drain()
                    nursery.cancel_scope.cancel()

    @property
    def connected(self) -> bool:
        return self.bridge.connected

    async def ready(self) -> bool:
        names = [s.name for s in self.topology.streams(self.config)]
        return self.connected and await self.bridge.streams_present(names)

    # --- publishing and settling ------------------------------------------------------------

    async def commit(self, commit: Commit) -> list[PubResult]:
        """Publish and settle as `commit` says, batched with concurrent callers; never raises."""
        pending = _Pending(commit, trio.Event())
        self._enqueue(pending)
        assert pending.done is not None
        await pending.done.wait()
        return pending.results

    def commit_later(self, commit: Commit) -> None:
        """Like commit(), without waiting for the outcome (acks after a delivery, attempt records)."""
        self._enqueue(_Pending(commit, None))

    async def publish(self, msg: OutMsg) -> PubResult:
        return (await self.commit(Commit([msg])))[0]

    async def commit_many(self, commits: list[Commit]) -> list[list[PubResult]]:
        """Send many commits in one crossing now (the router's batches)."""
        try:
            return await self.bridge.commit(commits, self.publish_timeout)
        except Exception as exc:
            return [[PubResult(error=f"{type(exc).__name__}: {exc}")] * len(c.publishes) for c in commits]

    async def drain(self) -> None:
        """Wait until everything queued has been sent (before disconnecting)."""
        while self._queue or self._in_flight:
            await self._idle.wait()

    def _enqueue(self, pending: _Pending) -> None:
        self._queue.append(pending)
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        self._wakeup.set()

    async def _flush(self) -> None:
        while True:
            await self._wakeup.wait()
            batch, self._queue = self._queue[: self.MAX_BATCH], self._queue[self.MAX_BATCH :]
            if not self._queue:
                self._wakeup = trio.Event()
            if not batch:
                continue
            self._in_flight += 1
            try:
                results = await self.commit_many([p.commit for p in batch])
                for pending, result in zip(batch, results, strict=True):
                    pending.results = result
                    if pending.done is not None:
                        pending.done.set()
                    late = pending.commit.late
                    if pending.commit.abandoned and late is not None:
                        for stored in result:
                            late(stored)
                    else:
                        for failed in result:
                            if not failed.ok:
                                error = failed.error or "unknown error"
                                self.store_failures.note(
                                    error,
                                    "could not store {count} more message(s) in {interval}: {key}",
                                    first=f"could not store a message: {error}",
                                )
            finally:
                self._in_flight -= 1
                if not self._queue and not self._in_flight:
                    self._idle.set()

    @staticmethod
    def due_at(schedule: StoredMsg) -> float | None:
        """When a scheduled message (`Nats-Schedule: @at <RFC 3339>`) is due, in unix seconds."""
        pattern = schedule.headers.get("Nats-Schedule", "")
        if not pattern.startswith("@at "):
            return None
        try:
            return datetime.fromisoformat(pattern[4:].strip().replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None

    async def fire_now(self, schedule: StoredMsg) -> PubResult:
        """Publish a pending scheduled message (`@at`) to its target now, as the server does when
        it is due, and remove the schedule in the same step.

        The server stores the message and purges the schedule's subject together, and only if
        `schedule` is still the last message on that subject: once the schedule fired (or another
        caller fired it) the result is an error that says "wrong last sequence", and nothing is
        published, so the target gets the message once.
        """
        target = schedule.headers.get("Nats-Schedule-Target")
        if target is None:
            return PubResult(error=f"{schedule.subject} holds no schedule")
        headers = {k: v for k, v in schedule.headers.items() if not k.lower().startswith("nats-")}
        headers.update(
            {
                "Nats-Scheduler": schedule.subject,
                "Nats-Schedule-Next": "purge",
                "Nats-Expected-Last-Subject-Sequence": str(schedule.seq),
                "Nats-Expected-Last-Subject-Sequence-Subject": schedule.subject,
            }
        )
        return await self.publish(OutMsg(target, schedule.data, headers))

    # --- consuming -------------------------------------------------------------------------

    async def consumers(self, specs: list[ConsumerSpec]) -> list[PullConsumer]:
        return await self.bridge.ensure_consumers(specs)

    async def fetch(self, consumer: PullConsumer, batch: int, timeout: float) -> list[InMsg]:
        return await self.bridge.fetch(consumer, batch, timeout)

    # --- reading the log back -----------------------------------------------------------------

    async def scan(
        self,
        stream: str,
        subjects: list[str],
        *,
        start_seq: int = 0,
        start_time: float | None = None,
        limit: int = 256,
    ) -> tuple[list[StoredMsg], bool]:
        return await self.bridge.scan(
            stream, subjects, start_seq=start_seq, start_time=start_time, limit=limit
        )

    async def last_msgs(self, stream: str, subjects: list[str]) -> dict[str, StoredMsg]:
        return await self.bridge.last_msgs(stream, subjects) if subjects else {}

    async def get_msg(self, stream: str, seq: int) -> StoredMsg | None:
        return await self.bridge.get_msg(stream, seq)

    async def purge_subject(self, stream: str, subject: str, before_seq: int | None = None) -> None:
        await self.bridge.purge_subject(stream, subject, before_seq)

    async def subject_counts(self, stream: str, subjects_filter: str) -> dict[str, int]:
        """Messages stored per subject matching the filter (subjects with none are left out)."""
        return await self.bridge.subject_counts(stream, subjects_filter)

    async def consumer_filters(self, stream: str) -> dict[str, str | None]:
        """Every durable consumer of a stream, by name, with its filter subject."""
        return await self.bridge.consumer_filters(stream)

    async def pending_counts(self, consumers: list[PullConsumer]) -> dict[str, int]:
        """What each consumer still has to hand out or see acked, by durable name."""
        return await self.bridge.pending_counts(consumers)

    async def consumer_backlog(self, stream: str, durable: str) -> int | None:
        """A consumer's backlog (pending plus unacknowledged), for a process that does not pull
        for it (an ingress process reading the router's); None if it does not exist."""
        return await self.bridge.consumer_backlog(stream, durable)

    async def kv_get_all(self, bucket: str) -> dict[str, bytes]:
        return await self.bridge.kv_get_all(bucket)

    async def kv_put(self, bucket: str, key: str, value: bytes) -> None:
        await self.bridge.kv_put(bucket, key, value)

    async def kv_get(self, bucket: str, key: str) -> KvUpdate | None:
        return await self.bridge.kv_get(bucket, key)

    async def kv_create(self, bucket: str, key: str, value: bytes) -> int | None:
        """The new key's revision, or None when it exists already (on any replica)."""
        return await self.bridge.kv_create(bucket, key, value)

    async def kv_update(self, bucket: str, key: str, value: bytes, revision: int) -> int | None:
        """The new revision, or None when the key changed since `revision`."""
        return await self.bridge.kv_update(bucket, key, value, revision)

    async def kv_delete(self, bucket: str, key: str, revision: int | None = None) -> int | None:
        """The delete marker's revision, or None when the key changed since `revision`."""
        return await self.bridge.kv_delete(bucket, key, revision)

    async def kv_swap(self, bucket: str, key: str, change: Callable[[bytes | None], bytes | None]) -> Swapped:
        """Replace a key's value by `change(current)` with compare-and-set, retried when another
        writer won, in one crossing (see `kv.swap`: `change` runs on the nats loop and must be pure)."""
        return await self.bridge.run(kv.swap, self.bridge.js, bucket, key, change)

    def watch_kv(
        self, bucket: str
    ) -> contextlib.AbstractAsyncContextManager[trio.MemoryReceiveChannel[list[KvUpdate]]]:
        """Every current value of a bucket as a first batch, then its changes as they happen."""
        return self.bridge.watch_kv(bucket)

    def give_back(self, consumer: PullConsumer, msgs: list[InMsg]) -> None:
        """Messages taken from `consumer` and not worked on go back for prompt redelivery: taken
        again, or nak'ed once the consumer is released. Never waits, so a cancelled task can call it."""
        self.bridge.give_back(consumer, msgs)

    async def release_consumer(self, consumer: PullConsumer) -> None:
        await self.bridge.release_consumer(consumer)

    async def delete_consumer(self, stream: str, durable: str) -> bool:
        """False when it was gone already: another replica deleted it."""
        return await self.bridge.delete_consumer(stream, durable)


def connect_options(config: BrokerConfig, url: str | list[str]) -> ConnectOptions:
    """The connection settings for nats-py; unusable TLS files raise BrokerRefused."""
    servers = [url] if isinstance(url, str) else list(url)
    tls = None
    if config.tls is not None:
        try:
            tls = ssl.create_default_context(cafile=config.tls.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise BrokerRefused(
                f"broker.tls.ca_file: cannot use {config.tls.ca_file}: {_reason(exc)}"
            ) from None
        if config.tls.cert_file:
            try:
                tls.load_cert_chain(config.tls.cert_file, config.tls.key_file)
            except (OSError, ssl.SSLError) as exc:
                key = f" with the key {config.tls.key_file}" if config.tls.key_file else ""
                raise BrokerRefused(
                    f"broker.tls.cert_file: cannot use {config.tls.cert_file}{key}: {_reason(exc)}"
                ) from None
    return ConnectOptions(
        servers=servers,
        token=config.token,
        user=config.user,
        password=config.password,
        creds_file=config.creds,
        nkey_seed_file=config.nkey_seed,
        tls=tls,
        min_server_version=MIN_SERVER_VERSION,
        min_server_needs=MIN_SERVER_NEEDS,
    )


def _reason(exc: OSError | ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return exc.strerror or str(exc)
