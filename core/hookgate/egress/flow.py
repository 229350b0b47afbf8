"""Flow control for one endpoint: a token-bucket rate limit and a circuit breaker.

Both are in-process and per endpoint, in trio, with no broker: the dispatcher asks them before an
attempt and tells the breaker the outcome after it. Neither ever blocks for long. When the wait for
admission would be longer than the caller is willing to hold a delivery (`max_wait`), they say no at
once and leave the delivery untouched, so the dispatcher can defer it with a scheduled message that
does not use up an attempt (DESIGN: "A deferral for a rate limit or an open circuit does not use up
an attempt").

Clock: every class takes `clock: Callable[[], float]`, default `trio.current_time`. Trio's clock is
monotonic (wall-clock jumps do not refill a bucket or end a cooldown early), it is the clock
`trio.sleep` counts in, so a computed wait and the sleep that honours it agree, and under trio's
`MockClock` tests run instantly and deterministically. The times these classes return (`opened_at`,
`retry_at()`) are on that clock; use the `*_in()` / `deferral_delay()` forms, which are seconds from
now, to schedule on the wall clock. A different clock is only for synchronous use (`reserve()`,
`allow()`, `record()`); the async methods sleep with trio and need a clock that trio's sleeps advance.

These classes keep their state in one process. `hookgate.egress.limits` builds the FlowControl of
each endpoint with the shared forms (`LeasedBucket`, `SharedBreaker`), which hold across every
process and replica through JetStream KV.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal, Protocol

import trio

from hookgate.config.flow import CircuitBreakerConfig, RateLimitConfig
from hookgate.plugin_kit.units import seconds

log = logging.getLogger("hookgate.flow")

Clock = Callable[[], float]

# Float noise in "when is the next token" and "has the cooldown passed" must not turn an admission
# into a sleep of a few femtoseconds (or a sleep that wakes a hair early into a second sleep).
_EPSILON = 1e-9

# The breaker's window is kept as this many slices of counts, not one entry per request: memory and
# time per outcome stay constant at any request rate, and an outcome is forgotten between `window`
# and `window * (1 + 1/WINDOW_SLICES)` after it was recorded.
WINDOW_SLICES = 60


# --- rate limit -----------------------------------------------------------------------------------


class TokenBucket:
    """A token bucket that hands out future tokens in order, so waiting callers queue fairly.

    It is kept as one number, the time at which the bucket will be full again (GCRA's theoretical
    arrival time): no refill arithmetic that drifts, and taking a token, now or ahead, is moving
    that time one interval on. Because a
    token reserved for later is taken from the bucket at once, concurrent callers get successive
    slots one `1/rate` apart and the long-run rate is exact however many wait at the same time.
    """

    def __init__(self, rate_per_second: float, burst: int, *, clock: Clock = trio.current_time):
        if not rate_per_second > 0 or math.isinf(rate_per_second):
            raise ValueError(f"rate_per_second must be a positive number, got {rate_per_second!r}")
        if burst < 1:
            raise ValueError(f"burst must be at least 1, got {burst!r}")
        self.rate = float(rate_per_second)
        self.burst = int(burst)
        self._clock = clock
        self._interval = 1.0 / self.rate
        self._span = self.burst * self._interval  # how far ahead of now a full bucket's tokens reach
        self._tat = -math.inf  # when the bucket is full again if nobody takes more; in the past: full
        self._deferred_until = -math.inf

    @classmethod
    def from_config(cls, config: RateLimitConfig, *, clock: Clock = trio.current_time) -> TokenBucket:
        return cls(config.rate_per_second, config.capacity, clock=clock)

    def _slot(self, now: float) -> tuple[float, float]:
        """(the new arrival time after taking one token, seconds until that token is available)."""
        tat = max(self._tat, now) + self._interval
        wait = tat - self._span - now
        return tat, wait if wait > _EPSILON else 0.0

    @property
    def tokens(self) -> float:
        """Tokens in the bucket now; negative when tokens are reserved ahead (for metrics)."""
        now = self._clock()
        return (now + self._span - max(self._tat, now)) / self._interval

    def available_in(self) -> float:
        """Seconds until a token would be available to a new caller, without reserving it."""
        return self._slot(self._clock())[1]

    def reserve(self) -> float:
        """Take a token: 0 if it was available now, else the seconds until it is (it is kept for you).

        The caller must wait that long before sending. Reserving even when it must wait is what
        makes concurrent callers queue in order instead of racing for each token as it appears.
        """
        self._tat, wait = self._slot(self._clock())
        return wait

    async def acquire(self, max_wait: float) -> bool:
        """Wait for a token and return True, or return False at once if it would take over `max_wait`.

        Refusing does not take a token, so a delivery deferred elsewhere costs the bucket nothing.
        If the wait is cancelled and nobody reserved after us, the token is given back; if somebody
        did, it is left unused (a slot lost, never a burst above the limit).
        """
        now = self._clock()
        tat, wait = self._slot(now)
        if wait > max_wait:
            await trio.lowlevel.checkpoint()
            return False
        self._tat = tat
        try:
            await trio.sleep(wait)
        except BaseException:
            if self._tat == tat:
                self._tat -= self._interval
            raise
        return True

    def deferral_delay(self) -> float:
        """Seconds after which a caller refused by `acquire` should come back.

        Successive calls are spaced one token apart beyond the next free token, so a backlog of
        deferred deliveries returns at about the rate the bucket can admit it instead of all at
        once (where all but `burst` would be deferred again). Takes no token.
        """
        now = self._clock()
        at = max(self._deferred_until, now + self._slot(now)[1])
        self._deferred_until = at + self._interval
        return at - now


# --- circuit breaker ------------------------------------------------------------------------------


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


OnChange = Callable[[CircuitState, CircuitState], None]


class CircuitBreaker:
    """Stops sending to an endpoint that is failing, and lets one probe find out when it is back.

    closed: everything is admitted and outcomes are counted over a sliding `window`; when at least
    `min_requests` were seen and at least `failure_rate` of them failed, it opens. open: nothing is
    admitted until `cooldown` has passed, then it is half-open. half-open: one probe is admitted at
    a time; its success closes the circuit (with a fresh window), its failure opens it for another
    cooldown.

    Outcomes recorded while open are ignored: they belong to requests started before it opened. In
    half-open, an outcome recorded while a probe is out is taken as the probe's. A probe whose
    outcome never comes (a bug, a cancelled caller that did not `release()`) is given up after
    `probe_timeout` (default: the cooldown), and another probe is admitted.

    `on_change(old, new)` is called on every transition, for logs and metrics; an exception in it
    is logged and does not change the breaker. Transitions out of open happen when the breaker is
    next asked (no timer task), so the callback runs in the asking task.
    """

    def __init__(
        self,
        config: CircuitBreakerConfig,
        *,
        clock: Clock = trio.current_time,
        on_change: OnChange | None = None,
        probe_timeout: float | None = None,
    ):
        self.failure_rate = config.failure_rate
        self.window = seconds(config.window)
        self.min_requests = config.min_requests
        self.cooldown = seconds(config.cooldown)
        self.probe_timeout = self.cooldown if probe_timeout is None else probe_timeout
        if self.probe_timeout <= 0:
            raise ValueError(f"probe_timeout must be positive, got {probe_timeout!r}")
        self.on_change = on_change
        self._clock = clock
        self._slice = self.window / WINDOW_SLICES
        self._slices: deque[list[int]] = deque()  # [slice index, outcomes, failures], oldest first
        self._total = 0
        self._failures = 0
        self._state = CircuitState.CLOSED
        self._opened_at: float | None = None
        self._probe_since: float | None = None  # half-open with a probe out: when it was admitted
        self._probe_done = trio.Event()

    # -- reading ---------------------------------------------------------------------------------

    @property
    def state(self) -> CircuitState:
        self._advance(self._clock())
        return self._state

    @property
    def opened_at(self) -> float | None:
        """When the circuit last opened (on the breaker's clock), while it is open or half-open."""
        return self._opened_at

    def retry_at(self) -> float:
        """The earliest time (breaker's clock) `allow()` may admit: now, the end of the cooldown, or,
        while a probe is out, when that probe would be given up (it usually reports well before)."""
        now = self._clock()
        self._advance(now)
        if self._state is CircuitState.OPEN:
            assert self._opened_at is not None
            return self._opened_at + self.cooldown
        if self._probe_since is not None:
            return self._probe_since + self.probe_timeout
        return now

    def retry_in(self) -> float:
        """Seconds from now until `retry_at()`, for scheduling a deferral on another clock."""
        return max(0.0, self.retry_at() - self._clock())

    def window_counts(self) -> tuple[int, int]:
        """(outcomes, failures) in the current window, closed state only (for logs and tests)."""
        self._prune(self._clock())
        return self._total, self._failures

    # -- admitting -------------------------------------------------------------------------------

    def allow(self) -> bool:
        """May a request go now? In half-open, True makes the caller the probe: it must `record()`
        the outcome (or `release()` if it sent nothing), or no other request goes until
        `probe_timeout`."""
        now = self._clock()
        self._advance(now)
        if self._state is CircuitState.CLOSED:
            return True
        if self._state is CircuitState.HALF_OPEN and self._probe_since is None:
            self._probe_since = now
            self._probe_done = trio.Event()
            return True
        return False

    async def wait_until_allowed(self, max_wait: float) -> bool:
        """Wait until `allow()` admits, up to `max_wait` seconds; False (at once if that is already
        clear) when it will not.

        No polling: open, it sleeps once until the cooldown ends (or returns False at once if that
        is past `max_wait`); half-open with a probe out, it waits on the probe's completion, since
        only that outcome can change the answer. True in half-open means the caller is the probe.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        deadline = self._clock() + max_wait
        while True:
            if self.allow():
                # A schedule point that cannot be cancelled: a probe just admitted is not lost.
                await trio.lowlevel.cancel_shielded_checkpoint()
                if self._state is CircuitState.HALF_OPEN and not await self._claim_probe():
                    continue  # another process probes: wait for its outcome like for our own
                return True
            now = self._clock()
            if self._state is CircuitState.OPEN:
                assert self._opened_at is not None
                until = self._opened_at + self.cooldown
                if until > deadline + _EPSILON:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    return False
                await trio.sleep(max(0.0, until - now))
            else:  # half-open with a probe out
                assert self._probe_since is not None
                if now >= deadline:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    return False
                until = min(deadline, self._probe_since + self.probe_timeout)
                with trio.move_on_after(max(0.0, until - now)):
                    await self._probe_done.wait()

    async def _claim_probe(self) -> bool:
        """The probe `allow()` just admitted may go: always, in one process. A breaker shared
        between processes claims it from the others first (False: another one probes)."""
        return True

    # -- outcomes --------------------------------------------------------------------------------

    def record(self, success: bool) -> None:
        """Count the outcome of an admitted request (see `breaker_outcome` for what is a failure)."""
        now = self._clock()
        self._advance(now)
        if self._state is CircuitState.CLOSED:
            self._add(now, success)
            if self._total >= self.min_requests and self._failures >= self.failure_rate * self._total:
                self._open(now)
        elif self._state is CircuitState.HALF_OPEN and self._probe_since is not None:
            self._probe_since = None
            if success:
                self._close()
            else:
                self._open(now)
            self._probe_done.set()
        # open (or half-open with no probe out): a straggler from before the circuit opened.

    def release(self) -> None:
        """The admitted caller sent nothing (cancelled, refused by the rate limit): if it was the
        probe, let another caller probe now instead of after `probe_timeout`."""
        self._advance(self._clock())
        if self._state is CircuitState.HALF_OPEN and self._probe_since is not None:
            self._probe_since = None
            self._probe_done.set()

    # -- internals -------------------------------------------------------------------------------

    def _advance(self, now: float) -> None:
        """Apply the transitions that time alone causes: cooldown over, probe given up."""
        if self._state is CircuitState.OPEN:
            assert self._opened_at is not None
            if now + _EPSILON >= self._opened_at + self.cooldown:
                self._set_state(CircuitState.HALF_OPEN)
        elif (
            self._state is CircuitState.HALF_OPEN
            and self._probe_since is not None
            and now + _EPSILON >= self._probe_since + self.probe_timeout
        ):
            log.warning(
                "circuit breaker: a probe reported nothing in %gs; admitting another", self.probe_timeout
            )
            self._probe_since = None
            self._probe_done.set()

    def _add(self, now: float, success: bool) -> None:
        index = math.floor(now / self._slice)
        if self._slices and self._slices[-1][0] == index:
            current = self._slices[-1]
        else:
            current = [index, 0, 0]
            self._slices.append(current)
        current[1] += 1
        self._total += 1
        if not success:
            current[2] += 1
            self._failures += 1
        self._prune(now)

    def _prune(self, now: float) -> None:
        # A slice is forgotten once all of it is older than the window.
        oldest_kept = math.floor((now - self.window) / self._slice)
        while self._slices and self._slices[0][0] < oldest_kept:
            _, total, failures = self._slices.popleft()
            self._total -= total
            self._failures -= failures

    def _clear_window(self) -> None:
        self._slices.clear()
        self._total = self._failures = 0

    def _open(self, now: float) -> None:
        self._opened_at = now
        self._clear_window()
        self._set_state(CircuitState.OPEN)

    def _close(self) -> None:
        self._opened_at = None
        self._clear_window()
        self._set_state(CircuitState.CLOSED)

    def _set_state(self, new: CircuitState) -> None:
        old, self._state = self._state, new
        if self.on_change is not None and old is not new:
            try:
                self.on_change(old, new)
            except Exception:
                log.exception("circuit breaker on_change callback failed (%s -> %s)", old, new)


# --- what counts, and both together ---------------------------------------------------------------


def breaker_outcome(status: int | None, error_kind: str | None = None) -> bool | None:
    """Is this attempt's result a success (True) or failure (False) for the breaker, or not counted?

    The breaker is about the endpoint's health, not the event's fate. Failures: no response at all
    (timeout, connect, TLS, protocol, the NATS destination refusing), 5xx, 429 (the endpoint asks us
    to back off: the breaker does so for all deliveries) and 408. Any other response, 4xx included,
    shows a live endpoint deciding about one request and counts as success: a 400 or 404 is retried
    and dead-lettered by the schedule, while an open circuit would defer it forever without using up
    attempts. An SSRF refusal is not counted: no request was made; nor is an internal error, which
    is the gateway's fault (or a plugin's), not the endpoint's.
    """
    if error_kind in ("ssrf_refused", "internal"):
        return None
    if status is None:
        return False
    return not (status >= 500 or status in (408, 429))


class RateLimiter(Protocol):
    """What FlowControl asks of a rate limit: a TokenBucket, or one shared between processes."""

    @property
    def tokens(self) -> float: ...

    async def acquire(self, max_wait: float) -> bool: ...

    def deferral_delay(self) -> float: ...


@dataclass(frozen=True, slots=True)
class Deferral:
    """Why a delivery was not admitted, and how many seconds from now to try it again."""

    reason: Literal["rate_limit", "circuit_open"]
    delay: float


class FlowControl:
    """An endpoint's rate limit and breaker, asked in the right order. Either may be absent.

    The breaker is asked first: asking the bucket first would spend tokens on deliveries that an
    open circuit then defers, throttling the deferrals themselves. A probe that the bucket then
    refuses is released at once so that another delivery can probe.
    """

    def __init__(
        self,
        rate_limit: RateLimitConfig | None = None,
        circuit_breaker: CircuitBreakerConfig | None = None,
        *,
        clock: Clock = trio.current_time,
        on_change: OnChange | None = None,
        probe_timeout: float | None = None,
    ):
        self._clock = clock
        self.bucket: RateLimiter | None = (
            TokenBucket.from_config(rate_limit, clock=clock) if rate_limit else None
        )
        self.breaker = (
            CircuitBreaker(circuit_breaker, clock=clock, on_change=on_change, probe_timeout=probe_timeout)
            if circuit_breaker
            else None
        )

    @classmethod
    def of(
        cls, bucket: RateLimiter | None, breaker: CircuitBreaker | None, *, clock: Clock = trio.current_time
    ) -> FlowControl:
        """Flow control over a rate limiter and breaker built elsewhere (the shared ones)."""
        flow = cls(clock=clock)
        flow.bucket, flow.breaker = bucket, breaker
        return flow

    async def admit(self, max_wait: float) -> Deferral | None:
        """None: send now (then `record()` or `release()`). A Deferral: do not send; come back later.

        Waits at most `max_wait` in all: the bucket gets what the breaker left of it.
        """
        deadline = self._clock() + max_wait
        if self.breaker is not None and not await self.breaker.wait_until_allowed(max_wait):
            return Deferral("circuit_open", self.breaker.retry_in())
        if self.bucket is not None:
            try:
                admitted = await self.bucket.acquire(max(0.0, deadline - self._clock()))
            except BaseException:
                self.release()
                raise
            if not admitted:
                self.release()
                return Deferral("rate_limit", self.bucket.deferral_delay())
        return None

    def record(self, status: int | None, error_kind: str | None = None) -> None:
        """Tell the breaker how an admitted attempt went."""
        if self.breaker is not None:
            outcome = breaker_outcome(status, error_kind)
            if outcome is None:
                self.breaker.release()
            else:
                self.breaker.record(outcome)

    def release(self) -> None:
        """An admitted delivery was not sent after all (cancelled): free the probe if it was one."""
        if self.breaker is not None:
            self.breaker.release()
