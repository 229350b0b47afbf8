"""NatsBridge: the connection to NATS, and every broker operation as one crossing from trio into
the nats loop (see loop.py). Broker (facade.py) reaches nats-py only through it.

What each operation does on the nats loop lives beside it: admin (streams and consumers), pull
(consuming), commits (publishing and settling), reads (the delivery log), kv (key-value buckets).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
from collections.abc import AsyncIterator

import nats.errors
import trio
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.manager import JetStreamManager

from hookgate.broker import admin, kv, reads, transient
from hookgate.broker.commits import PubAcks
from hookgate.broker.connect import (
    PERMISSIONS_VIOLATION,
    ConnectOptions,
    check_credential_files,
    client_options,
    redact,
    refusal,
    where,
)
from hookgate.broker.loop import NatsLoop
from hookgate.broker.messages import (
    BrokerRefused,
    BrokerUnavailable,
    Commit,
    ConsumerSpec,
    InMsg,
    KvUpdate,
    PubResult,
    StoredMsg,
    StreamSpec,
)
from hookgate.broker.pull import PullConsumer, Waiter, give_back, take_queued, top_up_due

log = logging.getLogger("hookgate.broker")


class NatsBridge(NatsLoop):
    def __init__(self, options: ConnectOptions):
        super().__init__()
        self.options = options
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._manager: JetStreamManager | None = None
        self._pub_acks = PubAcks()
        self._consumers: list[PullConsumer] = []
        self._closing = False
        self._violations: collections.deque[str] = collections.deque(maxlen=5)

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, options: ConnectOptions) -> AsyncIterator[NatsBridge]:
        """Start the asyncio thread and connect; on exit drain the connection and stop the thread."""
        bridge = cls(options)
        bridge.start_thread()
        try:
            await bridge.run(bridge._connect)
            yield bridge
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await bridge.run(bridge._close)
            await bridge.stop_thread()

    # --- connection ------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    async def _connect(self) -> None:
        o = self.options
        check_credential_files(o)
        # While connecting, nats-py retries every failure forever (we ask it to: a sidecar's NATS
        # may start later). A server that answers and refuses us is not worth waiting for, so
        # once every server has refused, the attempt is cancelled and the refusal reported.
        refusals: list[str] = []
        connecting = True
        nc = Client()

        async def on_error(exc: Exception) -> None:
            refused = refusal(exc, o) if connecting else None
            if refused is not None:
                refusals.append(refused)
                if len(refusals) >= len(o.servers):
                    attempt.cancel()
                return
            if PERMISSIONS_VIOLATION in str(exc).lower():
                self._violations.append(str(exc))
            log.warning("nats: %s", exc)

        async def on_disconnect() -> None:
            if not self._closing:  # nats-py reports its own close as a disconnect too
                log.warning("disconnected from NATS; reconnecting")

        async def on_reconnect() -> None:
            for consumer in self._consumers:
                consumer.forget_requests()  # the server dropped them with the old connection
            url = nc.connected_url
            log.info("reconnected to NATS at %s", where(url))
            if (problem := self._version_problem()) is not None:
                log.error("%s", problem)

        servers = ", ".join(redact(s) for s in o.servers)
        attempt = asyncio.ensure_future(
            nc.connect(
                **client_options(o),
                error_cb=on_error,
                disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
            )
        )
        try:
            await attempt
        except asyncio.CancelledError:
            if not refusals:
                raise  # cancelled from outside
            with contextlib.suppress(Exception):
                await nc.close()
            raise BrokerRefused(refusals[-1]) from None
        except (nats.errors.NoServersError, OSError, TimeoutError, nats.errors.Error) as exc:
            raise BrokerUnavailable(f"cannot connect to NATS at {servers}: {exc}") from None
        finally:
            connecting = False
        self._nc = nc
        if (problem := self._version_problem()) is not None:
            await self._close()
            raise BrokerRefused(problem)
        self._js = nc.jetstream(timeout=5)
        self._manager = nc.jsm(timeout=5)

    @property
    def server_version(self) -> str:
        """The version of the nats-server we are connected to, as it says ("2.15.1")."""
        version = self._server_version()
        return ".".join(str(n) for n in version) if version is not None else "unknown"

    def _server_version(self) -> tuple[int, int, int] | None:
        if self._nc is None:
            return None
        version = self._nc.connected_server_version
        try:
            return (version.major, version.minor, version.patch)
        except ValueError:  # not semantic versioning: a server we cannot judge
            return None

    def _version_problem(self) -> str | None:
        """Why the connected server is too old for us, or None."""
        needed = self.options.min_server_version
        found = self._server_version()
        if needed is None or found is None or found >= needed:
            return None
        url = self._nc.connected_url if self._nc is not None else None
        return (
            f"nats-server {'.'.join(map(str, found))} at {where(url)} is too old: hookgate needs "
            f"nats-server {'.'.join(map(str, needed))} or newer ({self.options.min_server_needs})"
        )

    def permission_violations(self) -> list[str]:
        """The latest permission violations the server reported (publishes or subscriptions refused)."""
        return list(self._violations)

    async def _close(self) -> None:
        self._closing = True
        if self._nc is not None and not self._nc.is_closed:
            # What a consumer still holds goes back for prompt redelivery (see PullConsumer.stop).
            await asyncio.gather(*(c.stop() for c in self._consumers))
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._nc.flush(), 2)
            with contextlib.suppress(Exception):
                await self._nc.close()

    @property
    def _client(self) -> Client:
        if self._nc is None:
            raise BrokerUnavailable("not connected to NATS")
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise BrokerUnavailable("not connected to NATS")
        return self._js

    @property
    def jsm(self) -> JetStreamManager:
        """Streams and consumers: nats-py's JetStream API for managing them."""
        if self._manager is None:
            raise BrokerUnavailable("not connected to NATS")
        return self._manager

    # --- topology --------------------------------------------------------------------------

    async def ensure_streams(self, specs: list[StreamSpec]) -> None:
        async def go(jsm: JetStreamManager) -> None:
            for spec in specs:
                with admin.jetstream_errors(f"stream {spec.name}", self._violations):
                    await admin.ensure_stream(jsm, spec)

        await self.run(go, self.jsm)

    async def ensure_consumers(self, specs: list[ConsumerSpec]) -> list[PullConsumer]:
        async def go(nc: Client, jsm: JetStreamManager) -> list[PullConsumer]:
            out = []
            for spec in specs:
                what = f"consumer {spec.durable} of stream {spec.stream}"

                async def create(spec: ConsumerSpec = spec, what: str = what) -> PullConsumer:
                    with admin.jetstream_errors(what, self._violations):
                        return await admin.ensure_consumer(nc, jsm, spec)

                # Outside the gateway's startup retry: a new cluster's timeouts and 503s are
                # waited out here, and only a refusal stops at once.
                consumer = await transient.retrying(
                    what, create, attempts=transient.SETUP_ATTEMPTS, budget=transient.SETUP_BUDGET
                )
                self._consumers.append(consumer)
                out.append(consumer)
            return out

        return await self.run(go, self._client, self.jsm)

    async def release_consumer(self, consumer: PullConsumer) -> None:
        """Stop pulling for a consumer this process no longer serves; what it buffered is nak'ed."""

        async def go() -> None:
            if consumer in self._consumers:
                self._consumers.remove(consumer)
            await consumer.stop()

        await self.run(go)

    async def delete_consumer(self, stream: str, durable: str) -> bool:
        """Delete a durable consumer; False when it was gone already (another replica deleted it)."""
        return await self.run(admin.delete_consumer, self.jsm, stream, durable)

    async def purge_subject(self, stream: str, subject: str, before_seq: int | None = None) -> None:
        """Remove the messages on `subject` (wildcards allowed) from a stream: all of them, or
        those stored before `before_seq`."""
        await self.run(admin.purge_subject, self.jsm, stream, subject, before_seq)

    async def subject_counts(self, stream: str, subjects_filter: str) -> dict[str, int]:
        """Messages stored per subject matching the filter (subjects with none are left out)."""
        return await self.run(admin.subject_counts, self.jsm, stream, subjects_filter)

    async def consumer_filters(self, stream: str) -> dict[str, str | None]:
        return await self.run(admin.consumer_filters, self.jsm, stream)

    async def streams_present(self, names: list[str]) -> bool:
        try:
            return await self.run(admin.streams_present, self.jsm, names)
        except Exception:
            return False

    async def pending_counts(self, consumers: list[PullConsumer]) -> dict[str, int]:
        """Messages each consumer has not yet been handed (its backlog), by durable name."""
        return await self.run(admin.pending_counts, self.jsm, consumers)

    async def consumer_backlog(self, stream: str, durable: str) -> int | None:
        return await self.run(admin.consumer_backlog, self.jsm, stream, durable)

    # --- publishing, settling and consuming -------------------------------------------------

    async def commit(self, commits: list[Commit], timeout: float) -> list[list[PubResult]]:
        """Publish every commit's messages, wait for their PubAcks, then settle, in one crossing."""
        return await self.run(self._pub_acks.commit, self._nc, commits, timeout)

    async def fetch(self, consumer: PullConsumer, batch: int, timeout: float) -> list[InMsg]:
        """Up to `batch` messages; an empty list when none arrived within `timeout`.

        Taken from the consumer's queue in trio (see pull.py): the nats loop is asked only to
        top the pull up, once half the buffer was taken, or after a wait that found nothing (a
        request lost with a reconnect)."""
        self._top_up_if_due(consumer)
        if consumer.queue:
            await trio.lowlevel.checkpoint()  # a busy consumer must not starve other tasks
        else:
            arrived = trio.Event()
            consumer.waiter = Waiter(functools.partial(self.call_in_trio, arrived.set))
            try:
                if not consumer.queue:
                    with trio.move_on_after(timeout) as waited:
                        await arrived.wait()
                    if waited.cancelled_caught:
                        consumer.taken_since_top_up = consumer.buffer
            finally:
                consumer.waiter = None
        msgs = take_queued(consumer, batch)
        self._top_up_if_due(consumer)
        return msgs

    def _top_up_if_due(self, consumer: PullConsumer) -> None:
        if top_up_due(consumer):
            self._loop.call_soon_threadsafe(consumer.top_up_soon)

    def give_back(self, consumer: PullConsumer, msgs: list[InMsg]) -> None:
        """Return taken messages to their consumer (see `pull.give_back`) without waiting, so a
        cancelled task can call it. It reaches the nats loop before any later call from trio,
        such as the release of the consumer."""
        self.submit(give_back, consumer, msgs)

    # --- reading streams back (the delivery log) ----------------------------------------------

    async def scan(
        self,
        stream: str,
        subjects: list[str],
        *,
        start_seq: int = 0,
        start_time: float | None = None,
        limit: int = 256,
    ) -> tuple[list[StoredMsg], bool]:
        """Up to `limit` stored messages on `subjects` from `start_seq` (or `start_time`) on, in
        stream order, and whether more follow (see reads.scan)."""

        async def go(js: JetStreamContext) -> tuple[list[StoredMsg], bool]:
            return await transient.retrying(
                f"reading stream {stream}",
                lambda: reads.scan(
                    js, stream, subjects, start_seq=start_seq, start_time=start_time, limit=limit
                ),
            )

        return await self.run(go, self.js)

    async def last_msgs(self, stream: str, subjects: list[str]) -> dict[str, StoredMsg]:
        """The last message stored on each subject (absent when there is none), read concurrently."""

        async def go(jsm: JetStreamManager) -> dict[str, StoredMsg]:
            return await transient.retrying(
                f"reading stream {stream}", lambda: reads.last_msgs(jsm, stream, subjects)
            )

        return await self.run(go, self.jsm)

    async def get_msg(self, stream: str, seq: int) -> StoredMsg | None:
        async def go(jsm: JetStreamManager) -> StoredMsg | None:
            return await transient.retrying(
                f"reading stream {stream}", lambda: reads.get_msg(jsm, stream, seq)
            )

        return await self.run(go, self.jsm)

    # --- key-value state ----------------------------------------------------------------------

    async def ensure_kv(self, bucket: str, replicas: int) -> None:
        async def go(js: JetStreamContext) -> None:
            with admin.jetstream_errors(f"key-value bucket {bucket}", self._violations):
                await kv.ensure(js, bucket, replicas)

        await self.run(go, self.js)

    async def kv_get_all(self, bucket: str) -> dict[str, bytes]:
        """Every key's current value (a small bucket: endpoint states)."""
        return await self.run(kv.get_all, self.js, bucket)

    async def kv_put(self, bucket: str, key: str, value: bytes) -> None:
        await self.run(kv.put, self.js, bucket, key, value)

    async def kv_get(self, bucket: str, key: str) -> KvUpdate | None:
        """A key's current value and revision; None when it does not exist or was deleted."""
        return await self.run(kv.get, self.js, bucket, key)

    async def kv_create(self, bucket: str, key: str, value: bytes) -> int | None:
        """Store a new key and return its revision; None when the key exists."""
        return await self.run(kv.create, self.js, bucket, key, value)

    async def kv_update(self, bucket: str, key: str, value: bytes, revision: int) -> int | None:
        """Replace a key's value if it is still at `revision`; the new revision, or None if it moved."""
        return await self.run(kv.update, self.js, bucket, key, value, revision)

    async def kv_delete(self, bucket: str, key: str, revision: int | None = None) -> int | None:
        """Delete a key (at `revision`, if given); the revision of the delete marker, or None if
        the key moved on meanwhile."""
        return await self.run(kv.delete, self.js, bucket, key, revision)

    @contextlib.asynccontextmanager
    async def watch_kv(self, bucket: str) -> AsyncIterator[trio.MemoryReceiveChannel[list[KvUpdate]]]:
        """Follow a bucket from trio: batches of updates, the first with every current value (see
        kv.watch)."""
        async with kv.watch(self, self.js, bucket) as updates:
            yield updates
