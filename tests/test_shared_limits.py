"""Shared limits between processes, on one real nats-server: each `SharedLimits` here has its own
broker connection, as separate gateway processes or replicas would.

The end-to-end forms, with real gateways and a receiver, are in test_shared_limits_gateways.py.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import trio

from hookgate import config as config_mod
from hookgate.broker import Broker
from hookgate.config import EndpointConfig
from hookgate.egress.endpoint import Endpoint
from hookgate.egress.flow import CircuitState, FlowControl
from hookgate.egress.limits import SharedLimits
from hookgate.egress.shared_circuit import SharedBreaker
from hookgate.egress.shared_rate import LEASE_TIMEOUT
from hookgate.plugin_host.hooks import Hooks
from tests.support import NatsServer, base_config


@contextlib.asynccontextmanager
async def processes(nats_url: str, count: int) -> AsyncIterator[list[SharedLimits]]:
    """`count` running SharedLimits, each on a connection of its own."""
    loaded = config_mod.loads(base_config(nats_url), Hooks(()).registry)
    stopping = trio.Event()
    async with contextlib.AsyncExitStack() as stack:
        out = []
        for _ in range(count):
            broker = await stack.enter_async_context(Broker.connect(loaded.config.broker, nats_url))
            nursery = await stack.enter_async_context(trio.open_nursery())
            limits = SharedLimits(broker)
            await nursery.start(limits.run, stopping)
            out.append(limits)
        try:
            yield out
        finally:
            stopping.set()


def endpoint(**config: Any) -> Endpoint:
    return Endpoint.build("svc", msgspec.convert({"url": "http://127.0.0.1:9/in", **config}, EndpointConfig))


async def _until(condition: Any, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.01)


# --- rate ---------------------------------------------------------------------------------------


async def test_three_processes_share_one_rate(nats_server: NatsServer) -> None:
    """50/s over three processes, each with five callers taking tokens as fast as they come."""
    rate, burst = 50, 5
    taken: list[tuple[int, float]] = []
    async with processes(nats_server.url, 3) as limits:
        flows = [each.flow_for(endpoint(rate_limit={"rate": rate, "burst": burst})) for each in limits]
        start = trio.current_time()

        async def take(index: int, flow: FlowControl) -> None:
            while trio.current_time() < start + 3.0:
                assert await flow.admit(max_wait=5.0) is None
                taken.append((index, trio.current_time()))

        async with trio.open_nursery() as nursery:
            for index, flow in enumerate(flows):
                for _ in range(5):
                    nursery.start_soon(take, index, flow)
        crossings = sum(each.stats.crossings for each in limits)
    # After the burst, the three together take the rate, and each takes part of it.
    steady = [index for index, at in taken if start + 1.0 <= at < start + 3.0]
    assert 0.9 * 2 * rate <= len(steady) <= 1.1 * 2 * rate, len(steady)
    assert all(steady.count(index) >= 0.1 * len(steady) for index in range(3)), steady
    # Leases, not a crossing per token.
    assert crossings <= 0.5 * len(taken), (crossings, len(taken))


async def test_a_token_wait_beyond_max_wait_is_refused_and_kept(nats_server: NatsServer) -> None:
    async with processes(nats_server.url, 2) as (first, second):
        config = {"rate_limit": {"rate": 1, "per": "10s", "burst": 1}}
        a, b = first.flow_for(endpoint(**config)), second.flow_for(endpoint(**config))
        assert await a.admit(max_wait=1.0) is None  # the bucket's one token
        deferral = await b.admit(max_wait=1.0)  # the other process: the next token is 10 s away
        assert deferral is not None and deferral.reason == "rate_limit"
        assert 8.0 <= deferral.delay <= 10.5, deferral
        assert await a.admit(max_wait=1.0) is not None  # and the first process cannot take it either


# --- circuit ------------------------------------------------------------------------------------

BREAKER = {"circuit_breaker": {"failure_rate": 0.5, "window": "10s", "min_requests": 2, "cooldown": "1s"}}


async def test_a_circuit_opened_in_one_process_holds_the_others_and_one_probes(
    nats_server: NatsServer,
) -> None:
    async with processes(nats_server.url, 3) as limits:
        flows = [each.flow_for(endpoint(**BREAKER)) for each in limits]
        breakers = [flow.breaker for flow in flows]
        assert all(isinstance(b, SharedBreaker) for b in breakers)
        opener = flows[0]
        for _ in range(2):
            assert await opener.admit(max_wait=0) is None
            opener.record(503)
        await _until(lambda: all(b is not None and b.state is not CircuitState.CLOSED for b in breakers))
        refused = await flows[2].admit(max_wait=0)
        assert refused is not None and refused.reason == "circuit_open"
        # A process that builds its flow control now takes the open circuit on too.
        async with processes(nats_server.url, 1) as (late,):
            assert late.flow_for(endpoint(**BREAKER)).breaker.state is not CircuitState.CLOSED  # type: ignore[union-attr]

        # After the cooldown, all three want to send at once: one probe goes, the others wait
        # for its outcome.
        admitted: list[tuple[int, float]] = []

        async def send(index: int) -> None:
            assert await flows[index].admit(max_wait=5.0) is None
            admitted.append((index, trio.current_time()))

        async with trio.open_nursery() as nursery:
            for index in range(3):
                nursery.start_soon(send, index)
            await _until(lambda: len(admitted) >= 1)
            with trio.move_on_after(0.5):
                await _until(lambda: len(admitted) >= 2)
            assert len(admitted) == 1, admitted
            (prober, probed_at), *_ = admitted
            flows[prober].record(200)
        assert sorted(index for index, _ in admitted) == [0, 1, 2]
        assert all(at - probed_at < 1.0 for _, at in admitted)  # released by the probe's success
        await _until(lambda: all(b is not None and b.state is CircuitState.CLOSED for b in breakers))


async def test_a_failed_probe_opens_again_everywhere(nats_server: NatsServer) -> None:
    async with processes(nats_server.url, 2) as limits:
        first, second = (each.flow_for(endpoint(**BREAKER)) for each in limits)
        for _ in range(2):
            assert await first.admit(max_wait=0) is None
            first.record(None, "timeout")
        assert second.breaker is not None
        await _until(lambda: second.breaker is not None and second.breaker.state is not CircuitState.CLOSED)
        assert await second.admit(max_wait=2.0) is None  # the probe, after the cooldown
        opened_before = first.breaker.opened_at if first.breaker else None
        second.record(500)
        await _until(
            lambda: (
                first.breaker is not None
                and first.breaker.state is CircuitState.OPEN
                and first.breaker.opened_at != opened_before
            )
        )


# --- failing streaks ----------------------------------------------------------------------------


async def test_a_failing_streak_is_shared_and_outlives_the_process(nats_server: NatsServer) -> None:
    since = time.time() - 30
    async with processes(nats_server.url, 2) as (first, second):
        first.mark_failing("svc", since)
        await _until(lambda: second.failing_since("svc") is not None)
        second.mark_failing("svc", time.time())  # a later failure elsewhere keeps the streak's start
        assert second.failing_since("svc") == since
    async with processes(nats_server.url, 1) as (restarted,):
        assert restarted.failing_since("svc") == since
        restarted.clear_failing("svc")
    async with processes(nats_server.url, 1) as (again,):
        assert again.failing_since("svc") is None


async def test_a_probe_given_back_lets_another_process_probe_at_once(nats_server: NatsServer) -> None:
    """A probe refused by the rate limit (or cancelled) sends nothing: another process probes
    without waiting for the claim to expire (twice the 15 s timeout, plus 5 s)."""
    async with processes(nats_server.url, 2) as limits:
        first, second = (each.flow_for(endpoint(**BREAKER)) for each in limits)
        for _ in range(2):
            assert await first.admit(max_wait=0) is None
            first.record(500)
        assert first.breaker is not None
        assert await first.breaker.wait_until_allowed(max_wait=2.0)  # the probe, claimed
        first.release()  # ... and sent nothing
        # Well before the claim would expire (35 s), however busy the machine.
        with trio.fail_after(10):
            assert await second.admit(max_wait=10.0) is None  # the second process's probe


async def test_a_removed_endpoint_leaves_no_circuit_or_streak(nats_server: NatsServer) -> None:
    async with processes(nats_server.url, 2) as (first, second):
        flow = first.flow_for(endpoint(**BREAKER))
        for _ in range(2):
            assert await flow.admit(max_wait=0) is None
            flow.record(500)
        first.mark_failing("svc", time.time())
        await _until(lambda: second.failing_since("svc") is not None)
        second.remove("svc")
        await _until(lambda: first.failing_since("svc") is None)
        assert first.flow_for(endpoint(**BREAKER)) is flow
        await _until(lambda: flow.breaker is not None and flow.breaker.state is CircuitState.CLOSED)
    async with processes(nats_server.url, 1) as (restarted,):
        assert restarted.flow_for(endpoint(**BREAKER)).breaker.state is CircuitState.CLOSED  # type: ignore[union-attr]
        assert restarted.failing_since("svc") is None


async def test_without_the_broker_a_process_limits_on_its_own(nats_server: NatsServer) -> None:
    """A lease the broker does not answer within LEASE_TIMEOUT: the process keeps delivering at the
    endpoint's rate on its own (never faster) instead of stopping."""
    async with processes(nats_server.url, 1) as (limits,):
        flow = limits.flow_for(endpoint(rate_limit={"rate": 20, "burst": 2}))
        assert await flow.admit(max_wait=1.0) is None  # the broker answers: a lease
        leases = limits.stats.leases
        await nats_server.freeze()
        try:
            start = trio.current_time()
            admitted = 0
            while trio.current_time() < start + LEASE_TIMEOUT + 1.0:
                assert await flow.admit(max_wait=5.0) is None
                admitted += 1
            elapsed = trio.current_time() - start
        finally:
            nats_server.thaw()
        # Refused nothing; waited out the lease, then held 20/s on its own.
        assert 10 <= admitted <= 20 * (elapsed - LEASE_TIMEOUT) + 2 + 2, (admitted, elapsed)
        assert limits.stats.leases == leases


async def test_flow_for_keeps_one_flow_control_per_endpoint_until_its_limits_change(
    nats_server: NatsServer,
) -> None:
    async with processes(nats_server.url, 1) as (limits,):
        limited = {"rate_limit": {"rate": 10}, **BREAKER}
        flow = limits.flow_for(endpoint(**limited))
        # Another worker or lane of the endpoint, or a change elsewhere in its config: the same one.
        assert limits.flow_for(endpoint(**limited, headers={"X-New": "1"})) is flow
        changed = limits.flow_for(endpoint(**{**limited, "rate_limit": {"rate": 20}}))
        assert changed is not flow and changed.bucket is not None
        unlimited = limits.flow_for(endpoint())
        assert unlimited.bucket is None and unlimited.breaker is None
        assert await unlimited.admit(max_wait=0) is None
