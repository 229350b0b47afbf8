"""Admission control: how much ingress work may wait on the broker, and a quick 503 past it.

Under overload, a request that waits in line is worse than one refused at once: the provider gives
up, and retries later anyway. So the number of events waiting for JetStream to store them
(`server.max_in_flight`) and the router's backlog (`server.max_unrouted`) are bounded, and past
either bound a webhook or an internal publish is answered 503 with `Retry-After` as soon as its
body is in (an unread body would cost the connection), without verifying or storing it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from hookgate.ingress.asgi import Send, send_json
from hookgate.observe.metrics import Metrics

RETRY_AFTER = 1  # seconds; providers that honour it come back soon, the others retry on their own

_MESSAGES = {
    "in_flight": "too many events are waiting to be stored; retry later",
    "unrouted": "too many stored events are waiting to be routed; retry later",
    "client_gone": "the client closed the connection; the event was not stored",
}


class Admission:
    def __init__(self, max_in_flight: int, max_unrouted: int, metrics: Metrics):
        self.max_in_flight = max_in_flight
        self.max_unrouted = max_unrouted
        self.metrics = metrics
        self.in_flight = 0
        self.unrouted = 0  # kept current by the gateway, from the router's consumer

    def refusal(self) -> str | None:
        """Why a new event must be refused now, or None to admit it."""
        if self.in_flight >= self.max_in_flight:
            return "in_flight"
        if self.max_unrouted and self.unrouted >= self.max_unrouted:
            return "unrouted"
        return None

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Held while one event waits for JetStream."""
        self.in_flight += 1
        self.metrics.in_flight.inc()
        try:
            yield
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.dec()

    async def refuse(self, send: Send, reason: str) -> None:
        self.metrics.overloaded.labels(reason).inc()
        await send_json(
            send,
            503,
            {"error": "overloaded", "message": _MESSAGES[reason]},
            headers=[(b"retry-after", str(RETRY_AFTER).encode())],
        )
