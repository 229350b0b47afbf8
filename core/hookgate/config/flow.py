"""The config of an endpoint's flow control (`rate_limit`, `circuit_breaker`); egress.flow runs it."""

from __future__ import annotations

import math
from typing import Annotated

import msgspec

from hookgate.plugin_kit.units import Duration, seconds


def _positive(name: str, value: Duration) -> None:
    # The Duration pattern admits "0s"; a zero period or window would divide by zero, and a zero
    # cooldown would let every worker probe a failing endpoint back to back.
    if seconds(value) <= 0:
        raise ValueError(f'{name} must be longer than 0, got "{value}"')


class RateLimitConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """`rate_limit: {rate: 50, per: 1s, burst: 100}`: at most `rate` requests per `per`, on average.

    `burst` is how many may go at once after a quiet spell (the bucket's size). Omitted, it is one
    period's worth, `max(1, ceil(rate))`: "50 per 1s" then allows 50 in the same instant, and never
    more than 50 + 50 in any second, so the limit reads the way it is written.
    """

    rate: Annotated[float, msgspec.Meta(gt=0, description="requests per `per`")]
    per: Duration = "1s"
    burst: (
        Annotated[int, msgspec.Meta(ge=1, description="requests allowed at once; default: ceil(rate)")] | None
    ) = None

    def __post_init__(self) -> None:
        _positive("per", self.per)

    @property
    def rate_per_second(self) -> float:
        return self.rate / seconds(self.per)

    @property
    def capacity(self) -> int:
        """The bucket size: `burst`, or one period's worth when it is omitted."""
        return self.burst if self.burst is not None else max(1, math.ceil(self.rate))


class CircuitBreakerConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """`circuit_breaker: {failure_rate: 0.5, window: 60s, min_requests: 10, cooldown: 30s}`.

    Opens when, within the last `window`, at least `min_requests` outcomes were seen and at least
    `failure_rate` of them failed; stays open for `cooldown`, then lets one probe through.
    """

    failure_rate: Annotated[
        float, msgspec.Meta(gt=0, le=1, description="failed fraction of the window that opens it")
    ] = 0.5
    window: Duration = "60s"
    min_requests: Annotated[
        int, msgspec.Meta(ge=1, description="outcomes in the window before it may open")
    ] = 10
    cooldown: Duration = "30s"

    def __post_init__(self) -> None:
        _positive("window", self.window)
        _positive("cooldown", self.cooldown)
