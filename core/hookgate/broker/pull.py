"""Continuous pulls from durable consumers, and handing what they pulled to trio.

Pulling happens on the nats loop; taking does not. What arrives is queued here and the trio task
waiting for it is woken (see `Waiter`), and trio takes from the queue itself (NatsBridge.fetch),
so a fetch costs no crossing into the nats loop: at a steady trickle each crossing wakes the
other thread, and one per message per consumer was most of what a webhook cost there.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
from collections.abc import Callable

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from hookgate.broker.messages import ConsumerSpec, InMsg


class Waiter:
    """A trio task waiting for a consumer's queue; woken at most once, from the nats thread."""

    __slots__ = ("wake", "woken")

    def __init__(self, wake: Callable[[], None]):
        self.wake = wake  # thread-safe: it only schedules the wake-up in trio
        self.woken = False


class PullConsumer:
    """A continuous pull from a durable consumer, kept topped up on the nats loop.

    nats-py's fetch() waits for its whole batch once it long-polls, so a lone message could sit
    for the full wait, and it costs a task per message. Instead this keeps pull requests
    outstanding for up to `buffer` messages (each expiring after PULL_EXPIRES), queues what
    arrives, and hands queued messages to trio as soon as there are any.

    The pull is topped up once half the buffer is free, not after every message taken: at a
    steady trickle, one request per message would cost a publish here and a request in the
    server for each delivery.
    """

    PULL_EXPIRES = 30.0
    DRAIN_TIMEOUT = 2.0  # the unsubscribe's round trip at stop; a lost connection has no requests

    def __init__(self, nc: Client, spec: ConsumerSpec, buffer: int):
        self.nc = nc
        self.spec = spec
        self.buffer = buffer
        self.refill_at = max(1, buffer // 2)  # free room in the buffer worth a pull request
        self.api_subject = f"$JS.API.CONSUMER.MSG.NEXT.{spec.stream}.{spec.durable}"
        self.inbox = nc.new_inbox()
        self.queue: collections.deque[Msg] = collections.deque()
        # Outstanding pull requests, oldest first: [messages still owed, expiry (loop time)].
        self.requests: collections.deque[list[float]] = collections.deque()
        # The trio task waiting for the queue, if any. Set and cleared by trio; the nats thread
        # appends to the queue before it reads this, and trio sets it before it checks the queue,
        # so an arrival is either seen by the waiter's check or wakes it.
        self.waiter: Waiter | None = None
        self.taken_since_top_up = buffer  # by trio: a top-up is due once this reaches refill_at
        self.stopped = False
        self.stopped_fully = False  # stop() has handed back everything it held
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
            self.notify()
        elif status in ("404", "408", "409"):
            # No messages / request expired / request ended: it owes what it did not deliver.
            pending = (msg.headers or {}).get("Nats-Pending-Messages")
            if self.requests:
                if pending is not None and pending.isdigit():
                    self.requests[0][0] -= min(int(pending), self.requests[0][0])
                else:
                    self.requests[0][0] = 0
                self._drop_settled()
            if status == "408":
                # Expired: pull again now, not when the waiting fetch times out, so a message
                # stored meanwhile is not left waiting for the end of that wait.
                self.top_up_soon()
        elif status == "503" and self.requests:
            # No responders: nobody serves this consumer's pulls now (a cluster electing its
            # leader), so the oldest request reached nobody. Counted as owed, it would hold off
            # the next pull until it expired, long after the election. Not renewed here (that
            # would spin while the election lasts): the next fetch that waits in vain pulls again.
            self.requests.popleft()
        # 100 (idle heartbeat) needs nothing.

    def notify(self) -> None:
        """Wake the trio task waiting for the queue (once; a burst of arrivals wakes it once)."""
        waiter = self.waiter
        if waiter is not None and not waiter.woken:
            waiter.woken = True
            waiter.wake()

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

    def _wanted(self) -> int:
        """Messages to pull now: the free room in the buffer, once it is worth a request."""
        now = asyncio.get_running_loop().time()
        # A request lost in a reconnect never reports back; forget it after its expiry.
        while self.requests and self.requests[0][1] < now:
            self.requests.popleft()
        want = self.buffer - len(self.queue) - self.owed
        # Stopped: a pull sent now would be answered into an inbox nobody reads any more.
        if want < self.refill_at or self.stopped or not self.nc.is_connected:
            return 0
        return want

    async def top_up(self) -> None:
        want = self._wanted()
        if not want:
            return
        now = asyncio.get_running_loop().time()
        request = json.dumps({"batch": want, "expires": int(self.PULL_EXPIRES * 1e9)}).encode()
        self.requests.append([want, now + self.PULL_EXPIRES + 2.0])
        await self.nc.publish(self.api_subject, request, reply=self.inbox)

    def top_up_soon(self) -> None:
        """top_up() in a task of its own: pull for what was just taken, without making the caller
        wait (and without a point where cancelling the caller loses what it took)."""
        if self._wanted():  # most takes leave nothing worth a request: no task for them
            self._topping_up = asyncio.ensure_future(self.top_up())  # kept: a task needs a reference

    def forget_requests(self) -> None:
        """After a reconnect: the server dropped our requests with the old connection; pull anew."""
        self.requests.clear()
        self.top_up_soon()

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
        while self.queue:  # give_back() may add to it meanwhile
            try:
                msg = self.queue.popleft()
            except IndexError:  # taken by trio meanwhile
                break
            with contextlib.suppress(nats.errors.Error):
                await msg.nak()
        self.stopped_fully = True


def take_queued(consumer: PullConsumer, batch: int) -> list[InMsg]:
    """Up to `batch` queued messages, taken from trio without waiting (see NatsBridge.fetch).

    Synchronous: what is taken reaches the caller, a cancellation cannot fall in between."""
    out: list[InMsg] = []
    queue = consumer.queue
    while len(out) < batch:
        try:
            msg = queue.popleft()
        except IndexError:  # emptied meanwhile by the nats thread (stop)
            break
        out.append(_in_msg(msg))
    consumer.taken_since_top_up += len(out)
    return out


def top_up_due(consumer: PullConsumer) -> bool:
    """Whether trio should have the nats loop top the pull up (and count from there again)."""
    if consumer.taken_since_top_up < consumer.refill_at:
        return False
    consumer.taken_since_top_up = 0
    return True


def _in_msg(m: Msg) -> InMsg:
    meta = m.metadata
    return InMsg(
        subject=m.subject,
        data=m.data,
        headers=dict(m.headers or {}),
        stream_seq=meta.sequence.stream,
        num_delivered=meta.num_delivered,
        timestamp=meta.timestamp.timestamp(),
        raw=m,
    )


async def give_back(consumer: PullConsumer, msgs: list[InMsg]) -> None:
    """Return messages taken from `consumer` and not worked on (a fetch whose caller was cancelled,
    deliveries a stopping worker never started), in order, for prompt redelivery.

    Until the consumer has stopped they go back to the front of its queue, to be taken again or
    nak'ed by stop() once its inbox is drained; after that they are nak'ed here. A nak sent while
    the consumer's pull requests are open can be answered by handing the message straight back to
    one of them, and if that crosses the unsubscribe of a stopping consumer, the server drops the
    message and it waits for ack_wait."""
    if not consumer.stopped_fully:
        consumer.queue.extendleft(m.raw for m in reversed(msgs))
        consumer.notify()
        return
    for m in msgs:
        with contextlib.suppress(nats.errors.Error):
            await m.raw.nak()
