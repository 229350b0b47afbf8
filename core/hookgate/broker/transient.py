"""JetStream errors that pass by themselves (a cluster electing a leader, a server paused or
reconnecting) and the bounded retry of a call that meets one: a delivery-log read, a consumer's
creation. Coroutines here run on the nats loop (see NatsBridge)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import nats.errors
import nats.js.errors

from hookgate.broker.messages import BrokerRefused, BrokerUnavailable

T = TypeVar("T")

log = logging.getLogger("hookgate.broker")

READ_ATTEMPTS = 3
"""A read of the delivery log is tried at most this many times."""
READ_BACKOFF = 0.2
"""Seconds before the second try of any call, doubled before each later one."""
READ_BUDGET = 8.0
"""Seconds a read may take over all its tries, within an API client's usual 10 s timeout."""
SETUP_ATTEMPTS = 6
"""Creating a consumer (at startup, or for a new endpoint) is tried at most this many times..."""
SETUP_BUDGET = 30.0
"""...within this many seconds: long enough for a new cluster to elect its stream leaders."""

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
    if isinstance(exc, BrokerUnavailable):
        return not isinstance(exc, BrokerRefused)  # as admin.jetstream_errors judged it
    if isinstance(exc, nats.js.errors.ServiceUnavailableError):
        return True  # nats-py's "no responders" too, which has no code
    if isinstance(exc, nats.js.errors.APIError):
        return exc.code == 503
    return isinstance(exc, _PASSING)


async def retrying(
    what: str,
    call: Callable[[], Awaitable[T]],
    *,
    attempts: int = READ_ATTEMPTS,
    budget: float = READ_BUDGET,
) -> T:
    """`call()`, tried again after a transient error, `attempts` times at most within `budget`
    seconds; when they persist, BrokerUnavailable, which the API answers with 503."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + budget
    delay = READ_BACKOFF
    for attempt in range(1, attempts + 1):
        try:
            return await asyncio.wait_for(call(), max(deadline - loop.time(), 0.0))
        except Exception as exc:
            if not is_transient(exc):
                raise
            reason = str(exc) or type(exc).__name__
            if attempt == attempts or loop.time() + delay >= deadline:
                if isinstance(exc, BrokerUnavailable):
                    raise
                raise BrokerUnavailable(f"{what}: JetStream did not answer: {reason}") from None
            log.warning("%s: %s; trying again in %.1fs", what, reason, delay)
        await asyncio.sleep(delay)
        delay *= 2
    raise AssertionError("unreachable")  # the last attempt returns or raises
