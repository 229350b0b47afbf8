"""The first four measurements (the fifth, the delivery log, is in logphase.py).

Each starts the processes it needs and stops them before returning.
"""

from __future__ import annotations

import contextlib
import secrets
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import natsops
import profiler
import report
from loadgen import EVENT_ID_HEADER, EVENT_TYPE_HEADER, SIG_HEADER, SIG_PREFIX, sample_data
from procs import (
    BENCH,
    HTTP,
    PYTHON,
    CpuMeter,
    Hookgate,
    Processes,
    Server,
    free_port,
    hookgate_config,
    paused,
    start_bare_hypercorn,
    start_hookgate,
    start_receiver,
)

from hookgate.broker import Topology
from hookgate.broker.events import encode_event
from hookgate.types import INTERNAL_SOURCE, Event

SOURCE = "bench"
ENDPOINT = "sink"
TOPOLOGY = Topology()


@dataclass
class Options:
    quick: bool
    connections: int  # ingress load: concurrent keep-alive connections
    ingress_seconds: float  # measured seconds per round and side
    rounds: int  # ingress rounds; the sides alternate which goes first
    warmup: float
    backlog: int  # delivery: events in the backlog
    concurrency: int  # delivery: the endpoint's `concurrency`, and the bare client's connections
    e2e_rate: float
    e2e_seconds: float
    dedup_ids: int
    log_deliveries: int  # log: deliveries kept in the delivery log
    log_level: str
    profile: bool


@dataclass
class Context:
    options: Options
    procs: Processes
    work_dir: Path  # temp: configs and NATS data
    out_dir: Path  # kept: logs and profiles

    def data_dir(self, name: str) -> Path:
        return self.work_dir / f"data-{name}"


def _source_config(secret: str) -> dict[str, Any]:
    return {
        "verify": {"type": "hmac", "header": SIG_HEADER, "prefix": SIG_PREFIX, "secret": secret},
        "event_type": f"header.{EVENT_TYPE_HEADER}",
        "event_id": f"header.{EVENT_ID_HEADER}",
    }


def _endpoint_config(url: str, concurrency: int, timeout: str = "30s") -> dict[str, Any]:
    return {
        "url": f"{url}/hooks",
        "concurrency": concurrency,
        "timeout": timeout,
        "retry": {"schedule": ["1s"]},
    }


def _loadgen(mode: str, server: Server, *args: str) -> list[str]:
    return [PYTHON, str(BENCH / "loadgen.py"), mode, "--port", str(server.port), *args]


def _profile(ctx: Context, name: str, pid: int, seconds: float) -> subprocess.Popen[bytes] | None:
    if not ctx.options.profile:
        return None
    return profiler.start(ctx.procs, f"py-spy-{name}", pid, seconds, ctx.out_dir / f"profile-{name}.txt")


def _finish_profile(ctx: Context, name: str, spy: subprocess.Popen[bytes] | None) -> dict[str, Any] | None:
    if spy is None:
        return None
    spy.wait(60)
    path = ctx.out_dir / f"profile-{name}.txt"
    return profiler.summarise(path) if path.exists() else None


# --- 1. ingress ---------------------------------------------------------------------------


