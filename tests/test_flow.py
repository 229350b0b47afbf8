"""Flow control: the token bucket's rate and fairness, the circuit breaker's states, their configs.

Time-based tests run on trio's MockClock (the `autojump_clock` fixture): time jumps straight to the
next deadline when every task is asleep, so a 30 s cooldown takes no real time and every instant is
exact. The synchronous breaker tests use a hand-driven clock.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from typing import Literal, cast

import msgspec
import pytest
import trio
import trio.testing

from hookgate.config.flow import CircuitBreakerConfig, RateLimitConfig
from hookgate.egress.flow import (
    CircuitBreaker,
    CircuitState,
    Deferral,
    FlowControl,
    TokenBucket,
    breaker_outcome,
)

CLOSED, OPEN, HALF_OPEN = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class StepCounter(trio.abc.Instrument):
    """Counts how often each task is woken: a polling loop shows up as many steps."""

    def __init__(self) -> None:
        self.steps: Counter[trio.lowlevel.Task] = Counter()

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps[task] += 1


def _deferral(reason: Literal["rate_limit", "circuit_open"], delay: float) -> Deferral:
    """A Deferral that compares equal when its delay is about `delay`."""
    return Deferral(reason, cast(float, pytest.approx(delay)))


def breaker(clock: FakeClock | None = None, **config: object) -> CircuitBreaker:
    cfg = msgspec.convert(
        {"failure_rate": 0.5, "window": "60s", "min_requests": 10, "cooldown": "30s", **config},
        CircuitBreakerConfig,
    )
    return CircuitBreaker(cfg, clock=clock) if clock is not None else CircuitBreaker(cfg)


def record_many(b: CircuitBreaker, successes: int = 0, failures: int = 0) -> None:
    for _ in range(successes):
        b.record(True)
    for _ in range(failures):
        b.record(False)


# --- config ---------------------------------------------------------------------------------------


def test_rate_limit_config_as_in_design() -> None:
    cfg = msgspec.convert({"rate": 50, "per": "1s", "burst": 100}, RateLimitConfig)
    assert (cfg.rate_per_second, cfg.capacity) == (50.0, 100)
    per_minute = msgspec.convert({"rate": 30, "per": "1m"}, RateLimitConfig)
    assert per_minute.rate_per_second == pytest.approx(0.5)


@pytest.mark.parametrize(("rate", "capacity"), [(50, 50), (2.5, 3), (0.2, 1), (1, 1)])
def test_burst_defaults_to_one_period(rate: float, capacity: int) -> None:
    cfg = msgspec.convert({"rate": rate}, RateLimitConfig)
    assert cfg.per == "1s"
    assert cfg.burst is None
    assert cfg.capacity == capacity


def test_circuit_breaker_config_defaults() -> None:
    cfg = msgspec.convert({}, CircuitBreakerConfig)
    assert (cfg.failure_rate, cfg.window, cfg.min_requests, cfg.cooldown) == (0.5, "60s", 10, "30s")
    assert msgspec.convert({"failure_rate": 1}, CircuitBreakerConfig).failure_rate == 1.0


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ({}, "missing required field `rate`"),
        ({"rate": 0}, "Expected `float` > 0.0"),
        ({"rate": -1}, "Expected `float` > 0.0"),
        ({"rate": 1, "burst": 0}, "Expected `int` >= 1"),
        ({"rate": 1, "burst": 1.5}, "Expected `int | null`"),
        ({"rate": 1, "per": "0s"}, "per must be longer than 0"),
        ({"rate": 1, "per": "1 second"}, "Expected `str` matching regex"),
        ({"rate": 1, "period": "1s"}, "unknown field `period`"),
    ],
)
def test_rate_limit_config_errors(value: dict[str, object], words: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=words.replace("|", r"\|")):
        msgspec.convert(value, RateLimitConfig)


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ({"failure_rate": 0}, "Expected `float` > 0.0"),
        ({"failure_rate": 1.5}, "Expected `float` <= 1.0"),
        ({"min_requests": 0}, "Expected `int` >= 1"),
        ({"window": "0s"}, "window must be longer than 0"),
        ({"cooldown": "0ms"}, "cooldown must be longer than 0"),
        ({"cooldown": "30"}, "Expected `str` matching regex"),
        ({"threshold": 0.5}, "unknown field `threshold`"),
    ],
)
def test_circuit_breaker_config_errors(value: dict[str, object], words: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=words):
        msgspec.convert(value, CircuitBreakerConfig)


def test_configs_have_a_json_schema() -> None:
    # The lead generates config/ JSON Schema from the structs; these must take part.
    for struct in (RateLimitConfig, CircuitBreakerConfig):
        schema = msgspec.json.schema(struct)
        assert schema["$defs"][struct.__name__]["additionalProperties"] is False


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 1), (float("inf"), 1), (1, 0)])
def test_token_bucket_rejects_bad_arguments(rate: float, burst: int) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst, clock=FakeClock())


def test_breaker_rejects_bad_probe_timeout() -> None:
    with pytest.raises(ValueError, match="probe_timeout"):
        CircuitBreaker(CircuitBreakerConfig(), clock=FakeClock(), probe_timeout=0)


# --- token bucket ---------------------------------------------------------------------------------


def test_reserve_hands_out_successive_slots() -> None:
    clock = FakeClock()
    bucket = TokenBucket(10, 1, clock=clock)
    assert [bucket.reserve() for _ in range(4)] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    clock.advance(0.3)  # the last reservation is due now; the next free slot is 0.1 away
    assert bucket.available_in() == pytest.approx(0.1)
    assert bucket.tokens == pytest.approx(0.0, abs=1e-9)
    clock.advance(10)
    assert bucket.tokens == pytest.approx(1.0)  # full, and never more than burst


async def test_rate_is_exact_under_concurrency(autojump_clock: trio.testing.MockClock) -> None:
    bucket = TokenBucket(10, 1)
    times: list[float] = []

    async def take(n: int) -> None:
        for _ in range(n):
            assert await bucket.acquire(max_wait=60)
            times.append(trio.current_time())

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(take, 10)
    assert len(times) == 100
    assert trio.current_time() - start == pytest.approx(9.9, abs=0.3)
    assert times[-1] - start == pytest.approx(9.9, abs=1e-6)
    # Never two tokens closer than 1/rate apart at burst 1.
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) == pytest.approx(0.1, abs=1e-6)


async def test_waiters_are_served_in_order(autojump_clock: trio.testing.MockClock) -> None:
    bucket = TokenBucket(1, 1)
    order: list[int] = []

    async def take(i: int) -> None:
        assert await bucket.acquire(max_wait=60)
        order.append(i)

    async with trio.open_nursery() as nursery:
        for i in range(6):
            nursery.start_soon(take, i)
            await trio.sleep(0.01)  # each reserves before the next arrives
    assert order == list(range(6))


async def test_rate_on_the_real_clock() -> None:
    bucket = TokenBucket(100, 1)
    start = trio.current_time()

    async def take(n: int) -> None:
        for _ in range(n):
            assert await bucket.acquire(max_wait=5)

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(take, 6)
    elapsed = trio.current_time() - start
    assert 0.29 - 0.005 <= elapsed < 0.29 + 0.3


async def test_burst_goes_at_once_then_the_rate(autojump_clock: trio.testing.MockClock) -> None:
    bucket = TokenBucket(2, 5)
    start = trio.current_time()
    for _ in range(5):
        assert await bucket.acquire(max_wait=0)
    assert trio.current_time() == start
    assert not await bucket.acquire(max_wait=0.4)
    assert await bucket.acquire(max_wait=0.5)
    assert trio.current_time() - start == pytest.approx(0.5)
    # A long quiet spell refills the bucket to `burst`, not beyond.
    await trio.sleep(100)
    start = trio.current_time()
    for _ in range(5):
        assert await bucket.acquire(max_wait=0)
    assert not await bucket.acquire(max_wait=0)
    assert trio.current_time() == start


async def test_refusal_does_not_take_a_token(autojump_clock: trio.testing.MockClock) -> None:
    bucket = TokenBucket(1, 1)
    start = trio.current_time()
    assert await bucket.acquire(max_wait=0)
    for _ in range(10):
        assert not await bucket.acquire(max_wait=0.5)
    assert trio.current_time() == start  # refusing did not wait
    assert bucket.available_in() == pytest.approx(1.0)
    assert await bucket.acquire(max_wait=1.0)
    assert trio.current_time() - start == pytest.approx(1.0)  # not 11 s: no refusal took a token


async def test_cancelled_wait_gives_its_token_back(autojump_clock: trio.testing.MockClock) -> None:
    bucket = TokenBucket(1, 1)
    start = trio.current_time()
    assert await bucket.acquire(max_wait=0)
    with trio.move_on_after(0.5):
        await bucket.acquire(max_wait=10)  # reserved the slot at 1.0, then cancelled
    assert bucket.available_in() == pytest.approx(0.5)  # the slot at 1.0 is free again
    assert await bucket.acquire(max_wait=10)
    assert trio.current_time() - start == pytest.approx(1.0)


async def test_cancelled_wait_behind_others_leaves_its_slot_unused(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bucket = TokenBucket(1, 1)
    assert await bucket.acquire(max_wait=0)
    start = trio.current_time()
    got: list[float] = []

    async def take() -> None:
        assert await bucket.acquire(max_wait=10)
        got.append(trio.current_time() - start)

    first = trio.CancelScope()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_acquire_in, bucket, first)  # slot at 1.0
        await trio.sleep(0.01)
        nursery.start_soon(take)  # slot at 2.0
        await trio.sleep(0.5)
        first.cancel()
        await trio.sleep(0.1)
        nursery.start_soon(take)  # not 1.0: giving it back would put two tokens at 2.0 with burst 1
    assert got == pytest.approx([2.0, 3.0])


async def _acquire_in(bucket: TokenBucket, scope: trio.CancelScope) -> None:
    with scope:
        await bucket.acquire(max_wait=10)


def test_deferrals_are_spread_at_the_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(10, 1, clock=clock)
    assert bucket.reserve() == 0
    assert [bucket.deferral_delay() for _ in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert bucket.available_in() == pytest.approx(0.1)  # deferring took nothing
    clock.advance(10)  # the deferred backlog has drained: start again from the next free token
    assert bucket.deferral_delay() == 0.0


# --- circuit breaker: the state machine -------------------------------------------------------------


def test_opens_only_after_min_requests() -> None:
    b = breaker(FakeClock())
    record_many(b, failures=9)
    assert b.state is CLOSED and b.allow()
    b.record(False)
    assert b.state is OPEN and not b.allow()


def test_respects_the_failure_rate() -> None:
    b = breaker(FakeClock(), failure_rate=0.5)
    record_many(b, successes=6, failures=4)  # 0.4
    assert b.state is CLOSED
    b.record(False)  # 5/11
    assert b.state is CLOSED
    assert b.window_counts() == (11, 5)
    b.record(False)  # 6/12 = 0.5
    assert b.state is OPEN


def test_successes_alone_never_open() -> None:
    b = breaker(FakeClock(), failure_rate=1.0, min_requests=3)
    record_many(b, successes=1, failures=50)
    assert b.state is CLOSED
    b2 = breaker(FakeClock(), failure_rate=1.0, min_requests=3)
    record_many(b2, failures=3)
    assert b2.state is OPEN


def test_sliding_window_forgets_old_outcomes() -> None:
    clock = FakeClock(0.0)
    b = breaker(clock)
    record_many(b, failures=9)
    clock.advance(62)
    b.record(False)  # the nine are older than the window: one failure of one
    assert b.window_counts() == (1, 1)
    assert b.state is CLOSED
    # Old successes leave too, so recent failures weigh fully.
    clock.advance(1)
    record_many(b, successes=10)
    clock.advance(30)
    record_many(b, failures=8)  # 9 of 19 in the window
    assert b.state is CLOSED
    clock.advance(31)  # the successes (and the lone failure) have left the window
    assert b.window_counts() == (8, 8)
    b.record(False)
    assert b.window_counts() == (9, 9)
    assert b.state is CLOSED  # 9 < min_requests
    b.record(False)
    assert b.state is OPEN


def test_cooldown_then_a_single_probe() -> None:
    clock = FakeClock()
    b = breaker(clock)
    record_many(b, failures=10)
    assert b.opened_at == clock.now
    assert b.retry_at() == clock.now + 30
    clock.advance(29.9)
    assert b.state is OPEN and not b.allow()
    assert b.retry_in() == pytest.approx(0.1)
    clock.advance(0.1)
    assert b.state is HALF_OPEN
    assert b.allow()  # the probe
    assert [b.allow() for _ in range(5)] == [False] * 5
    assert b.retry_in() == pytest.approx(30)  # the probe's limit (probe_timeout defaults to cooldown)


def test_probe_success_closes_with_a_fresh_window() -> None:
    clock = FakeClock()
    b = breaker(clock)
    record_many(b, successes=5, failures=10)
    clock.advance(30)
    assert b.allow()
    b.record(True)
    assert b.state is CLOSED and b.opened_at is None
    assert b.window_counts() == (0, 0)
    assert all(b.allow() for _ in range(20))
    record_many(b, failures=9)  # min_requests counts again from zero
    assert b.state is CLOSED


def test_probe_failure_reopens_for_another_cooldown() -> None:
    clock = FakeClock()
    b = breaker(clock)
    record_many(b, failures=10)
    clock.advance(30)
    assert b.allow()
    clock.advance(2)
    b.record(False)
    assert b.state is OPEN
    assert b.opened_at == clock.now
    clock.advance(29)
    assert not b.allow()
    clock.advance(1)
    assert b.allow()
    assert not b.allow()


def test_stragglers_do_not_decide() -> None:
    clock = FakeClock()
    b = breaker(clock)
    record_many(b, failures=10)
    record_many(b, successes=5)  # requests started before it opened: ignored while open
    assert b.state is OPEN
    clock.advance(30)
    b.record(True)  # half-open, but no probe is out: not a probe's outcome
    assert b.state is HALF_OPEN
    assert b.allow()


def test_release_lets_another_caller_probe() -> None:
    clock = FakeClock()
    b = breaker(clock)
    record_many(b, failures=10)
    clock.advance(30)
    assert b.allow()
    assert not b.allow()
    b.release()
    assert b.state is HALF_OPEN
    assert b.allow()
    b.release()
    b.release()  # harmless when no probe is out
    assert b.allow()


def test_lost_probe_is_given_up_after_probe_timeout() -> None:
    clock = FakeClock()
    b = CircuitBreaker(CircuitBreakerConfig(min_requests=1), clock=clock, probe_timeout=5)
    b.record(False)
    clock.advance(30)
    assert b.allow()
    clock.advance(4.9)
    assert not b.allow()
    assert b.retry_in() == pytest.approx(0.1)
    clock.advance(0.1)
    assert b.allow()  # a new probe


def test_transitions_are_reported() -> None:
    clock = FakeClock()
    seen: list[tuple[CircuitState, CircuitState]] = []
    b = CircuitBreaker(
        CircuitBreakerConfig(min_requests=2), clock=clock, on_change=lambda old, new: seen.append((old, new))
    )
    record_many(b, failures=2)
    clock.advance(30)
    assert b.allow()
    b.record(False)
    clock.advance(30)
    assert b.allow()
    b.record(True)
    assert seen == [
        (CLOSED, OPEN),
        (OPEN, HALF_OPEN),
        (HALF_OPEN, OPEN),
        (OPEN, HALF_OPEN),
        (HALF_OPEN, CLOSED),
    ]


def test_a_failing_observer_does_not_break_the_breaker(caplog: pytest.LogCaptureFixture) -> None:
    def boom(old: CircuitState, new: CircuitState) -> None:
        raise RuntimeError("metrics down")

    b = CircuitBreaker(CircuitBreakerConfig(min_requests=1), clock=FakeClock(), on_change=boom)
    with caplog.at_level(logging.ERROR, logger="hookgate.flow"):
        b.record(False)
    assert b.state is OPEN
    assert "on_change callback failed" in caplog.text


# --- circuit breaker: waiting -----------------------------------------------------------------------


async def test_wait_sleeps_once_until_the_cooldown_ends(autojump_clock: trio.testing.MockClock) -> None:
    b = breaker(cooldown="30s")
    record_many(b, failures=10)
    opened = trio.current_time()
    counter = StepCounter()
    trio.lowlevel.add_instrument(counter)
    task = trio.lowlevel.current_task()
    try:
        assert await b.wait_until_allowed(max_wait=60)
    finally:
        trio.lowlevel.remove_instrument(counter)
    assert trio.current_time() - opened == pytest.approx(30)
    # Polling every 10 ms would be ~3000 wakeups; one sleep and one schedule point is 2-3.
    assert counter.steps[task] <= 3
    assert b.state is HALF_OPEN  # and we are the probe
    assert not b.allow()


async def test_wait_refuses_at_once_if_the_cooldown_is_too_far(
    autojump_clock: trio.testing.MockClock,
) -> None:
    b = breaker(cooldown="30s")
    record_many(b, failures=10)
    start = trio.current_time()
    assert not await b.wait_until_allowed(max_wait=29)
    assert trio.current_time() == start
    assert b.retry_in() == pytest.approx(30)
    assert await b.wait_until_allowed(max_wait=30)
    assert trio.current_time() - start == pytest.approx(30)


async def test_waiters_are_admitted_when_the_probe_succeeds(autojump_clock: trio.testing.MockClock) -> None:
    b = breaker(cooldown="30s")
    record_many(b, failures=10)
    start = trio.current_time()
    counter = StepCounter()
    probes: list[float] = []
    others: list[float] = []
    tasks: dict[trio.lowlevel.Task, bool] = {}

    async def waiter() -> None:
        assert await b.wait_until_allowed(max_wait=60)
        is_probe = b.state is HALF_OPEN
        tasks[trio.lowlevel.current_task()] = is_probe
        if is_probe:  # the probe's request takes 5 s and succeeds
            probes.append(trio.current_time() - start)
            await trio.sleep(5)
            b.record(True)
        else:
            others.append(trio.current_time() - start)

    trio.lowlevel.add_instrument(counter)
    try:
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(waiter)
    finally:
        trio.lowlevel.remove_instrument(counter)
    assert probes == [pytest.approx(30)]
    assert others == [pytest.approx(35)] * 4
    assert b.state is CLOSED
    # Each: start, cooldown over, probe done, a schedule point on admission.
    assert max(counter.steps[t] for t, probe in tasks.items() if not probe) <= 5


async def test_waiters_give_up_when_the_probe_fails(autojump_clock: trio.testing.MockClock) -> None:
    b = breaker(cooldown="30s")
    record_many(b, failures=10)
    await trio.sleep(30)
    assert b.allow()  # the probe is out
    start = trio.current_time()
    results: list[tuple[bool, float]] = []

    async def waiter() -> None:
        ok = await b.wait_until_allowed(max_wait=20)
        results.append((ok, trio.current_time() - start))

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(waiter)
        await trio.sleep(2)
        b.record(False)  # reopens for 30 s: more than the waiters will wait
    assert results == [(False, pytest.approx(2))] * 3
    assert b.state is OPEN


async def test_waiters_time_out_while_a_probe_is_out(autojump_clock: trio.testing.MockClock) -> None:
    b = breaker(cooldown="30s")
    record_many(b, failures=10)
    await trio.sleep(30)
    assert b.allow()
    start = trio.current_time()
    assert not await b.wait_until_allowed(max_wait=3)
    assert trio.current_time() - start == pytest.approx(3)


async def test_wait_is_cancellable(autojump_clock: trio.testing.MockClock) -> None:
    b = breaker()
    record_many(b, failures=10)
    with trio.move_on_after(1) as scope:
        await b.wait_until_allowed(max_wait=60)
    assert scope.cancelled_caught
    assert b.state is OPEN


async def test_closed_breaker_admits_without_waiting(autojump_clock: trio.testing.MockClock) -> None:
    b = breaker()
    start = trio.current_time()
    assert await b.wait_until_allowed(max_wait=0)
    assert trio.current_time() == start


# --- outcomes and FlowControl -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error_kind", "outcome"),
    [
        (200, None, True),
        (204, None, True),
        (301, "http_status", True),
        (400, "http_status", True),
        (401, "http_status", True),
        (404, "http_status", True),
        (410, "http_status", True),
        (422, "http_status", True),
        (408, "http_status", False),
        (429, "http_status", False),
        (500, "http_status", False),
        (503, "http_status", False),
        (None, "timeout", False),
        (None, "connect", False),
        (None, "tls", False),
        (None, "protocol", False),
        (None, "destination", False),
        (None, "ssrf_refused", None),
    ],
)
def test_breaker_outcome(status: int | None, error_kind: str | None, outcome: bool | None) -> None:
    assert breaker_outcome(status, error_kind) is outcome


async def test_flow_defers_on_an_open_circuit(autojump_clock: trio.testing.MockClock) -> None:
    flow = FlowControl(RateLimitConfig(rate=1), CircuitBreakerConfig(min_requests=2, cooldown="30s"))
    for _ in range(2):
        assert await flow.admit(max_wait=1) is None
        await trio.sleep(1)
        flow.record(None, "timeout")
    assert flow.breaker is not None and flow.breaker.state is OPEN
    await trio.sleep(10)
    tokens = flow.bucket.tokens if flow.bucket else 0
    assert await flow.admit(max_wait=5) == _deferral("circuit_open", 20)
    assert flow.bucket is not None and flow.bucket.tokens == pytest.approx(tokens)  # no token spent


async def test_flow_defers_on_the_rate_limit_and_frees_the_probe(
    autojump_clock: trio.testing.MockClock,
) -> None:
    flow = FlowControl(RateLimitConfig(rate=1, per="100s"), CircuitBreakerConfig(min_requests=1))
    assert await flow.admit(max_wait=1) is None
    flow.record(503, "http_status")
    await trio.sleep(30)  # cooldown over; the bucket's next token is 70 s away
    assert await flow.admit(max_wait=1) == _deferral("rate_limit", 70)
    assert flow.breaker is not None and flow.breaker.allow()  # the refused probe was released
    flow.breaker.release()
    await trio.sleep(70)
    assert await flow.admit(max_wait=1) is None
    flow.record(200)
    assert flow.breaker.state is CLOSED


async def test_flow_max_wait_is_shared(autojump_clock: trio.testing.MockClock) -> None:
    flow = FlowControl(
        RateLimitConfig(rate=1, per="10s"), CircuitBreakerConfig(min_requests=1, cooldown="3s")
    )
    assert await flow.admit(max_wait=0) is None  # takes the only token; the next is at 10 s
    flow.record(500)
    start = trio.current_time()
    # 3 s of cooldown leave 5 s of the 8 for the bucket, which needs 7: deferred, not held 10 s.
    assert await flow.admit(max_wait=8) == _deferral("rate_limit", 7)
    assert trio.current_time() - start == pytest.approx(3)
    # The next deferral comes back one token (10 s) after the first, not with it.
    assert await flow.admit(max_wait=2) == _deferral("rate_limit", 17)
    assert await flow.admit(max_wait=7) is None
    assert trio.current_time() - start == pytest.approx(10)


async def test_flow_without_limits_admits_everything() -> None:
    flow = FlowControl()
    assert await flow.admit(max_wait=0) is None
    flow.record(None, "timeout")
    flow.release()
