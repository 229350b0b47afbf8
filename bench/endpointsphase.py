"""Endpoint count (`--only endpoints`): what idle endpoints cost, and whether many slow anything down.

For each count (10, 1,000 and 10,000 endpoints declared in YAML, all on one receiver), a fresh
gateway with its embedded nats-server is measured for:
- start: from launching `hookgate run` to `/readyz` answering 200;
- idle CPU of the gateway and of the nats-server over IDLE_SECONDS, and their RSS after it;
- a new endpoint's first delivery: created through the API, then one event published to it; the
  time from the publish request to the receiver seeing it (and the create request's time);
- latency under load: RATE events/s for LOAD_SECONDS through `POST /api/v1/events`, each to one
  endpoint picked at random (`to`), timed from the publish request to the receiver seeing it
  (matched by the event id, which the delivery carries as `webhook-id`): p50 and p99; and the CPU
  of the gateway and its nats-server per event delivered meanwhile.
"""

from __future__ import annotations

import random
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import report
import trio
from procs import HTTP, CpuMeter, cpu_seconds, free_port, hookgate_config, start_hookgate, start_receiver

IDLE_SETTLE = 5.0
IDLE_SECONDS = 15.0
RATE = 100.0
LOAD_SECONDS = 10.0
TOKEN = {"Authorization": "Bearer bench-token"}


def endpoint_count(ctx: Any) -> dict[str, Any]:
    counts = [10, 1_000] if ctx.options.quick else [10, 1_000, 10_000]
    receiver = start_receiver(ctx.procs, "receiver-endpoints")
    rows = {str(n): _measure(ctx, receiver.url, n) for n in counts}
    ctx.procs.stop(receiver.proc)
    return {
        "setup": (
            f"N endpoints in YAML on one receiver; idle {IDLE_SECONDS:g}s after {IDLE_SETTLE:g}s; "
            f"{RATE:g} events/s for {LOAD_SECONDS:g}s through the API, each to a random endpoint"
        ),
        "counts": rows,
    }


def _measure(ctx: Any, receiver_url: str, count: int) -> dict[str, Any]:
    endpoints = {f"e{i}": {"url": f"{receiver_url}/hooks", "timeout": "10s"} for i in range(count)}
    config = hookgate_config(free_port(), ctx.data_dir(f"endpoints-{count}"), endpoints=endpoints)
    started = time.monotonic()
    name, log_level = f"hookgate-endpoints-{count}", ctx.options.log_level
    hookgate = start_hookgate(ctx.procs, name, ctx.work_dir, config, log_level)
    start_seconds = time.monotonic() - started
    time.sleep(IDLE_SETTLE)
    meter = CpuMeter({"hookgate": hookgate.proc.pid, "nats-server": hookgate.nats_pid})
    time.sleep(IDLE_SECONDS)
    idle = meter.read()
    rss = {"hookgate": _rss_mb(hookgate.proc.pid), "nats-server": _rss_mb(hookgate.nats_pid)}
    first = _first_delivery(hookgate.url, receiver_url)
    pids = (hookgate.proc.pid, hookgate.nats_pid)
    cpu_before = sum(cpu_seconds(pid) for pid in pids)
    load = trio.run(_load, hookgate.url, receiver_url, [f"e{i}" for i in range(count)])
    # Over the load and the wait for its last deliveries: the gateway and its nats-server.
    cpu_used = sum(cpu_seconds(pid) for pid in pids) - cpu_before
    load["cpu_us_per_event"] = round(cpu_used / max(load["load_delivered"], 1) * 1e6)
    ctx.procs.stop(hookgate.proc)
    return {
        "start_s": round(start_seconds, 2),
        "idle_cpu": idle,
        "rss_mb": rss,
        "rss_total_mb": round(sum(rss.values()), 1),
        **first,
        **load,
    }


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def _arrival(receiver_url: str, event_id: str, timeout: float = 10.0) -> float | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        arrivals = HTTP.get(f"{receiver_url}/__stats?arrivals=1").json()["arrivals"]
        if event_id in arrivals:
            return float(arrivals[event_id])
        time.sleep(0.01)
    return None


def _first_delivery(url: str, receiver_url: str) -> dict[str, Any]:
    name = f"fresh-{uuid.uuid4().hex[:8]}"
    began = time.monotonic()
    created = HTTP.post(
        f"{url}/api/v1/endpoints", json={"name": name, "url": f"{receiver_url}/hooks"}, headers=TOKEN
    )
    created_s = time.monotonic() - began
    event_id = uuid.uuid4().hex
    sent = time.monotonic()
    event = {"type": "t", "data": {}, "id": event_id, "to": [name]}
    HTTP.post(f"{url}/api/v1/events", json=event, headers=TOKEN)
    arrived = _arrival(receiver_url, event_id)
    return {
        "create_status": created.status_code,
        "create_ms": round(created_s * 1000, 1),
        "first_delivery_ms": None if arrived is None else round((arrived - sent) * 1000, 1),
    }


async def _load(url: str, receiver_url: str, names: list[str]) -> dict[str, Any]:
    """Open loop: one publish every 1/RATE s, whatever the answers' latency."""
    sent: dict[str, float] = {}
    failed = 0

    async def publish(client: httpx.AsyncClient, event_id: str) -> None:
        nonlocal failed
        body = {"type": "t", "data": {"n": 1}, "id": event_id, "to": [random.choice(names)]}
        sent[event_id] = time.monotonic()
        response = await client.post(f"{url}/api/v1/events", json=body, headers=TOKEN)
        if response.status_code != 202:
            failed += 1

    limits = httpx.Limits(max_connections=32)
    async with httpx.AsyncClient(timeout=10, limits=limits) as client, trio.open_nursery() as nursery:
        start = trio.current_time()
        for i in range(int(RATE * LOAD_SECONDS)):
            await trio.sleep_until(start + i / RATE)
            nursery.start_soon(publish, client, uuid.uuid4().hex)
    deadline = time.monotonic() + 30
    arrivals: dict[str, float] = {}
    while time.monotonic() < deadline:
        arrivals = HTTP.get(f"{receiver_url}/__stats?arrivals=1").json()["arrivals"]
        if all(event_id in arrivals for event_id in sent):
            break
        await trio.sleep(0.2)
    latencies_ms = [(arrivals[k] - t) * 1000 for k, t in sent.items() if k in arrivals]
    return {
        "load_events": len(sent),
        "load_failed": failed,
        "load_delivered": len(latencies_ms),
        **report.latency_summary(latencies_ms),
    }


def rows(d: dict[str, Any]) -> list[str]:
    table = []
    for count, m in d["counts"].items():
        table.append(
            [
                f"{int(count):,}",
                m["start_s"],
                m["idle_cpu"].get("hookgate"),
                m["idle_cpu"].get("nats-server"),
                m["rss_mb"]["hookgate"],
                m["rss_mb"]["nats-server"],
                m["create_ms"],
                m["first_delivery_ms"],
                m["p50_ms"],
                m["p99_ms"],
                f"{m['load_delivered']}/{m['load_events']}",
                m.get("cpu_us_per_event"),
            ]
        )
    headers = [
        "endpoints",
        "start s",
        "idle cpu gw",
        "idle cpu nats",
        "rss gw MB",
        "rss nats MB",
        "create ms",
        "1st delivery ms",
        "p50 ms",
        "p99 ms",
        "delivered",
        "cpu µs/event",
    ]
    return report.table(table, headers).splitlines()