def ingress(ctx: Context) -> dict[str, Any]:
    """HMAC-verified webhooks/s through hookgate (no routes) vs a bare hypercorn-trio app answering 202."""
    o = ctx.options
    secret = secrets.token_hex(16)
    config = hookgate_config(free_port(), ctx.data_dir("ingress"), sources={SOURCE: _source_config(secret)})
    hookgate = start_hookgate(ctx.procs, "hookgate-ingress", ctx.work_dir, config, o.log_level)
    bare = start_bare_hypercorn(ctx.procs)
    nats_pid = hookgate.nats_pid
    runs: dict[str, list[dict[str, Any]]] = {"hookgate": [], "bare": []}
    cpu: dict[str, list[dict[str, float]]] = {"hookgate": [], "bare": []}
    profile = None
    for round_ in range(o.rounds):
        sides: list[tuple[str, Server]] = [("bare", bare), ("hookgate", hookgate)]
        for side, server in sides if round_ % 2 == 0 else sides[::-1]:
            argv = _loadgen(
                "duration",
                server,
                f"--connections={o.connections}",
                f"--duration={o.ingress_seconds}",
                f"--warmup={o.warmup}",
                f"--secret={secret}",
                f"--tag={side}{round_}",
            )
            pids = {"hookgate" if side == "hookgate" else "hypercorn": server.proc.pid}
            if side == "hookgate":
                pids["nats-server"] = nats_pid
            spy = None
            if side == "hookgate" and round_ == o.rounds - 1:
                spy = _profile(ctx, "ingress", server.proc.pid, o.warmup + o.ingress_seconds)
            meter = CpuMeter(pids)
            (out,) = ctx.procs.run_json(
                f"loadgen-ingress-{side}", [argv], timeout=o.warmup + o.ingress_seconds + 60
            )
            cpu[side].append(meter.read())
            runs[side].append(out)
            profile = _finish_profile(ctx, "ingress", spy) or profile
    ctx.procs.stop(hookgate.proc)
    ctx.procs.stop(bare.proc)
    seconds = o.rounds * o.ingress_seconds
    hg = report.merge_runs(runs["hookgate"], seconds)
    base = report.merge_runs(runs["bare"], seconds)
    hg["cpu_cores"] = _mean_cpu(cpu["hookgate"])
    base["cpu_cores"] = _mean_cpu(cpu["bare"])
    hg["cpu_us_per_event"] = report.cpu_us_per_event(hg["cpu_cores"], hg["req_per_s"], "hookgate")
    hg["cpu_us_per_event_with_nats"] = report.cpu_us_per_event(
        hg["cpu_cores"], hg["req_per_s"], "hookgate", "nats-server"
    )
    base["cpu_us_per_event"] = report.cpu_us_per_event(base["cpu_cores"], base["req_per_s"], "hypercorn")
    round_ratios = [
        report.ratio(h["ok"], b["ok"]) for h, b in zip(runs["hookgate"], runs["bare"], strict=True)
    ]
    return {
        "setup": (
            f"source with hmac verification (X-Sig, sha256=), distinct X-Event-Id per request, no routes "
            f"(the router still records each event); {o.connections} keep-alive connections; "
            f"{o.rounds} alternating rounds of {o.ingress_seconds:g}s per side after {o.warmup:g}s warm-up"
        ),
        "hookgate": hg,
        "bare_hypercorn": base,
        "ratio": report.ratio(hg["req_per_s"], base["req_per_s"]),
        "round_ratios": round_ratios,
        "target": 0.8,
        "profile": profile,
    }


