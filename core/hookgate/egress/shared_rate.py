"""An endpoint's rate limit shared by every process and replica: tokens leased in blocks from one
window kept in JetStream KV.

The window is one number per endpoint, the unix time at which the endpoint's bucket is full again
(the arrival time that `TokenBucket` keeps in one process). A process that needs tokens moves it on
by `n` intervals with compare-and-set, and so owns the next `n` slots of the endpoint's rate: token
`k` may be used from `start + k/rate - burst/rate` on. Each slot belongs to one process, so the
endpoint gets the configured rate however many processes deliver to it, and a process pays one
crossing into nats-py per lease, not per delivery.

Leases start at one token and double each time a process has used every token it leased (up to
`LEASE_SECONDS` of the rate); they halve when tokens go unused. An idle process holds at most a
token or two, and a busy one leases a fifth of a second of the rate at a time.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable

import msgspec
import trio

from hookgate.config.flow import RateLimitConfig
from hookgate.egress.flow import TokenBucket

log = logging.getLogger("hookgate.flow")

# The most of the rate one lease takes, in seconds of it, and in tokens.
LEASE_SECONDS = 0.2
MAX_LEASE = 1000
# A leased token not used this long after it became usable is given up: it would otherwise be a
# burst above the limit later, after a quiet spell.
HOLD = 2.0
# A lease the broker does not answer within this is given up, and the process limits on its own
# (the full rate, as if it were alone) for UNREACHABLE_FOR seconds before it tries again.
LEASE_TIMEOUT = 2.0
UNREACHABLE_FOR = 5.0
_EPSILON = 1e-9

# lease(count, interval): moves the shared window on by `count` tokens; the lease's start (unix).
Lease = Callable[[int, float], Awaitable[float]]


class RateWindow(msgspec.Struct, kw_only=True):
    """The value of `<endpoint>` in the rates bucket."""

    full_at: float  # unix time at which the endpoint's bucket is full again


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(RateWindow).decode


def lease_change(count: int, interval: float) -> Callable[[bytes | None], bytes]:
    """The compare-and-set step of a lease of `count` tokens: move the window on by their slots.

    It runs on the nats loop (see `Broker.kv_swap`): a pure function of the stored value and the
    clock. The lease's first slot starts at `stored.full_at - count * interval`."""

    def change(current: bytes | None) -> bytes:
        full_at = -math.inf
        if current:
            with contextlib.suppress(msgspec.DecodeError):  # unreadable: from a full bucket again
                full_at = _decode(current).full_at
        return _encode(RateWindow(full_at=max(full_at, time.time()) + count * interval))

    return change


def lease_start(stored: bytes, count: int, interval: float) -> float:
    """Where the lease that stored `stored` starts (unix time), for `count` tokens."""
    return _decode(stored).full_at - count * interval


class LeasedBucket:
    """A rate limiter that takes its tokens from a window shared with other processes.

    `lease(count, interval)` moves the shared window on by `count` tokens and returns the unix time
    at which the lease starts. Its slots are kept here in order; a caller takes the first and
    waits until it is usable, so waiting callers queue fairly, as with `TokenBucket`.
    """

    def __init__(self, config: RateLimitConfig, lease: Lease, name: str = ""):
        self.rate = config.rate_per_second
        self.burst = config.capacity
        self.name = name
        self._lease = lease
        self._interval = 1.0 / self.rate
        self._span = self.burst * self._interval
        self._max_lease = max(1, min(MAX_LEASE, math.ceil(self.rate * LEASE_SECONDS)))
        self._lease_size = 1
        self._slots: deque[tuple[float, float]] = deque()  # (usable from, given up at), trio time
        self._leasing: trio.Event | None = None
        self._deferred_until = -math.inf
        self._alone = TokenBucket(self.rate, self.burst)  # while the broker cannot be reached
        self._alone_until = -math.inf
        self.leases = 0  # how many leases this process took (for the cost figures)

    @property
    def tokens(self) -> float:
        """Leased tokens usable now (for metrics and tests)."""
        now = trio.current_time()
        return float(sum(1 for usable, _ in self._slots if usable <= now))

    async def acquire(self, max_wait: float) -> bool:
        """Wait for a token and return True, or return False at once if it would take over
        `max_wait`; a refused caller leaves the token for the next one."""
        while True:
            now = trio.current_time()
            self._give_up_stale(now)
            if self._slots:
                usable, given_up = self._slots[0]
                wait = usable - now
                if wait > max_wait + _EPSILON:
                    await trio.lowlevel.checkpoint()
                    return False
                self._slots.popleft()
                try:
                    await trio.sleep(max(0.0, wait))
                except BaseException:
                    self._slots.appendleft((usable, given_up))  # still ours, and still the first
                    raise
                return True
            if now < self._alone_until:
                return await self._alone.acquire(max_wait)
            await self._lease_more()

    def deferral_delay(self) -> float:
        """Seconds after which a refused caller should come back: when the next token is usable,
        spaced one interval apart for successive callers. Takes no token."""
        now = trio.current_time()
        if not self._slots and now < self._alone_until:
            return self._alone.deferral_delay()
        next_usable = self._slots[0][0] if self._slots else now
        at = max(self._deferred_until, next_usable)
        self._deferred_until = at + self._interval
        return max(0.0, at - now)

    def _give_up_stale(self, now: float) -> None:
        dropped = 0
        while self._slots and self._slots[0][1] < now:
            self._slots.popleft()
            dropped += 1
        if dropped:
            self._lease_size = max(1, self._lease_size // 2)

    async def _lease_more(self) -> None:
        """Lease the next block of tokens, once for every caller that finds none."""
        if self._leasing is not None:
            await self._leasing.wait()
            return
        self._leasing = done = trio.Event()
        count = self._lease_size
        try:
            # Shielded: once the window moved on, its slots are ours, and a cancelled caller must
            # not throw them away; the next caller uses them.
            with trio.CancelScope(shield=True), trio.fail_after(LEASE_TIMEOUT):
                start = await self._lease(count, self._interval)
        except Exception as exc:
            if self._alone_until == -math.inf or trio.current_time() >= self._alone_until + HOLD:
                log.warning(
                    "endpoint %s: cannot lease rate-limit tokens from the broker (%s); limiting in "
                    "this process alone for %gs",
                    self.name,
                    exc or type(exc).__name__,
                    UNREACHABLE_FOR,
                )
            self._alone_until = trio.current_time() + UNREACHABLE_FOR
            return
        finally:
            self._leasing = None
            done.set()
        self.leases += 1
        now = trio.current_time()
        offset = now - time.time()  # unix time to trio time
        for k in range(1, count + 1):
            usable = start + k * self._interval - self._span + offset
            self._slots.append((usable, max(usable, now) + HOLD))
        self._lease_size = min(self._max_lease, count * 2)
        await trio.lowlevel.checkpoint()
