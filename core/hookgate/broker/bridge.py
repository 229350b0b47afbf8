"""The only module that imports nats-py. It runs nats-py on its own asyncio loop in one thread.

nats-py is asyncio-only, and running it under trio-asyncio measured 5.6x slower than native. So the
client lives on a private asyncio loop in a dedicated thread, and trio code crosses into it with
`NatsBridge.run`. A crossing costs a fraction of a millisecond, so callers batch: every method here
takes or returns many messages per crossing.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import json
import logging
import math
import re
import ssl
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import msgspec
import nats
import nats.errors
import nats.js.errors
import nkeys
import trio
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
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
# How long a PubAck that came too late is still listened for (see Commit.late).
LATE_WINDOW = 600.0


class BrokerUnavailable(Exception):
    """The broker could not be reached or did not answer in time."""


class BrokerRefused(BrokerUnavailable):
    """The broker answered and refused us: credentials, TLS, permissions, its version. Retrying the
    same settings cannot help, so the gateway stops with this message instead."""


@dataclass(frozen=True)
class ConnectOptions:
    servers: list[str]
    token: str | None = field(default=None, repr=False)
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    creds_file: str | None = None
    nkey_seed_file: str | None = None
    tls: ssl.SSLContext | None = None
    name: str = "hookgate"
    # The oldest nats-server version that has what we use, and what that is (for the message).
    min_server_version: tuple[int, int, int] | None = None
    min_server_needs: str = ""


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
    buffer: int = 64  # messages pulled ahead of the caller


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


@dataclass(frozen=True)
class KvUpdate:
    """One change in a KV bucket: a key's new value, or None once it was deleted or purged."""

    key: str
    value: bytes | None
    revision: int


@dataclass
class InMsg:
    subject: str
    data: bytes
    headers: dict[str, str]
    stream_seq: int
    num_delivered: int
    timestamp: float  # unix seconds when the stream stored it
    raw: Msg = field(repr=False)


@dataclass(frozen=True)
class StoredMsg:
    """A message read back from a stream (the delivery log), not consumed."""

    subject: str
    data: bytes
    headers: dict[str, str]
    seq: int
    timestamp: float  # unix seconds when the stream stored it


@dataclass
class Commit:
    """Messages to publish and a message to settle once they are stored.

    `ack` is acked when the first `required` publishes succeeded; otherwise it is nak'ed after
    `nak_delay` seconds (0: at once), or left for redelivery after ack_wait when that is None.
    """

    publishes: list[OutMsg] = field(default_factory=list)
    ack: InMsg | None = None
    required: int = 0
    nak_delay: float | None = None
    nak: InMsg | None = None  # nak'ed unconditionally: redelivered after `nak_delay`, or at once
    # Still being worked on: restart their ack_wait timers (with every message still queued in
    # `keep_queued`'s pull buffer), so a crash is noticed after ack_wait, not after the longest job.
    in_progress: list[InMsg] = field(default_factory=list)
    keep_queued: PullConsumer | None = None
    # Told of a publish whose PubAck arrives after the wait for it timed out (within LATE_WINDOW):
    # the message may be stored after all. Called on the nats thread, so it must be quick and
    # thread-safe (a metric's inc).
    late: Callable[[PubResult], None] | None = None
    abandoned: bool = False  # the caller stopped waiting: results that come are late (see Broker)


