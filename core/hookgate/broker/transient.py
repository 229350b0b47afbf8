"""JetStream errors that pass by themselves (a cluster electing a leader, a server paused or
reconnecting) and the bounded retry of a read that meets one. Coroutines here run on the nats
loop (see NatsBridge)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import nats.errors
import nats.js.errors

from hookgate.broker.messages import BrokerUnavailable

T = TypeVar("T")

READ_ATTEMPTS = 3
"""A read of the delivery log is tried at most this many times."""
READ_BACKOFF = 0.2
"""Seconds before the second try, doubled before each later one."""
READ_BUDGET = 8.0
"""Seconds a read may take over all its tries, within an API client's usual 10 s timeout."""

_PASSING = (
    TimeoutError,  # nats.errors.TimeoutError too
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.ConnectionDrainingError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,
)


def is_transient(exc: BaseException) -> bool:
    """Whether the same request may succeed in a moment: a timeout, nobody answering, a
    connection being re-established, or JetStream's 503 (no leader yet)."""
    if isinstance(exc, nats.js.errors.ServiceUnavailableError):
        return True  # nats-py's "no responders" too, which has no code
    if isinstance(exc, nats.js.errors.APIError):
        return exc.code == 503
    return isinstance(exc, _PASSING)


async def retrying(what: str, call: Callable[[], Awaitable[T]]) -> T:
    """`call()`, tried again after a transient error (see the limits above); when they persist,
    BrokerUnavailable, which the API answers with 503."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READ_BUDGET
    delay = READ_BACKOFF
    for attempt in range(1, READ_ATTEMPTS + 1):
        try:
            return await asyncio.wait_for(call(), max(deadline - loop.time(), 0.0))
        except Exception as exc:
            if not is_transient(exc):
                raise
            if attempt == READ_ATTEMPTS or loop.time() + delay >= deadline:
                reason = str(exc) or type(exc).__name__
                raise BrokerUnavailable(f"{what}: JetStream did not answer: {reason}") from None
        await asyncio.sleep(delay)
        delay *= 2
    raise AssertionError("unreachable")  # the last attempt returns or raises
