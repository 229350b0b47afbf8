"""Rate limits, circuits and the auto-disable clock across gateway replicas: real gateways in one
trio run, sharing one real nats-server, delivering to one receiver."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
import trio

from tests.support import Gateway, NatsServer, Received, base_config, receiver, run_gateway
from tests.test_metrics import _samples


def _config(nats_url: str, url: str, replica: str, extra: str) -> str:
    return base_config(
        nats_url,
        f"""
        endpoints:
          svc:
            url: "{url}/in"
            concurrency: 10
            headers: {{X-Replica: "{replica}"}}
        {extra}
        routes:
          - {{from: [internal], to: [svc]}}
        """,
    )


@contextlib.asynccontextmanager
async def replicas(
    tmp_path: Path, nats_url: str, url: str, count: int, extra: str
) -> AsyncIterator[list[Gateway]]:
    """`count` gateways on one nats-server; each marks its requests with X-Replica."""
    async with contextlib.AsyncExitStack() as stack:
        gateways = []
        for index in range(count):
            directory = tmp_path / f"replica-{index}"
            directory.mkdir(parents=True)
            text = _config(nats_url, url, str(index), extra)
            gateways.append(await stack.enter_async_context(run_gateway(directory, text)))
        yield gateways


@pytest.mark.parametrize("count", [1, 2, 3])
async def test_the_rate_limit_is_the_endpoints_whatever_the_replicas(
    tmp_path: Path, nats_server: NatsServer, count: int
) -> None:
    """25/s with a burst of 5: after the burst, the receiver sees 25/s within 10%, however many
    replicas deliver (without sharing, each replica would send 25/s)."""
    rate, window = 25, 4.0
    limit = "    rate_limit: {rate: 25, per: 1s, burst: 5}"
    async with receiver() as rx, replicas(tmp_path, nats_server.url, rx.url, count, limit) as gws:
        for n in range(int(rate * (window + 2)) + 20):
            await gws[n % count].publish("tick", {"n": n})
        first = (await rx.wait_for(1, timeout=10))[0]
        start = first.at + 1.0  # past the burst
        await rx.wait_for(1, timeout=window + 5, predicate=lambda r: r.at >= start + window)
    arrived = [r for r in rx.requests if start <= r.at < start + window]
    assert 0.9 * rate * window <= len(arrived) <= 1.1 * rate * window, len(arrived)
    by_replica = [sum(1 for r in arrived if r.headers["x-replica"] == str(i)) for i in range(count)]
    assert all(n > 0 for n in by_replica), by_replica  # every replica delivered its part
    assert {r.headers["hookgate-attempt"] for r in arrived} == {"1"}


async def test_a_circuit_opened_on_one_replica_holds_the_others_and_one_probes(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    healthy = False

    def respond(request: Received, n: int) -> int | float:
        return 0.5 if healthy else 500  # healthy: 200, after half a second

    breaker = """    retry: {schedule: [100ms, 100ms, 100ms, 100ms, 100ms, 100ms], jitter: 0}
            circuit_breaker: {failure_rate: 0.5, window: 30s, min_requests: 2, cooldown: 3s}"""
    async with receiver(respond) as rx, replicas(tmp_path, nats_server.url, rx.url, 2, breaker) as gws:
        await gws[0].publish("x", {"n": 0})

        async def circuit_open(gw: Gateway) -> bool:
            samples = _samples((await gw.http.get(f"{gw.url}/metrics")).text)
            return samples.get(("hookgate_endpoint_circuit_open", (("endpoint", "svc"),))) == 1

        with trio.fail_after(10):
            while not all([await circuit_open(gw) for gw in gws]):
                await trio.sleep(0.05)
        failures = len(rx.requests)
        last_failure = rx.requests[-1].at
        healthy = True
        for n in range(1, 7):  # to both replicas, while the circuit is open
            await gws[n % 2].publish("x", {"n": n})
        got = await rx.wait_for(failures + 7, timeout=20)
    after = got[failures:]
    # Nothing went out while the circuit was open, from either replica ...
    assert after[0].at - last_failure >= 2.5, after[0].at - last_failure
    # ... then one probe, and nothing else until it was answered (half a second later).
    assert after[1].at - after[0].at >= 0.45, [r.at - after[0].at for r in after]
    assert {r.json()["data"]["n"] for r in after} == set(range(7))


async def test_the_auto_disable_clock_survives_a_restart_and_is_shared(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    """The first replica sees the first failure and stops; the one started after it disables the
    endpoint `disable_after` from that first failure, not from its own first."""
    disable_after = 2.0
    schedule = ", ".join(["200ms"] * 10)
    extra = f"""    retry: {{schedule: [{schedule}], jitter: 0}}
            disable_after: 2s"""
    async with receiver(lambda request, n: 500) as rx:
        async with replicas(tmp_path / "first", nats_server.url, rx.url, 1, extra) as (first,):
            await first.publish("x", {})
            first_failure = (await rx.wait_for(1))[0]
            failed_at = time.time()
            health = first.running.broker.topology.health_bucket
            with trio.fail_after(5):
                while await first.running.broker.kv_get(health, "failing.svc") is None:
                    await trio.sleep(0.02)
        await trio.sleep(1.0)  # the gap between the two processes, part of the scenario
        async with replicas(tmp_path / "second", nats_server.url, rx.url, 1, extra) as (second,):
            broker = second.running.broker
            with trio.fail_after(10):
                while (stored := await broker.kv_get(broker.topology.endpoints_bucket, "svc")) is None:
                    await trio.sleep(0.02)
            status = msgspec.json.decode(stored.value or b"{}")
    assert status["disabled"] is True
    assert status["since"] - failed_at < disable_after + 0.8, status["since"] - failed_at
    assert [r for r in rx.requests if r.at < first_failure.at] == []