class _PubAck(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: dict[str, Any] | None = None


_puback = msgspec.json.Decoder(_PubAck)


def _pub_result(msg: Msg) -> PubResult:
    if not msg.data:
        status = (msg.headers or {}).get("Status")
        if status == "503":
            return PubResult(error="no JetStream stream captures this subject")
        return PubResult(error=f"JetStream answered status {status}")
    try:
        ack = _puback.decode(msg.data)
    except msgspec.DecodeError:
        return PubResult(error="unreadable PubAck")
    if ack.error is not None:
        return PubResult(error=f"JetStream error: {ack.error.get('description', ack.error)}")
    return PubResult(seq=ack.seq, duplicate=ack.duplicate)


class PullConsumer:
    """A continuous pull from a durable consumer, kept topped up on the nats loop.

    nats-py's fetch() waits for its whole batch once it long-polls, so a lone message could sit
    for the full wait, and it costs a task per message. Instead this keeps pull requests
    outstanding for up to `buffer` messages (each expiring after PULL_EXPIRES), queues what
    arrives, and hands queued messages to trio as soon as there are any.
    """

    PULL_EXPIRES = 30.0
    DRAIN_TIMEOUT = 2.0  # the unsubscribe's round trip at stop; a lost connection has no requests

    def __init__(self, nc: Client, spec: ConsumerSpec, buffer: int):
        self.nc = nc
        self.spec = spec
        self.buffer = buffer
        self.api_subject = f"$JS.API.CONSUMER.MSG.NEXT.{spec.stream}.{spec.durable}"
        self.inbox = f"_INBOX.hgpull{nc._nuid.next().decode()}"
        self.queue: collections.deque[Msg] = collections.deque()
        # Outstanding pull requests, oldest first: [messages still owed, expiry (loop time)].
        self.requests: collections.deque[list[float]] = collections.deque()
        self.arrived = asyncio.Event()
        self.stopped = False
        self._topping_up: asyncio.Future[None] | None = None
        self._sub: Subscription | None = None

    @property
    def owed(self) -> int:
        return int(sum(r[0] for r in self.requests))

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(self.inbox, cb=self._on_message, pending_msgs_limit=1_000_000)

    async def _on_message(self, msg: Msg) -> None:
        status = (msg.headers or {}).get("Status") if not msg.data else None
        if status is None:
            self._settle_owed(1)
            # Once stopped, what still arrives is kept for stop() to hand back after the unsubscribe.
            self.queue.append(msg)
            self.arrived.set()
        elif status in ("404", "408", "409"):
            # No messages / request expired / request ended: it owes what it did not deliver.
            pending = (msg.headers or {}).get("Nats-Pending-Messages")
            if self.requests:
                if pending is not None and pending.isdigit():
                    self.requests[0][0] -= min(int(pending), self.requests[0][0])
                else:
                    self.requests[0][0] = 0
                self._drop_settled()
        # 100 (idle heartbeat) needs nothing.

    def _settle_owed(self, count: int) -> None:
        while count and self.requests:
            take = min(count, int(self.requests[0][0]))
            self.requests[0][0] -= take
            count -= take
            self._drop_settled()
            if take == 0:
                break

    def _drop_settled(self) -> None:
        while self.requests and self.requests[0][0] <= 0:
            self.requests.popleft()

    async def top_up(self) -> None:
        now = asyncio.get_running_loop().time()
        # A request lost in a reconnect never reports back; forget it after its expiry.
        while self.requests and self.requests[0][1] < now:
            self.requests.popleft()
        want = self.buffer - len(self.queue) - self.owed
        # Stopped: a pull sent now would be answered into an inbox nobody reads any more.
        if want <= 0 or self.stopped or not self.nc.is_connected:
            return
        request = json.dumps({"batch": want, "expires": int(self.PULL_EXPIRES * 1e9)}).encode()
        self.requests.append([want, now + self.PULL_EXPIRES + 2.0])
        await self.nc.publish(self.api_subject, request, reply=self.inbox)

    def top_up_soon(self) -> None:
        """top_up() in a task of its own: pull for what was just taken, without making the caller
        wait (and without a point where cancelling the caller loses what it took)."""
        if not self.stopped:
            self._topping_up = asyncio.ensure_future(self.top_up())  # kept: a task needs a reference

    def forget_requests(self) -> None:
        self.requests.clear()

    async def stop(self) -> None:
        """Stop taking messages, and hand back what was pulled but never taken, for prompt
        redelivery.

        The server keeps this consumer's pull requests open until they are used up or expire, and
        hands them messages only while their inbox has interest. So the inbox is drained first:
        the unsubscribe reaches the server, a round trip brings whatever it sent before that, and
        only then is everything held nak'ed. A message nak'ed earlier would come straight back to
        a request of ours, and one arriving after a plain unsubscribe would be dropped here and
        wait for ack_wait.
        """
        if self.stopped:
            return
        self.stopped = True
        if self._sub is not None:
            sub, self._sub = self._sub, None
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                await asyncio.wait_for(sub.drain(), self.DRAIN_TIMEOUT)
        self.requests.clear()
        while self.queue:
            with contextlib.suppress(nats.errors.Error):
                await self.queue.popleft().nak()


class NatsBridge:
    def __init__(self, options: ConnectOptions):
        self.options = options
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="nats-asyncio", daemon=True)
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._trio_token = trio.lowlevel.current_trio_token()
        self._ack_prefix: str | None = None
        self._ack_waiters: dict[str, asyncio.Future[PubResult]] = {}
        # Publishes whose wait timed out, by token: (until when to listen, whom to tell).
        self._late_acks: dict[str, tuple[float, Callable[[PubResult], None]]] = {}
        self._ack_counter = 0
        self._consumers: list[PullConsumer] = []
        self._closing = False
        self._violations: collections.deque[str] = collections.deque(maxlen=5)

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

    async def run(
        self,
        fn: Callable[..., Coroutine[Any, Any, T]],
        *args: Any,
        abandoned: Callable[[T], Coroutine[Any, Any, None]] | None = None,
    ) -> T:
        """Run a coroutine function on the nats loop and wait for it from trio (one crossing).

        If trio stops waiting (cancelled) when the coroutine has finished, or finishes anyway,
        its result goes to `abandoned` on the nats loop instead of being lost.
        """
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
            if abandoned is not None:
                future.add_done_callback(functools.partial(self._hand_over, abandoned))
            raise
        return future.result()

    def _hand_over(
        self, abandoned: Callable[[T], Coroutine[Any, Any, None]], future: concurrent.futures.Future[T]
    ) -> None:
        if not future.cancelled() and future.exception() is None:
            asyncio.run_coroutine_threadsafe(abandoned(future.result()), self._loop)

    # --- connection ------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    async def _connect(self) -> None:
        o = self.options
        _check_credential_files(o)
        # While connecting, nats-py retries every failure forever (we ask it to: a sidecar's NATS
        # may start later). A server that answers and refuses us is not worth waiting for, so
        # once every server has refused, the attempt is cancelled and the refusal reported.
        refusals: list[str] = []
        connecting = True
        nc = Client()

        async def on_error(exc: Exception) -> None:
            refusal = _refusal(exc, o) if connecting else None
            if refusal is not None:
                refusals.append(refusal)
                if len(refusals) >= len(o.servers):
                    attempt.cancel()
                return
            if _PERMISSIONS_VIOLATION in str(exc).lower():
                self._violations.append(str(exc))
            log.warning("nats: %s", exc)

        async def on_disconnect() -> None:
            if not self._closing:  # nats-py reports its own close as a disconnect too
                log.warning("disconnected from NATS; reconnecting")

        async def on_reconnect() -> None:
            for consumer in self._consumers:
                consumer.forget_requests()  # the server dropped them with the old connection
            url = nc.connected_url
            log.info("reconnected to NATS at %s", _where(url))
            if (problem := self._version_problem()) is not None:
                log.error("%s", problem)

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
        if o.nkey_seed_file:
            # The path, not the seed: nats-py reads the file whenever it signs a server's nonce.
            kwargs["nkeys_seed"] = o.nkey_seed_file
        if o.tls is not None:
            kwargs["tls"] = o.tls
        servers = ", ".join(_redact(s) for s in o.servers)
        attempt = asyncio.ensure_future(nc.connect(**kwargs))
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
        self._js = self._nc.jetstream(timeout=5)

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
            f"nats-server {'.'.join(map(str, found))} at {_where(url)} is too old: hookgate needs "
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
            with self._jetstream_errors(f"stream {spec.name}"):
                await self._ensure_stream(jsm, spec)

    async def _ensure_stream(self, jsm: Any, spec: StreamSpec) -> None:
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

    @contextlib.contextmanager
    def _jetstream_errors(self, what: str) -> Iterator[None]:
        """Setup failures as BrokerRefused (settings or permissions to fix) or BrokerUnavailable
        (JetStream not ready yet: the gateway tries again)."""
        try:
            yield
        except nats.errors.NoRespondersError:
            raise BrokerRefused(
                f"{what}: nothing answers JetStream requests: enable JetStream on the NATS server, "
                "and for hookgate's account"
            ) from None
        except nats.js.errors.APIError as exc:
            if exc.code == 503:  # no JetStream leader yet (a cluster starting or electing)
                raise BrokerUnavailable(
                    f"{what}: JetStream is not available yet: {exc.description}"
                ) from None
            raise BrokerRefused(
                f"{what}: JetStream refused it: {exc.description} (error {exc.err_code})"
            ) from None
        except TimeoutError:
            if self._violations:
                violation = self._violations[-1].removeprefix("nats: ")
                raise BrokerRefused(
                    f"{what}: the NATS server refused hookgate's user: {violation} (the NATS client "
                    "reports it in lower case); grant it the permissions in docs/external-nats.md"
                ) from None
            raise BrokerUnavailable(f"{what}: JetStream did not answer in time") from None

    async def ensure_consumers(self, specs: list[ConsumerSpec]) -> list[PullConsumer]:
        return await self.run(self._ensure_consumers, specs)

    async def _ensure_consumers(self, specs: list[ConsumerSpec]) -> list[PullConsumer]:
        out = []
        for spec in specs:
            with self._jetstream_errors(f"consumer {spec.durable} of stream {spec.stream}"):
                out.append(await self._ensure_consumer(spec))
        return out

    async def _ensure_consumer(self, spec: ConsumerSpec) -> PullConsumer:
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
        await self.js._jsm.add_consumer(spec.stream, config)
        assert self._nc is not None
        # A worker that stops releases its pull (see release_consumer), so a worker started
        # for a changed config always pulls afresh.
        consumer = PullConsumer(self._nc, spec, buffer=spec.buffer)
        await consumer.start()
        self._consumers.append(consumer)
        return consumer

    async def release_consumer(self, consumer: PullConsumer) -> None:
        """Stop pulling for a consumer this process no longer serves; what it buffered is nak'ed."""

        async def go() -> None:
            if consumer in self._consumers:
                self._consumers.remove(consumer)
            await consumer.stop()

        await self.run(go)

    async def delete_consumer(self, stream: str, durable: str) -> bool:
        """Delete a durable consumer; False when it was gone already (another replica deleted it)."""

        async def go() -> bool:
            try:
                return bool(await self.js._jsm.delete_consumer(stream, durable))
            except nats.js.errors.NotFoundError:
                return False

        return await self.run(go)

    async def purge_subject(self, stream: str, subject: str) -> None:
        """Remove every message on `subject` (wildcards allowed) from a stream."""

        async def go() -> None:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await self.js._jsm.purge_stream(stream, subject=subject)

        await self.run(go)

    async def streams_present(self, names: list[str]) -> bool:
        async def check() -> bool:
            for name in names:
                await asyncio.wait_for(self.js._jsm.stream_info(name), 2)
            return True

        try:
            return await self.run(check)
        except Exception:
            return False

    # --- publishing and settling ------------------------------------------------------------

    async def commit(self, commits: list[Commit], timeout: float) -> list[list[PubResult]]:
        """Publish every commit's messages, wait for their PubAcks, then settle, in one crossing."""
        return await self.run(self._commit, commits, timeout)

    async def _ensure_ack_inbox(self, nc: Client) -> str:
        # One wildcard subscription receives every PubAck; a future per publish is resolved by
        # token. Cheaper than nats-py's publish_async, which wraps each publish in more tasks.
        if self._ack_prefix is None:
            prefix = f"_INBOX.hgack{nc._nuid.next().decode()}."

            async def on_ack(msg: Msg) -> None:
                token = msg.subject[len(prefix) :]
                future = self._ack_waiters.pop(token, None)
                if future is not None and not future.done():
                    future.set_result(_pub_result(msg))
                elif (late := self._late_acks.pop(token, None)) is not None:
                    late[1](_pub_result(msg))

            await nc.subscribe(prefix + "*", cb=on_ack, pending_msgs_limit=1_000_000)
            self._ack_prefix = prefix
        return self._ack_prefix

    async def _commit(self, commits: list[Commit], timeout: float) -> list[list[PubResult]]:
        nc = self._nc
        if nc is None or not nc.is_connected:
            return [[PubResult(error="not connected to NATS")] * len(c.publishes) for c in commits]
        prefix = await self._ensure_ack_inbox(nc)
        loop = asyncio.get_running_loop()
        futures: list[list[tuple[str, asyncio.Future[PubResult]]]] = []
        for commit in commits:
            mine = []
            for m in commit.publishes:
                self._ack_counter += 1
                token = f"{self._ack_counter:x}"
                future: asyncio.Future[PubResult] = loop.create_future()
                self._ack_waiters[token] = future
                try:
                    await nc.publish(m.subject, m.data, reply=prefix + token, headers=m.headers)
                except Exception as exc:
                    self._ack_waiters.pop(token, None)
                    future.set_result(PubResult(error=_describe(exc)))
                mine.append((token, future))
            futures.append(mine)
        waiting = [f for mine in futures for _, f in mine if not f.done()]
        if waiting:
            await asyncio.wait(waiting, timeout=timeout)
        out = []
        for commit, mine in zip(commits, futures, strict=True):
            results = []
            for token, future in mine:
                if future.done():
                    results.append(future.result())
                else:
                    future.cancel()
                    results.append(PubResult(error="timed out waiting for JetStream"))
                    if commit.late is not None:
                        self._late_acks[token] = (loop.time() + LATE_WINDOW, commit.late)
            out.append(results)
            with contextlib.suppress(nats.errors.MsgAlreadyAckdError, nats.errors.Error):
                if commit.ack is not None:
                    if all(r.ok for r in results[: commit.required]):
                        await commit.ack.raw.ack()
                    elif commit.nak_delay is not None:
                        await commit.ack.raw.nak(delay=commit.nak_delay or None)
                if commit.nak is not None:
                    await commit.nak.raw.nak(delay=commit.nak_delay or None)
            for held in commit.in_progress:
                with contextlib.suppress(nats.errors.MsgAlreadyAckdError, nats.errors.Error):
                    await held.raw.in_progress()
            if commit.keep_queued is not None:
                for queued in list(commit.keep_queued.queue):
                    with contextlib.suppress(nats.errors.MsgAlreadyAckdError, nats.errors.Error):
                        await queued.in_progress()
        for token in [t for t, f in self._ack_waiters.items() if f.done()]:
            del self._ack_waiters[token]  # timed out and cancelled above
        while self._late_acks and next(iter(self._late_acks.values()))[0] < loop.time():
            del self._late_acks[next(iter(self._late_acks))]  # oldest first: PubAcks that never came
        return out

    # --- consuming -------------------------------------------------------------------------

    async def fetch(self, consumer: PullConsumer, batch: int, timeout: float) -> list[InMsg]:
        """Up to `batch` messages; an empty list when none arrived within `timeout`. Messages
        fetched for a caller that was cancelled meanwhile are handed back (nak'ed)."""
        return await self.run(self._fetch, consumer, batch, timeout, abandoned=_hand_back)

    async def _fetch(self, consumer: PullConsumer, batch: int, timeout: float) -> list[InMsg]:
        await consumer.top_up()
        out: list[InMsg] = []
        if not consumer.queue:
            consumer.arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(consumer.arrived.wait(), timeout)
        # No await from here on: what is taken from the queue reaches the caller, or, if it was
        # cancelled, `_hand_back` (see fetch).
        while consumer.queue and len(out) < batch:
            m = consumer.queue.popleft()
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
        consumer.top_up_soon()
        return out

    async def pending_counts(self, consumers: list[PullConsumer]) -> dict[str, int]:
        """Messages each consumer has not yet been handed (its backlog), by durable name."""

        async def go() -> dict[str, int]:
            out = {}
            for consumer in consumers:
                try:
                    info = await self.js._jsm.consumer_info(consumer.spec.stream, consumer.spec.durable)
                except nats.js.errors.NotFoundError:
                    continue  # an endpoint deleted through another replica: gone before we stopped
                out[consumer.spec.durable] = int(info.num_pending or 0) + int(info.num_ack_pending or 0)
            return out

        return await self.run(go)

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
        stream order, and whether more follow. An ephemeral consumer without acks reads them in
        bulk; it is deleted at once (and expires by itself if we crash)."""

        async def go() -> tuple[list[StoredMsg], bool]:
            jsm = self.js._jsm
            extra: dict[str, Any] = {}
            if start_seq > 0:
                policy, extra["opt_start_seq"] = DeliverPolicy.BY_START_SEQUENCE, start_seq
            elif start_time is not None:
                policy = DeliverPolicy.BY_START_TIME
                extra["opt_start_time"] = datetime.fromtimestamp(start_time, UTC)
            else:
                policy = DeliverPolicy.ALL
            config = ConsumerConfig(
                ack_policy=AckPolicy.NONE,
                deliver_policy=policy,
                filter_subjects=subjects if len(subjects) > 1 else None,
                filter_subject=subjects[0] if len(subjects) == 1 else None,
                inactive_threshold=30.0,
                mem_storage=True,
                num_replicas=1,
                **extra,
            )
            info = await jsm.add_consumer(stream, config)
            name = info.name
            try:
                pending = int(info.num_pending or 0)
                want = min(limit, pending)
                if want == 0:
                    return [], False
                sub = await self.js.pull_subscribe_bind(consumer=name, stream=stream)
                try:
                    out: list[StoredMsg] = []
                    while len(out) < want:
                        msgs = await sub.fetch(min(want - len(out), 256), timeout=5)
                        out.extend(_stored(m) for m in msgs)
                finally:
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()
                return out, pending > want
            finally:
                with contextlib.suppress(Exception):
                    await jsm.delete_consumer(stream, name)

        return await self.run(go)

    async def last_msgs(self, stream: str, subjects: list[str]) -> dict[str, StoredMsg]:
        """The last message stored on each subject (absent when there is none), read concurrently."""

        async def one(subject: str) -> tuple[str, StoredMsg | None]:
            try:
                raw = await self.js._jsm.get_last_msg(stream, subject)
            except nats.js.errors.NotFoundError:
                return subject, None
            return subject, _raw_stored(raw)

        async def go() -> dict[str, StoredMsg]:
            found = await asyncio.gather(*(one(s) for s in subjects))
            return {s: m for s, m in found if m is not None}

        return await self.run(go)

    async def get_msg(self, stream: str, seq: int) -> StoredMsg | None:
        async def go() -> StoredMsg | None:
            try:
                return _raw_stored(await self.js._jsm.get_msg(stream, seq))
            except nats.js.errors.NotFoundError:
                return None

        return await self.run(go)

    # --- key-value state ----------------------------------------------------------------------

    async def ensure_kv(self, bucket: str, replicas: int) -> None:
        async def go() -> None:
            with self._jetstream_errors(f"key-value bucket {bucket}"):
                try:
                    await self.js.key_value(bucket)
                except nats.js.errors.BucketNotFoundError:
                    await self.js.create_key_value(bucket=bucket, history=1, replicas=replicas)

        await self.run(go)

    async def kv_get_all(self, bucket: str) -> dict[str, bytes]:
        """Every key's current value (a small bucket: endpoint states)."""

        async def go() -> dict[str, bytes]:
            kv = await self.js.key_value(bucket)
            try:
                keys = await kv.keys()
            except nats.js.errors.NoKeysError:
                return {}
            out = {}
            for key in keys:
                with contextlib.suppress(nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                    entry = await kv.get(key)
                    out[key] = entry.value or b""
            return out

        return await self.run(go)

    async def kv_put(self, bucket: str, key: str, value: bytes) -> None:
        async def go() -> None:
            kv = await self.js.key_value(bucket)
            await kv.put(key, value)

        await self.run(go)

    async def kv_get(self, bucket: str, key: str) -> KvUpdate | None:
        """A key's current value and revision; None when it does not exist or was deleted."""

        async def go() -> KvUpdate | None:
            kv = await self.js.key_value(bucket)
            try:
                entry = await kv.get(key)
            except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                return None
            return KvUpdate(key, entry.value or b"", entry.revision or 0)

        return await self.run(go)

    async def kv_create(self, bucket: str, key: str, value: bytes) -> int | None:
        """Store a new key and return its revision; None when the key exists (checked by the server,
        so two replicas creating the same key at once cannot both succeed)."""

        async def go() -> int | None:
            kv = await self.js.key_value(bucket)
            try:
                return int(await kv.create(key, value))
            except nats.js.errors.KeyWrongLastSequenceError:
                return None

        return await self.run(go)

    async def kv_update(self, bucket: str, key: str, value: bytes, revision: int) -> int | None:
        """Replace a key's value if it is still at `revision`; the new revision, or None if it moved."""

        async def go() -> int | None:
            kv = await self.js.key_value(bucket)
            try:
                return int(await kv.update(key, value, last=revision))
            except nats.js.errors.KeyWrongLastSequenceError:
                return None

        return await self.run(go)

    async def kv_delete(self, bucket: str, key: str, revision: int | None = None) -> int | None:
        """Delete a key (at `revision`, if given); the revision of the delete marker, or None if
        the key moved on meanwhile."""

        async def go() -> int | None:
            kv = await self.js.key_value(bucket)
            headers = {"KV-Operation": "DEL"}
            if revision is not None:
                headers["Nats-Expected-Last-Subject-Sequence"] = str(revision)
            try:
                # nats-py's kv.delete() hides the marker's revision, which a caller waits for.
                ack = await self.js.publish(f"{kv._pre}{key}", b"", headers=headers)
            except nats.js.errors.APIError as exc:
                if exc.err_code in (10071, 10164):  # wrong last sequence
                    return None
                raise
            return int(ack.seq)

        return await self.run(go)

    @contextlib.asynccontextmanager
    async def watch_kv(self, bucket: str) -> AsyncIterator[trio.MemoryReceiveChannel[list[KvUpdate]]]:
        """Follow a bucket from trio: the first batch holds every current value (possibly none),
        then each batch holds the puts and deletes that arrived together, in order.

        The watcher runs on the nats loop, and each batch crosses into trio once. The channel is
        unbounded because updates are rare and small (endpoint configs) and the nats loop must
        never block on trio.
        """
        send, receive = trio.open_memory_channel[list[KvUpdate]](math.inf)
        token = self._trio_token

        def hand_over(batch: list[KvUpdate]) -> None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                send.send_nowait(batch)

        def cross(batch: list[KvUpdate]) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(hand_over, batch)

        async def pump(watcher: Any) -> None:
            initial: list[KvUpdate] = []
            initial_done = False
            while True:
                entries = [await watcher._updates.get()]
                while not watcher._updates.empty():
                    entries.append(watcher._updates.get_nowait())
                batch: list[KvUpdate] = []
                for entry in entries:
                    if entry is watcher.STOP_ITER:
                        return
                    if entry is None:  # the end of the current values
                        if not initial_done:
                            initial_done = True
                            cross(initial)
                        continue
                    deleted = entry.operation in ("DEL", "PURGE")
                    update = KvUpdate(
                        entry.key, None if deleted else (entry.value or b""), entry.revision or 0
                    )
                    (batch if initial_done else initial).append(update)
                if initial_done and batch:
                    cross(batch)

        async def start() -> tuple[Any, asyncio.Task[None]]:
            kv = await self.js.key_value(bucket)
            watcher = await kv.watchall()
            task = asyncio.get_running_loop().create_task(pump(watcher))
            # However the pump ends, the trio side's iteration ends too (and its owner may watch
            # again), rather than waiting for batches that will never come.
            task.add_done_callback(lambda _: _call_soon(token, send.close))
            return watcher, task

        async def stop(watcher: Any, task: asyncio.Task[None]) -> None:
            task.cancel()
            with contextlib.suppress(Exception):
                await watcher.stop()

        watcher, task = await self.run(start)
        try:
            async with receive:
                yield receive
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await self.run(stop, watcher, task)
            send.close()


def _call_soon(token: trio.lowlevel.TrioToken, fn: Callable[[], object]) -> None:
    with contextlib.suppress(trio.RunFinishedError):
        token.run_sync_soon(fn)


def _stored(msg: Msg) -> StoredMsg:
    meta = msg.metadata
    return StoredMsg(
        subject=msg.subject,
        data=msg.data,
        headers=dict(msg.headers or {}),
        seq=meta.sequence.stream,
        timestamp=meta.timestamp.timestamp(),
    )


def _raw_stored(raw: Any) -> StoredMsg:
    return StoredMsg(
        subject=raw.subject or "",
        data=raw.data or b"",
        headers=dict(raw.headers or {}),
        seq=int(raw.seq or 0),
        timestamp=raw.time.timestamp() if raw.time is not None else 0.0,
    )


def _describe(exc: BaseException | None) -> str:
    if isinstance(exc, nats.js.errors.NoStreamResponseError | nats.errors.NoRespondersError):
        return "no JetStream stream captures this subject"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


_PERMISSIONS_VIOLATION = "permissions violation"


def _check_credential_files(o: ConnectOptions) -> None:
    """Refuse unreadable or malformed credential files before nats-py reads them: it would loop
    for ever on a creds file without a JWT, and report a bad seed without saying which file."""
    if o.nkey_seed_file:
        seed = _read_secret("broker.nkey_seed", o.nkey_seed_file).strip()
        _check_seed("broker.nkey_seed", o.nkey_seed_file, seed, "holds nothing else")
    if o.creds_file:
        text = _read_secret("broker.creds", o.creds_file)
        jwt_block = re.search(r"-----BEGIN NATS USER JWT-----\s*\n\s*(\S+)", text)
        seed_block = re.search(r"-----BEGIN USER NKEY SEED-----\s*\n\s*(\S+)", text)
        if jwt_block is None or seed_block is None:
            raise BrokerRefused(
                f"broker.creds: {o.creds_file} is not a NATS credentials file (it needs a "
                "'BEGIN NATS USER JWT' and a 'BEGIN USER NKEY SEED' block, as nsc writes them)"
            )
        _check_seed("broker.creds", o.creds_file, seed_block.group(1), "in its seed block")


def _read_secret(key: str, path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        raise BrokerRefused(f"{key}: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise BrokerRefused(f"{key}: {path} is not a text file") from None


def _check_seed(key: str, path: str, seed: str, where: str) -> None:
    # The seed is never part of a message, not even in part.
    try:
        role, _ = nkeys.decode_seed(bytearray(seed.encode()))
    except (nkeys.NkeysError, ValueError):
        role = None
    if role != nkeys.PREFIX_BYTE_USER:
        raise BrokerRefused(
            f"{key}: {path} does not hold a user nkey seed (one line starting with SU, {where})"
            if role is None
            else f"{key}: the seed in {path} is not a user's (its role is not U: use a user nkey)"
        )


def _refusal(exc: BaseException, o: ConnectOptions) -> str | None:
    """What a server that refused us said, for the user to act on; None for other failures."""
    servers = ", ".join(_redact(s) for s in o.servers)
    text = str(exc)
    lowered = text.lower()
    if "authorization violation" in lowered or "authentication" in lowered:
        if o.creds_file:
            how = f"the user in broker.creds ({o.creds_file})"
        elif o.nkey_seed_file:
            how = f"the nkey whose seed is in broker.nkey_seed ({o.nkey_seed_file})"
        elif o.token:
            how = "broker.token"
        elif o.user:
            how = f"broker.user {o.user!r} and its password"
        else:
            how = "a connection without credentials (set broker.token, user and password, creds or nkey_seed)"
        return f"NATS at {servers} refused {how}: {text.removeprefix('nats: ')}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"cannot verify the TLS certificate of NATS at {servers}: {exc.verify_message}; set "
            "broker.tls.ca_file to the CA that signed it"
        )
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or text
        if "CERTIFICATE_REQUIRED" in reason.upper():
            return (
                f"NATS at {servers} requires a client certificate: set broker.tls.cert_file and "
                "broker.tls.key_file"
            )
        if o.tls is not None and "ALERT" in reason.upper():
            return f"NATS at {servers} refused the TLS handshake ({reason}): check broker.tls.cert_file"
    return None


def _where(url: Any) -> str:
    """host:port of a connected URL, without credentials."""
    if url is None or url.hostname is None:
        return "?"
    return f"{url.hostname}:{url.port}" if url.port else url.hostname


def _redact(url: str) -> str:
    """A server URL without credentials, for logs."""
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


async def _hand_back(msgs: list[InMsg]) -> None:
    """Nak messages that were fetched for a caller that stopped waiting, for prompt redelivery."""
    for m in msgs:
        with contextlib.suppress(nats.errors.Error):
            await m.raw.nak()
