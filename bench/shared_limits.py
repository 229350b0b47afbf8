"""What sharing rate limits and circuits through NATS costs per delivery, and how exact the shared
rate is (`python bench/shared_limits.py [--json PATH]`, about 25 s).

Everything runs in this one process against an embedded nats-server, without HTTP, so the figures
are those of flow control alone:

1. **Cost.** Callers take `admit()` then `record(200)`, as a delivery does, through an endpoint
   with a rate limit and a circuit breaker: once with the in-process `FlowControl` and once with the
   shared one from `SharedLimits`. CPU is the whole process's (`time.process_time`: trio and the
   nats-py thread), per delivery. Crossings are calls into nats-py; each lease is one crossing of
   one or more compare-and-set tries (a get and a conditional put each).
2. **Accuracy.** Three `SharedLimits`, each on its own connection like three replicas, with ten
   callers each, take tokens of one endpoint as fast as they come; the rate is counted after the
   burst, over 4 s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import trio

from hookgate import config as config_mod
from hookgate.broker import Broker
from hookgate.broker.embedded import embedded_nats
from hookgate.config import EndpointConfig
from hookgate.egress.endpoint import Endpoint
from hookgate.egress.flow import FlowControl
from hookgate.egress.limits import SharedLimits
from hookgate.plugin_host.hooks import Hooks

BREAKER = {"failure_rate": 0.5, "window": "60s", "min_requests": 10, "cooldown": "30s"}
CALLERS = 20


def endpoint(rate: float, burst: int) -> Endpoint:
    config = {"url": "http://127.0.0.1:9/in", "rate_limit": {"rate": rate, "burst": burst}}
    return Endpoint.build("bench", msgspec.convert({**config, "circuit_breaker": BREAKER}, EndpointConfig))


@contextlib.asynccontextmanager
async def brokers(count: int) -> AsyncIterator[list[Broker]]:
    with tempfile.TemporaryDirectory(prefix="hookgate-bench-limits-") as data_dir:
        async with embedded_nats(data_dir, 8 * 1024 * 1024) as server, contextlib.AsyncExitStack() as stack:
            config = config_mod.loads("broker: {url: nats://unused}\n", Hooks(()).registry).config.broker
            out = []
            for _ in range(count):
                connect = Broker.connect(config, server.url, nkey_seed_file=str(server.seed_file))
                out.append(await stack.enter_async_context(connect))
            yield out


@contextlib.asynccontextmanager
async def running(broker: Broker) -> AsyncIterator[SharedLimits]:
    limits = SharedLimits(broker)
    stopping = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(limits.run, stopping)
        try:
            yield limits
        finally:
            stopping.set()


async def deliveries(flow: FlowControl, seconds: float, callers: int) -> list[float]:
    """Admit and record as fast as the limits allow for `seconds`; when each was admitted."""
    admitted: list[float] = []
    end = trio.current_time() + seconds

    async def caller() -> None:
        while trio.current_time() < end:
            if await flow.admit(max_wait=5.0) is None:
                admitted.append(trio.current_time())
                flow.record(200)

    async with trio.open_nursery() as nursery:
        for _ in range(callers):
            nursery.start_soon(caller)
    return admitted


async def cost(rate: float, seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = {"rate": rate}
    async with brokers(1) as (broker,):
        for kind in ("local", "shared"):
            async with running(broker) as limits:
                ep = endpoint(rate, max(1, int(rate // 10)))
                if kind == "local":
                    flow = FlowControl(ep.config.rate_limit, ep.config.circuit_breaker)
                else:
                    flow = limits.flow_for(ep)
                cpu = time.process_time()
                admitted = await deliveries(flow, seconds, CALLERS)
                cpu = time.process_time() - cpu
                stats = limits.stats
                out[kind] = {
                    "deliveries": len(admitted),
                    "cpu_us_per_delivery": round(cpu / len(admitted) * 1e6, 1),
                    "crossings_per_delivery": round(stats.crossings / len(admitted), 4),
                    "requests_per_delivery": round(2 * stats.lease_tries / len(admitted), 4),
                }
    out["extra_cpu_us_per_delivery"] = round(
        out["shared"]["cpu_us_per_delivery"] - out["local"]["cpu_us_per_delivery"], 1
    )
    return out


async def accuracy(rate: float, replicas: int, seconds: float = 5.0) -> dict[str, Any]:
    async with brokers(replicas) as connections, contextlib.AsyncExitStack() as stack:
        every = [await stack.enter_async_context(running(b)) for b in connections]
        ep = endpoint(rate, 5)
        flows = [limits.flow_for(ep) for limits in every]
        start = trio.current_time()
        results: list[list[float]] = [[] for _ in flows]

        async def one(index: int) -> None:
            results[index] = await deliveries(flows[index], seconds, 10)

        async with trio.open_nursery() as nursery:
            for index in range(len(flows)):
                nursery.start_soon(one, index)
        window = [t for each in results for t in each if start + 1.0 <= t < start + seconds]
        measured = len(window) / (seconds - 1.0)
        leases = sum(limits.stats.leases for limits in every)
        tries = sum(limits.stats.lease_tries for limits in every)
        total = sum(len(each) for each in results)
        return {
            "rate": rate,
            "replicas": replicas,
            "measured_per_s": round(measured, 1),
            "error_pct": round((measured / rate - 1) * 100, 1),
            "shares": [len(each) for each in results],
            "crossings_per_delivery": round(leases / total, 4),
            "cas_tries_per_lease": round(tries / max(1, leases), 2),
        }


async def main(json_path: str | None) -> None:
    results: dict[str, Any] = {
        "cost": [await cost(rate, 3.0) for rate in (100.0, 1000.0)],
        "accuracy": [await accuracy(200.0, n) for n in (1, 2, 3)],
    }
    print("flow control per delivery (admit + record), rate limit and breaker, one process")
    print("rate/s  local µs  shared µs  extra µs  crossings/delivery  NATS requests/delivery")
    for row in results["cost"]:
        local, shared = row["local"], row["shared"]
        print(
            f"{row['rate']:>6.0f}  {local['cpu_us_per_delivery']:>8}  {shared['cpu_us_per_delivery']:>9}"
            f"  {row['extra_cpu_us_per_delivery']:>8}  {shared['crossings_per_delivery']:>18}"
            f"  {shared['requests_per_delivery']:>22}"
        )
    print("\nshared rate, 200/s, 10 callers per replica, counted after the burst over 4 s")
    print("replicas  measured/s  error  crossings/delivery  CAS tries/lease  deliveries per replica")
    for row in results["accuracy"]:
        print(
            f"{row['replicas']:>8}  {row['measured_per_s']:>10}  {row['error_pct']:>+4}%"
            f"  {row['crossings_per_delivery']:>18}  {row['cas_tries_per_lease']:>15}  {row['shares']}"
        )
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the results to this file")
    trio.run(main, parser.parse_args().json)