def _mean_of(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(sum(known) / len(known), 1) if known else None


def _mean_cpu(samples: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for s in samples for k in s}
    return {k: round(sum(s.get(k, 0.0) for s in samples) / len(samples), 4) for k in sorted(keys)}


# --- 2. delivery ---------------------------------------------------------------------------


def delivery(ctx: Context) -> dict[str, Any]:
    """Deliveries/s draining a backlog vs a bare trio+h11 client posting as many to the same receiver.

    The bare client runs once before and once after the drain (the mean is the baseline), so a
    change in the machine's load during the phase shows up as a spread instead of a skewed ratio.
    """
    o = ctx.options
    n, c = o.backlog, o.concurrency
    receiver = start_receiver(ctx.procs, "receiver-delivery")
    bare_args = ["--kind=delivery", f"--total={n}", "--timeout=300", f"--connections={c}"]
    bare_before = _bare_delivery(ctx, receiver, "before", bare_args)
    HTTP.post(f"{receiver.url}/__pause", timeout=5)
    HTTP.post(f"{receiver.url}/__reset", timeout=5)
    config = hookgate_config(
        free_port(),
        ctx.data_dir("delivery"),
        # A long timeout: while the receiver holds its first `concurrency` requests, nothing fails.
        endpoints={ENDPOINT: _endpoint_config(receiver.url, c, timeout="600s")},
        routes=[{"name": "internal-to-sink", "from": [INTERNAL_SOURCE], "to": [ENDPOINT]}],
    )
    hookgate = start_hookgate(ctx.procs, "hookgate-delivery", ctx.work_dir, config, o.log_level)
    nats = natsops.embedded_server(hookgate.data_dir)
    run = uuid.uuid4().hex[:12]
    building = time.perf_counter()
    published = natsops.publish_bulk(
        nats.url,
        n,
        subject=lambda i: TOPOLOGY.publish_subject("order.created"),
        payload=lambda i: sample_data(f"evt_{run}{i:08d}"),
        msg_id=lambda i: f"evt_{run}{i:08d}",
    )
    natsops.wait_consumer(
        nats.url, TOPOLOGY.events_stream, TOPOLOGY.router_consumer(), lambda p, a: p == 0 and a == 0, 300
    )
    # The router acks an event once its delivery is stored, so all n are in the deliveries stream
    # now. (Its shard consumer's counts say less: a lane defers what it has no room for.)
    stored = natsops.stream_numbers(nats.url, TOPOLOGY.deliveries_stream)["messages"]
    if stored < n:
        raise RuntimeError(f"the router stored {stored:,} of {n:,} deliveries")
    built = time.perf_counter() - building
    meter = CpuMeter({"hookgate": hookgate.proc.pid, "nats-server": nats.pid, "receiver": receiver.proc.pid})
    spy = _profile(ctx, "delivery", hookgate.proc.pid, max(5.0, n / 1500))
    HTTP.post(f"{receiver.url}/__release", timeout=5)
    stats = _wait_count(receiver, n, timeout=max(120.0, n / 50))
    cpu = meter.read()
    profile = _finish_profile(ctx, "delivery", spy)
    drain = stats["last"] - stats["released_at"]
    ctx.procs.stop(hookgate.proc)

    HTTP.post(f"{receiver.url}/__reset", timeout=5)
    bare_after = _bare_delivery(ctx, receiver, "after", bare_args)
    HTTP.post(f"{receiver.url}/__reset", timeout=5)
    (ceiling,) = ctx.procs.run_json(
        "loadgen-delivery-ceiling",
        [_loadgen("count", receiver, *bare_args[:-1], "--connections=64")],
        timeout=330,
    )
    ctx.procs.stop(receiver.proc)
    hookgate_rate = round(stats["count"] / drain, 1) if drain > 0 else None
    bare_rates = [bare_before["req_per_s"], bare_after["req_per_s"]]
    bare_rate = round(sum(bare_rates) / 2, 1)
    return {
        "setup": (
            f"{n:,} internal events published to {TOPOLOGY.publish_subject('order.created')} with nats-py, "
            f"routed to one endpoint (concurrency {c}) whose receiver holds its requests until released; "
            f"timed from release to the receiver's {n:,}th request. Baseline: a bare trio+h11 client, "
            f"{c} connections, {n:,} requests of the same size, run before and after the drain"
        ),
        "hookgate": {
            "deliveries_per_s": hookgate_rate,
            "delivered": stats["count"],
            "seconds": round(drain, 2),
            "cpu_cores": cpu,
            "cpu_us_per_event": report.cpu_us_per_event(cpu, hookgate_rate, "hookgate"),
            "cpu_us_per_event_with_nats": report.cpu_us_per_event(
                cpu, hookgate_rate, "hookgate", "nats-server"
            ),
            "backlog_publish_per_s": round(published.count / published.seconds, 1),
            "backlog_routed_per_s": round(n / built, 1),
            "publish_errors": published.errors,
        },
        "bare_client": {
            "req_per_s": bare_rate,
            "cpu_us_per_event": _mean_of([bare_before["cpu_us_per_event"], bare_after["cpu_us_per_event"]]),
            "before": bare_before,
            "after": bare_after,
        },
        "receiver_ceiling": {
            "req_per_s": round(ceiling["ok"] / ceiling["elapsed"], 1),
            "connections": 64,
            "errors": ceiling["errors"],
        },
        "ratio": report.ratio(hookgate_rate, bare_rate),
        "target": 0.5,
        "profile": profile,
    }


def _bare_delivery(ctx: Context, receiver: Server, when: str, args: list[str]) -> dict[str, Any]:
    meter = CpuMeter({"receiver": receiver.proc.pid})
    (out,) = ctx.procs.run_json(f"loadgen-delivery-bare-{when}", [_loadgen("count", receiver, *args)], 330)
    cpu = meter.read()
    rate = round(out["ok"] / out["elapsed"], 1)
    return {
        "req_per_s": rate,
        "ok": out["ok"],
        "errors": out["errors"],
        "seconds": round(out["elapsed"], 2),
        "cpu_cores": cpu,
        # The bare client is the load generator: the counterpart of the gateway's delivery side.
        "cpu_us_per_event": report.cpu_us_per_event(cpu, rate, "loadgen"),
        **report.latency_summary(out["latencies_ms"]),
    }


def _wait_count(receiver: Server, count: int, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        stats: dict[str, Any] = HTTP.get(f"{receiver.url}/__stats", timeout=5).json()
        if stats["count"] >= count:
            return stats
        if time.monotonic() > deadline:
            raise TimeoutError(f"the receiver saw {stats['count']} of {count} requests in {timeout:.0f}s")
        time.sleep(0.1)


# --- 3. end-to-end latency -------------------------------------------------------------------


def end_to_end(ctx: Context) -> dict[str, Any]:
    """From sending a signed webhook to the receiver seeing its delivery, at a fixed moderate rate."""
    o = ctx.options
    secret = secrets.token_hex(16)
    receiver = start_receiver(ctx.procs, "receiver-e2e")
    config = hookgate_config(
        free_port(),
        ctx.data_dir("e2e"),
        sources={SOURCE: _source_config(secret)},
        endpoints={ENDPOINT: _endpoint_config(receiver.url, o.concurrency)},
        routes=[{"name": "bench-to-sink", "from": [SOURCE], "to": [ENDPOINT]}],
    )
    hookgate = start_hookgate(ctx.procs, "hookgate-e2e", ctx.work_dir, config, o.log_level)
    argv = _loadgen(
        "rate",
        hookgate,
        f"--rate={o.e2e_rate}",
        f"--duration={o.e2e_seconds}",
        "--connections=16",
        f"--secret={secret}",
        "--timeout=30",
    )
    meter = CpuMeter({"hookgate": hookgate.proc.pid, "nats-server": hookgate.nats_pid})
    spy = _profile(ctx, "e2e", hookgate.proc.pid, o.e2e_seconds)
    (out,) = ctx.procs.run_json("loadgen-e2e", [argv], timeout=o.e2e_seconds + 60)
    cpu = meter.read()
    profile = _finish_profile(ctx, "e2e", spy)
    sent: dict[str, float] = out["sent"]
    with contextlib.suppress(TimeoutError):  # report what arrived; `missing` says the rest
        _wait_count(receiver, out["ok"], timeout=30)
    arrivals: dict[str, float] = HTTP.get(f"{receiver.url}/__stats?arrivals=1", timeout=10).json()["arrivals"]
    ctx.procs.stop(hookgate.proc)
    ctx.procs.stop(receiver.proc)
    latencies = [(arrivals[k] - t) * 1000 for k, t in sent.items() if k in arrivals]
    return {
        "setup": (
            f"{o.e2e_rate:g} signed webhooks/s for {o.e2e_seconds:g}s (open loop, 16 connections), "
            "routed to one endpoint; ingress send -> receiver arrival, both on the system monotonic clock"
        ),
        "sent": len(sent),
        "accepted": out["ok"],
        "delivered": len(latencies),
        "missing": len(sent) - len(latencies),
        **report.latency_summary(latencies),
        "ingress_response": report.latency_summary(out["latencies_ms"]),
        "cpu_cores": cpu,
        # Per webhook end to end: accepted, stored, routed, delivered and settled.
        "cpu_us_per_event": report.cpu_us_per_event(cpu, o.e2e_rate, "hookgate"),
        "cpu_us_per_event_with_nats": report.cpu_us_per_event(cpu, o.e2e_rate, "hookgate", "nats-server"),
        "profile": profile,
    }


# --- 4. dedup memory ---------------------------------------------------------------------------


def dedup_memory(ctx: Context) -> dict[str, Any]:
    """nats-server RSS growth per stored event id in the events stream's dedup window.

    Two fresh gateways: one stores N events with distinct Nats-Msg-Ids, the other N equal events
    without ids (the control: storage, caches, runtime). The gateway process is paused meanwhile, so
    the only work the server does is storing what we publish.
    """
    n = ctx.options.dedup_ids
    with_ids = _dedup_run(ctx, n, ids=True)
    control = _dedup_run(ctx, n, ids=False)
    raw = with_ids["rss_growth"] / n
    net = (with_ids["rss_growth"] - control["rss_growth"]) / n
    per_day = 100 * 86_400
    return {
        "setup": (
            f"{n:,} events (msgpack, ~{with_ids['payload_bytes']} B) published with nats-py to "
            f"{TOPOLOGY.event_subject(SOURCE)}; ids like {with_ids['example_id']!r} "
            f"({len(with_ids['example_id'])} chars); events stream duplicate_window "
            f"{with_ids['duplicate_window_s'] / 3600:g}h"
        ),
        "ids": n,
        "with_ids": with_ids,
        "control_without_ids": control,
        "bytes_per_id": round(net, 1),
        "bytes_per_id_raw": round(raw, 1),
        "extrapolated_ids": per_day,
        "extrapolated_bytes": round(net * per_day),
        "extrapolated_note": "24h window at 100 events/s, events stream only",
        # The deliveries stream has the same 24h window and one id per (event, endpoint).
        "extrapolated_bytes_with_one_endpoint": round(net * per_day * 2),
    }


def _dedup_run(ctx: Context, n: int, *, ids: bool) -> dict[str, Any]:
    name = "ids" if ids else "control"
    config = hookgate_config(
        free_port(), ctx.data_dir(f"dedup-{name}"), sources={SOURCE: _source_config("unused")}
    )
    hookgate: Hookgate = start_hookgate(ctx.procs, f"hookgate-dedup-{name}", ctx.work_dir, config, "WARNING")
    nats = natsops.embedded_server(hookgate.data_dir)
    run = uuid.uuid4().hex[:8]
    payloads = [_stored_event(f"evt_{run}{i:016x}") for i in range(min(n, 1000))]

    def msg_id(i: int) -> str:
        return f"{SOURCE}:evt_{run}{i:016x}"

    with paused(hookgate.proc.pid):
        before = natsops.settled_rss(nats.pid, 2.0)
        published = natsops.publish_bulk(
            nats.url,
            n,
            subject=lambda i: TOPOLOGY.event_subject(SOURCE),
            payload=lambda i: payloads[i % len(payloads)],
            msg_id=msg_id if ids else None,
        )
        after = natsops.settled_rss(nats.pid, 4.0)
        window, stored = natsops.stream_state(nats.url, TOPOLOGY.events_stream)
    ctx.procs.stop(hookgate.proc)
    return {
        "rss_before": before,
        "rss_after": after,
        "rss_growth": after - before,
        "stored": stored,
        "publish_errors": published.errors,
        "duplicates": published.duplicates,
        "publish_per_s": round(n / published.seconds, 1),
        "payload_bytes": len(payloads[0]),
        "example_id": msg_id(0),
        "duplicate_window_s": window,
    }


def _stored_event(event_id: str) -> bytes:
    body = sample_data(event_id)
    headers = [
        ("content-type", "application/json"),
        ("x-event-id", event_id),
        ("x-event-type", "order.created"),
    ]
    event = Event(
        id=event_id,
        source=SOURCE,
        type="order.created",
        received_at=time.time(),
        body=body,
        headers=headers,
        external_id=event_id,
    )
    return encode_event(event)
