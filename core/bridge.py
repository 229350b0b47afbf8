"""The only module that imports nats-py. It runs nats-py on its own asyncio loop in one thread.

nats-py is asyncio-only, and running it under trio-asyncio measured 5.6x slower than native. So the
client lives on a private asyncio loop in a dedicated thread, and trio code crosses into it with
`NatsBridge.run`. A crossing costs a fraction of a millisecond, so callers batch: every method here
takes or returns many messages per crossing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
import trio
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

log = logging.getLogger("hookgate.broker")

T = TypeVar("T")


class BrokerUnavailable(Exception):
    """The broker could not be reached or did not answer in time."""


@dataclass(frozen=True)
class ConnectOptions:
    servers: list[str]
    token: str | None = None
    user: str | None = None
    password: str | None = None
    creds_file: str | None = None
    tls: ssl.SSLContext | None = None
    name: str = "hookgate"


@dataclass(frozen=True)
class StreamSpec:
    name: str
    subjects: list[str]
    max_age: float  # seconds
    duplicate_window: float = 120.0
    replicas: int = 1
    allow_msg_schedules: bool = False


@dataclass(frozen=True)
class ConsumerSpec:
    stream: str
    durable: str
    filter_subject: str | None
    ack_wait: float
    max_ack_pending: int


@dataclass(frozen=True)
class OutMsg:
    subject: str
    data: bytes
    headers: dict[str, str] | None = None


@dataclass(frozen=True)
class PubResult:
    seq: int | None = None
    duplicate: bool = False
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class InMsg:
    subject: str
    data: bytes
    headers: dict[str, str]
    stream_seq: int
    num_delivered: int
    timestamp: float  # unix seconds when the stream stored it
    raw: Msg = field(repr=False)


@dataclass
class StoredMsg:
    subject: str
    data: bytes
    headers: dict[str, str]
    seq: int


class PullConsumer:
    """A bound pull subscription; only `NatsBridge` looks inside."""

    def __init__(self, sub: JetStreamContext.PullSubscription, spec: ConsumerSpec):
        self.sub = sub
        self.spec = spec


class NatsBridge:
    def __init__(self, options: ConnectOptions):
        self.options = options
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="nats-asyncio", daemon=True)
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._trio_token = trio.lowlevel.current_trio_token()

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, options: ConnectOptions) -> AsyncIterator[NatsBridge]:
        """Start the asyncio thread and connect; on exit drain the connection and stop the thread."""
        bridge = cls(options)
        bridge._thread.start()
        try:
            await bridge.run(bridge._connect)
            yield bridge
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await bridge.run(bridge._close)
            bridge._loop.call_soon_threadsafe(bridge._loop.stop)
            await trio.to_thread.run_sync(bridge._thread.join, 5)
            if not bridge._thread.is_alive():
                bridge._loop.close()

    async def run(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
        """Run a coroutine function on the nats loop and wait for it from trio (one crossing)."""
        future = asyncio.run_coroutine_threadsafe(fn(*args), self._loop)
        done = trio.Event()

        def wake(_: object) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                self._trio_token.run_sync_soon(done.set)

        future.add_done_callback(wake)
        try:
            await done.wait()
        except BaseException:
            future.cancel()
            raise
        return future.result()

    # --- connection ------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    async def _connect(self) -> None:
        o = self.options

        async def on_error(exc: Exception) -> None:
            log.warning("nats: %s", exc)

        async def on_disconnect() -> None:
            log.warning("disconnected from NATS; reconnecting")

        async def on_reconnect() -> None:
            url = self._nc.connected_url if self._nc else None
            log.info("reconnected to NATS at %s", url.netloc if url else "?")

        kwargs: dict[str, Any] = {
            "servers": o.servers,
            "name": o.name,
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 0.5,
            "connect_timeout": 2,
            "error_cb": on_error,
            "disconnected_cb": on_disconnect,
            "reconnected_cb": on_reconnect,
            # Keep publishing through short outages from a buffer rather than failing at once.
            "pending_size": 64 * 1024 * 1024,
        }
        if o.token:
            kwargs["token"] = o.token
        if o.user:
            kwargs["user"] = o.user
            kwargs["password"] = o.password
        if o.creds_file:
            kwargs["user_credentials"] = o.creds_file
        if o.tls is not None:
            kwargs["tls"] = o.tls
        try:
            self._nc = await nats.connect(**kwargs)
        except (nats.errors.NoServersError, OSError, TimeoutError, nats.errors.Error) as exc:
            servers = ", ".join(_redact(s) for s in o.servers)
            raise BrokerUnavailable(f"cannot connect to NATS at {servers}: {exc}") from None
        self._js = self._nc.jetstream(timeout=5)

    async def _close(self) -> None:
        if self._nc is not None and not self._nc.is_closed:
            # Acks were flushed as they were sent; draining pull subscriptions would only wait.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._nc.flush(), 2)
            with contextlib.suppress(Exception):
                await self._nc.close()

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise BrokerUnavailable("not connected to NATS")
        return self._js

    # --- topology --------------------------------------------------------------------------

    async def ensure_streams(self, specs: list[StreamSpec]) -> None:
        await self.run(self._ensure_streams, specs)

    async def _ensure_streams(self, specs: list[StreamSpec]) -> None:
        jsm = self.js._jsm
        for spec in specs:
            config = StreamConfig(
                name=spec.name,
                subjects=spec.subjects,
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
                discard=DiscardPolicy.OLD,
                max_age=spec.max_age,
                duplicate_window=spec.duplicate_window,
                num_replicas=spec.replicas,
                allow_msg_schedules=spec.allow_msg_schedules or None,
            )
            try:
                await jsm.stream_info(spec.name)
            except nats.js.errors.NotFoundError:
                await jsm.add_stream(config)
                log.info("created stream %s", spec.name)
            else:
                await jsm.update_stream(config)

    async def ensure_consumers(self, specs: list[ConsumerSpec]) -> list[PullConsumer]:
        return await self.run(self._ensure_consumers, specs)

    async def _ensure_consumers(self, specs: list[ConsumerSpec]) -> list[PullConsumer]:
        jsm = self.js._jsm
        out = []
        for spec in specs:
            config = ConsumerConfig(
                durable_name=spec.durable,
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                ack_wait=spec.ack_wait,
                max_ack_pending=spec.max_ack_pending,
                max_deliver=-1,
                filter_subject=spec.filter_subject,
            )
            # The server treats a create of an existing durable as an update of its settings.
            await jsm.add_consumer(spec.stream, config)
            sub = await self.js.pull_subscribe_bind(spec.durable, stream=spec.stream)
            out.append(PullConsumer(sub, spec))
        return out

    async def streams_present(self, names: list[str]) -> bool:
        async def check() -> bool:
            for name in names:
                await asyncio.wait_for(self.js._jsm.stream_info(name), 2)
            return True

        try:
            return await self.run(check)
        except Exception:
            return False

    # --- publishing ------------------------------------------------------------------------

    async def publish(self, msgs: list[OutMsg], timeout: float) -> list[PubResult]:
        """JetStream-publish many messages and wait for all their PubAcks, in one crossing."""
        return await self.run(self._publish, msgs, timeout)

    async def _publish(self, msgs: list[OutMsg], timeout: float) -> list[PubResult]:
        if self._nc is None or not self._nc.is_connected:
            return [PubResult(error="not connected to NATS")] * len(msgs)
        js = self.js
        futures: list[asyncio.Future[Any] | None] = []
        results: list[PubResult | None] = []
        for m in msgs:
            try:
                futures.append(
                    await js.publish_async(m.subject, m.data, wait_stall=timeout, headers=m.headers)
                )
                results.append(None)
            except Exception as exc:
                futures.append(None)
                results.append(PubResult(error=_describe(exc)))
        pending = [f for f in futures if f is not None]
        if pending:
            await asyncio.wait(pending, timeout=timeout)
        out = []
        for future, result in zip(futures, results, strict=True):
            if result is not None:
                out.append(result)
            elif future is None or not future.done():
                if future is not None:
                    future.cancel()
                out.append(PubResult(error="timed out waiting for JetStream"))
            elif future.exception() is not None:
                out.append(PubResult(error=_describe(future.exception())))
            else:
                ack = future.result()
                out.append(PubResult(seq=ack.seq, duplicate=bool(ack.duplicate)))
        return out

    async def publish_core(self, msgs: list[OutMsg]) -> None:
        """Plain NATS publish (no JetStream ack), flushed once."""

        async def go() -> None:
            if self._nc is None:
                raise BrokerUnavailable("not connected to NATS")
            for m in msgs:
                await self._nc.publish(m.subject, m.data, headers=m.headers)
            await self._nc.flush(timeout=5)

        await self.run(go)

    # --- consuming -------------------------------------------------------------------------

    async def fetch(self, consumer: PullConsumer, batch: int, timeout: float) -> list[InMsg]:
        """Up to `batch` messages; an empty list when none arrived within `timeout`."""
        return await self.run(self._fetch, consumer, batch, timeout)

    async def _fetch(self, consumer: PullConsumer, batch: int, timeout: float) -> list[InMsg]:
        try:
            msgs = await consumer.sub.fetch(batch, timeout=timeout)
        except (TimeoutError, nats.errors.TimeoutError):
            return []
        out = []
        for m in msgs:
            meta = m.metadata
            out.append(
                InMsg(
                    subject=m.subject,
                    data=m.data,
                    headers=dict(m.headers or {}),
                    stream_seq=meta.sequence.stream,
                    num_delivered=meta.num_delivered,
                    timestamp=meta.timestamp.timestamp(),
                    raw=m,
                )
            )
        return out

    async def settle(self, acks: list[InMsg], naks: list[InMsg] | None = None) -> None:
        """Ack and nak (redeliver now) many messages, then flush so the server has them."""
        await self.run(self._settle, acks, naks or [])

    async def _settle(self, acks: list[InMsg], naks: list[InMsg]) -> None:
        for m in acks:
            with contextlib.suppress(nats.errors.MsgAlreadyAckdError):
                await m.raw.ack()
        for m in naks:
            with contextlib.suppress(nats.errors.MsgAlreadyAckdError):
                await m.raw.nak()
        if self._nc is not None and self._nc.is_connected:
            await self._nc.flush(timeout=5)

    # --- reading streams (tests, inspection) -----------------------------------------------

    async def read_stream(
        self, stream: str, subject: str | None = None, limit: int = 10_000
    ) -> list[StoredMsg]:
        """Every message of a stream (optionally filtered), oldest first, without a consumer."""

        async def go() -> list[StoredMsg]:
            jsm = self.js._jsm
            info = await jsm.stream_info(stream)
            out: list[StoredMsg] = []
            seq = info.state.first_seq
            while seq <= info.state.last_seq and len(out) < limit:
                try:
                    raw = await jsm.get_msg(stream, seq=seq, next=True, subject=subject or ">")
                except nats.js.errors.NotFoundError:
                    break
                out.append(
                    StoredMsg(raw.subject or "", raw.data or b"", dict(raw.headers or {}), raw.seq or 0)
                )
                seq = (raw.seq or seq) + 1
            return out

        return await self.run(go)


def _describe(exc: BaseException | None) -> str:
    if isinstance(exc, nats.js.errors.NoStreamResponseError | nats.errors.NoRespondersError):
        return "no JetStream stream captures this subject"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _redact(url: str) -> str:
    """A server URL without credentials, for logs."""
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url
