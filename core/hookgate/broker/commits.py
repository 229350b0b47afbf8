"""Batched publishing and settling: every commit's messages are published, their PubAcks awaited
together, and then the messages they answer for are acked or nak'ed (see Commit)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from hookgate.broker.messages import LATE_WINDOW, Commit, PubResult

# A publish nobody answered: JetStream answers for a stream's subjects only through the stream's
# leader, so this is also what a publish meets while a cluster elects one.
NO_STREAM = "no JetStream stream captures this subject (or, on a cluster, its stream is electing a leader)"

# A publish's token and the future its PubAck resolves.
_Waiting = tuple[str, "asyncio.Future[PubResult]"]


class PubAcks:
    """Publishes with their PubAcks awaited by token, on the nats loop.

    One wildcard subscription receives every PubAck; a future per publish is resolved by token.
    Cheaper than nats-py's publish_async, which wraps each publish in more tasks.
    """

    def __init__(self) -> None:
        self._prefix: str | None = None
        self._waiters: dict[str, asyncio.Future[PubResult]] = {}
        # Publishes whose wait timed out, by token: (until when to listen, whom to tell).
        self._late: dict[str, tuple[float, Callable[[PubResult], None]]] = {}
        self._counter = 0

    async def commit(self, nc: Client | None, commits: list[Commit], timeout: float) -> list[list[PubResult]]:
        """Publish every commit's messages, wait for their PubAcks, then settle."""
        if nc is None or not nc.is_connected:
            return [[PubResult(error="not connected to NATS")] * len(c.publishes) for c in commits]
        prefix = await self._inbox(nc)
        loop = asyncio.get_running_loop()
        futures = [await self._publish(nc, prefix, commit, loop) for commit in commits]
        waiting = [f for mine in futures for _, f in mine if not f.done()]
        if waiting:
            await asyncio.wait(waiting, timeout=timeout)
        out = []
        for commit, mine in zip(commits, futures, strict=True):
            results = self._results(commit, mine, loop)
            out.append(results)
            await _settle(commit, results)
        for token in [t for t, f in self._waiters.items() if f.done()]:
            del self._waiters[token]  # timed out and cancelled in _results
        while self._late and next(iter(self._late.values()))[0] < loop.time():
            del self._late[next(iter(self._late))]  # oldest first: PubAcks that never came
        return out

    async def _inbox(self, nc: Client) -> str:
        if self._prefix is None:
            prefix = nc.new_inbox() + "."

            async def on_ack(msg: Msg) -> None:
                token = msg.subject[len(prefix) :]
                future = self._waiters.pop(token, None)
                if future is not None and not future.done():
                    future.set_result(pub_result(msg))
                elif (late := self._late.pop(token, None)) is not None:
                    late[1](pub_result(msg))

            await nc.subscribe(prefix + "*", cb=on_ack, pending_msgs_limit=1_000_000)
            self._prefix = prefix
        return self._prefix

    async def _publish(
        self, nc: Client, prefix: str, commit: Commit, loop: asyncio.AbstractEventLoop
    ) -> list[_Waiting]:
        mine = []
        for m in commit.publishes:
            self._counter += 1
            token = f"{self._counter:x}"
            future: asyncio.Future[PubResult] = loop.create_future()
            self._waiters[token] = future
            try:
                await nc.publish(m.subject, m.data, reply=prefix + token, headers=m.headers)
            except Exception as exc:
                self._waiters.pop(token, None)
                future.set_result(PubResult(error=describe(exc)))
            mine.append((token, future))
        return mine

    def _results(
        self, commit: Commit, mine: list[_Waiting], loop: asyncio.AbstractEventLoop
    ) -> list[PubResult]:
        results = []
        for token, future in mine:
            if future.done():
                results.append(future.result())
            else:
                future.cancel()
                results.append(PubResult(error="timed out waiting for JetStream"))
                if commit.late is not None:
                    self._late[token] = (loop.time() + LATE_WINDOW, commit.late)
        return results


async def _settle(commit: Commit, results: list[PubResult]) -> None:
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


class _PubAck(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: dict[str, Any] | None = None


_puback = msgspec.json.Decoder(_PubAck)


def pub_result(msg: Msg) -> PubResult:
    if not msg.data:
        status = (msg.headers or {}).get("Status")
        if status == "503":
            return PubResult(error=NO_STREAM)
        return PubResult(error=f"JetStream answered status {status}")
    try:
        ack = _puback.decode(msg.data)
    except msgspec.DecodeError:
        return PubResult(error="unreadable PubAck")
    if ack.error is not None:
        return PubResult(error=f"JetStream error: {ack.error.get('description', ack.error)}")
    return PubResult(seq=ack.seq, duplicate=ack.duplicate)


def describe(exc: BaseException | None) -> str:
    if isinstance(exc, nats.js.errors.NoStreamResponseError | nats.errors.NoRespondersError):
        return NO_STREAM
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
