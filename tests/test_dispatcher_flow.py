"""Rate limits and circuit breakers in the delivery path, through the real gateway."""

from __future__ import annotations

import time
from pathlib import Path

import trio

from tests.support import NatsServer, Received, base_config, receiver, run_gateway
from tests.test_metrics import _samples


def _config(nats_url: str, url: str, extra: str) -> str:
    return base_config(
        nats_url,
        f"""
        endpoints:
          svc:
            url: "{url}/in"
            concurrency: 10
        {extra}
        routes:
          - {{from: [internal], to: [svc]}}
        """,
    )


async def test_rate_limit_holds_the_pace_without_counting_attempts(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    async with receiver() as rx:
        text = _config(nats_server.url, rx.url, "    rate_limit: {rate: 10, per: 1s, burst: 1}")
        async with run_gateway(tmp_path, text) as gw:
            for n in range(120):
                await gw.publish("tick", {"n": n})
            first = (await rx.wait_for(1, timeout=10))[0]
            await trio.sleep_until(first.at + 5.0)  # the measurement window itself, not a sync point
            window = [r for r in rx.requests if r.at <= first.at + 5.0]
    assert 46 <= len(window) <= 56, len(window)
    assert {r.headers["hookgate-attempt"] for r in window} == {"1"}


async def test_a_long_rate_limit_wait_defers_the_delivery_without_an_attempt(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    async with receiver() as rx:
        text = _config(nats_server.url, rx.url, "    rate_limit: {rate: 1, per: 6s, burst: 1}")
        async with run_gateway(tmp_path, text) as gw:
            await gw.publish("a", {})
            await gw.publish("b", {})
            first, second = await rx.wait_for(2, timeout=20)
            samples = _samples((await gw.http.get(f"{gw.url}/metrics")).text)
    assert second.at - first.at >= 5.5
    assert [r.headers["hookgate-attempt"] for r in (first, second)] == ["1", "1"]
    assert (
        samples[("hookgate_delivery_deferrals_total", (("endpoint", "svc"), ("reason", "rate_limit")))] >= 1
    )


async def test_circuit_opens_probes_and_closes_and_idles_while_open(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    def respond(request: Received, n: int) -> int:
        return 500 if n < 3 else 200

    async with receiver(respond) as rx:
        text = _config(
            nats_server.url,
            rx.url,
            """    retry: {schedule: [100ms, 100ms, 100ms, 100ms, 100ms], jitter: 0}
            circuit_breaker: {failure_rate: 0.5, window: 10s, min_requests: 3, cooldown: 2s}""",
        )
        async with run_gateway(tmp_path, text) as gw:
            await gw.publish("x", {})
            await rx.wait_for(3)
            cpu_before = time.process_time()
            wall_before = trio.current_time()
            probe = (await rx.wait_for(4, timeout=15))[3]
            cpu_while_open = time.process_time() - cpu_before
            open_for = trio.current_time() - wall_before
            samples = _samples((await gw.http.get(f"{gw.url}/metrics")).text)
    failures = rx.requests[:3]
    assert probe.at - failures[2].at >= 1.8  # waited out the cooldown, not the 100ms schedule
    # The deferrals while open did not use up attempts: the probe is the 4th attempt, not the 6th.
    assert probe.headers["hookgate-attempt"] == "4"
    assert len(rx.requests) == 4
    assert cpu_while_open < 0.35 * open_for, (cpu_while_open, open_for)  # no busy loop
    outcomes = {k[1]: v for k, v in samples.items() if k[0] == "hookgate_delivery_attempts_total"}
    assert outcomes[(("endpoint", "svc"), ("outcome", "succeeded"))] == 1
