"""Workers (`--only workers`): one gateway process against several under the supervisor.

Each layout (1 x all, 2 x all, 1 ingress + 1 delivery) gets a fresh gateway for each of three
loads, in three rounds that rotate the layouts' order (one with --quick); the table gives medians:

- **ingress**: HMAC-signed webhooks, no routes, as phase 1 (32 connections), for 6 s (4 s quick)
  after a warm-up: accepted/s and CPU µs per accepted event;
- **delivery**: a backlog of internal events published with nats-py and routed while the
  receiver holds its requests, then drained: deliveries/s and CPU µs per delivery;
- **end to end**: signed webhooks with one route to the receiver, as fast as they are accepted:
  accepted/s, the time the last delivery came after the load stopped, and CPU µs per webhook
  (accepted, routed and delivered; measured until the last delivery).

CPU is every process of the gateway (supervisor and workers) plus its nats-server, from
/proc/<pid>/stat, divided by the events the load counted: it is steadier than req/s on a machine
shared with other work (the `other` column says how busy it was).
"""

from __future__ import annotations

import secrets
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import natsops
import report
from loadgen import sample_data
from phases import (
    ENDPOINT,
    SOURCE,
    TOPOLOGY,
    Context,
    _endpoint_config,
    _loadgen,
    _source_config,
    _wait_count,
)
from procs import HTTP, CpuMeter, Hookgate, free_port, hookgate_config, start_hookgate, start_receiver

from hookgate.types import INTERNAL_SOURCE

LAYOUTS: dict[str, int | dict[str, int]] = {
    "1 x all": 1,
    "2 x all": 2,
    "1 ingress + 1 delivery": {"ingress": 1, "delivery": 1},
}


def workers(ctx: Context) -> dict[str, Any]:
    o = ctx.options
    backlog = 2_000 if o.quick else 4_000
    rounds = 1 if o.quick else 3
    seconds = o.ingress_seconds if o.quick else 6.0
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label in LAYOUTS}
    for round_ in range(rounds):
        # Each round in another order, so the machine's drift does not favour one layout.
        labels = list(LAYOUTS)
        labels = labels[round_ % len(labels) :] + labels[: round_ % len(labels)]
        for label in labels:
            layout = LAYOUTS[label]
            runs[label].append(
                {
                    "ingress": _ingress(ctx, label, layout, seconds),
                    "delivery": _delivery(ctx, label, layout, backlog),
                    "e2e": _end_to_end(ctx, label, layout, seconds),
                }
            )
    return {
        "setup": (
            f"{rounds} rounds, the layouts in rotating order, a fresh gateway for each load: signed "
            f"webhooks without routes ({o.connections} connections, {seconds:g}s after {o.warmup:g}s "
            f"warm-up); a backlog of {backlog:,} internal events drained to one endpoint (concurrency "
            f"{o.concurrency}); signed webhooks routed to it, {seconds:g}s. Medians of the rounds; CPU: "
            "the gateway's processes per event"
        ),
        "layouts": {label: _medians(r) for label, r in runs.items()},
        "rounds": runs,
    }


FIGURES = {
    "ingress": ("req_per_s", "cpu_us_per_event"),
    "delivery": ("deliveries_per_s", "cpu_us_per_event"),
    "e2e": ("accepted_per_s", "cpu_us_per_event"),
}


def _medians(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per load, the median of each figure over the rounds, and each round's value."""
    out: dict[str, Any] = {}
    for load, (rate, cpu) in FIGURES.items():
        rates = [r[load][rate] for r in rounds]
        gateway = [r[load][cpu]["gateway"] for r in rounds if r[load][cpu]["gateway"] is not None]
        nats = [r[load][cpu]["nats-server"] for r in rounds if r[load][cpu]["nats-server"] is not None]
        out[load] = {
            rate: statistics.median(rates),
            f"{rate}_rounds": rates,
            cpu: {"gateway": _median(gateway), "nats-server": _median(nats)},
            "cpu_us_rounds": gateway,
            "other_cores": statistics.median(r[load]["cpu_cores"].get("other", 0.0) for r in rounds),
        }
    return out


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _slug(label: str) -> str:
    return label.replace(" ", "").replace("+", "-")


def _start(ctx: Context, name: str, layout: int | dict[str, int], config: dict[str, Any]) -> Hookgate:
    config["server"]["workers"] = layout
    gateway = start_hookgate(ctx.procs, name, ctx.work_dir, config, ctx.options.log_level)
    count = layout if isinstance(layout, int) else sum(layout.values())
    if count > 1:  # /readyz answers once one worker serves: wait for the supervisor's word on all
        log = ctx.out_dir / f"{name}.log"
        deadline = time.monotonic() + 60
        while f"with {count} workers" not in log.read_text():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}: the workers did not all start; see {log}")
            time.sleep(0.1)
    return gateway


def _pids(gateway: Hookgate) -> dict[str, int]:
    """The gateway's processes (the supervisor's workers, or the one process) and its nats-server."""
    root = gateway.proc.pid
    children = Path(f"/proc/{root}/task/{root}/children").read_text().split()
    workers = [int(p) for p in children if b"hookgate.cli" in Path(f"/proc/{p}/cmdline").read_bytes()]
    pids = {"gateway": root, **{f"worker-{i}": pid for i, pid in enumerate(workers)}}
    return {**pids, "nats-server": gateway.nats_pid}


def _cpu_us_per(cpu: dict[str, float], seconds: float, count: int) -> dict[str, float | None]:
    """CPU µs per event of the gateway's processes and of its nats-server, from cores over `seconds`."""
    gateway = sum(v for k, v in cpu.items() if k == "gateway" or k.startswith("worker-"))
    if not count:
        return {"gateway": None, "nats-server": None}
    return {
        "gateway": round(gateway * seconds / count * 1e6),
        "nats-server": round(cpu.get("nats-server", 0.0) * seconds / count * 1e6),
    }


def _ingress(ctx: Context, label: str, layout: int | dict[str, int], seconds: float) -> dict[str, Any]:
    o = ctx.options
    secret = secrets.token_hex(16)
    name = f"workers-ingress-{_slug(label)}"
    config = hookgate_config(free_port(), ctx.data_dir(name), sources={SOURCE: _source_config(secret)})
    gateway = _start(ctx, name, layout, config)
    argv = _loadgen(
        "duration",
        gateway,
        f"--connections={o.connections}",
        f"--duration={seconds}",
        f"--warmup={o.warmup}",
        f"--secret={secret}",
        f"--tag={_slug(label)}{uuid.uuid4().hex[:6]}",
    )
    meter = CpuMeter(_pids(gateway))
    (out,) = ctx.procs.run_json(f"loadgen-{name}", [argv], timeout=o.warmup + seconds + 60)
    cpu = meter.read()
    ctx.procs.stop(gateway.proc)
    run = report.merge_runs([out], seconds)
    # The meter ran through the warm-up too: count what was answered in it at the measured rate.
    measured = o.warmup + seconds
    return {
        "req_per_s": run["req_per_s"],
        "p99_ms": run["p99_ms"],
        "errors": run["errors"],
        "cpu_cores": cpu,
        "cpu_us_per_event": _cpu_us_per(cpu, measured, round(run["req_per_s"] * measured)),
    }


def _delivery(ctx: Context, label: str, layout: int | dict[str, int], backlog: int) -> dict[str, Any]:
    o = ctx.options
    name = f"workers-delivery-{_slug(label)}"
    receiver = start_receiver(ctx.procs, f"receiver-{name}", paused=True)
    config = hookgate_config(
        free_port(),
        ctx.data_dir(name),
        endpoints={ENDPOINT: _endpoint_config(receiver.url, o.concurrency, timeout="600s")},
        routes=[{"name": "internal-to-sink", "from": [INTERNAL_SOURCE], "to": [ENDPOINT]}],
    )
    gateway = _start(ctx, name, layout, config)
    nats = natsops.embedded_server(gateway.data_dir)
    run = uuid.uuid4().hex[:12]
    natsops.publish_bulk(
        nats.url,
        backlog,
        subject=lambda i: TOPOLOGY.publish_subject("order.created"),
        payload=lambda i: sample_data(f"evt_{run}{i:08d}"),
        msg_id=lambda i: f"evt_{run}{i:08d}",
    )
    natsops.wait_consumer(
        nats.url, TOPOLOGY.events_stream, TOPOLOGY.router_consumer(), lambda p, a: p == 0 and a == 0, 300
    )
    meter = CpuMeter(_pids(gateway))
    HTTP.post(f"{receiver.url}/__release", timeout=5)
    stats = _wait_count(receiver, backlog, timeout=300)
    cpu = meter.read()
    ctx.procs.stop(gateway.proc)
    ctx.procs.stop(receiver.proc)
    drain = stats["last"] - stats["released_at"]
    elapsed = max(drain, 1e-9)
    return {
        "deliveries_per_s": round(stats["count"] / elapsed, 1),
        "seconds": round(drain, 2),
        "cpu_cores": cpu,
        "cpu_us_per_event": _cpu_us_per(cpu, elapsed, stats["count"]),
    }


def _end_to_end(ctx: Context, label: str, layout: int | dict[str, int], seconds: float) -> dict[str, Any]:
    o = ctx.options
    secret = secrets.token_hex(16)
    name = f"workers-e2e-{_slug(label)}"
    receiver = start_receiver(ctx.procs, f"receiver-{name}")
    config = hookgate_config(
        free_port(),
        ctx.data_dir(name),
        sources={SOURCE: _source_config(secret)},
        endpoints={ENDPOINT: _endpoint_config(receiver.url, o.concurrency)},
        routes=[{"name": "bench-to-sink", "from": [SOURCE], "to": [ENDPOINT]}],
    )
    gateway = _start(ctx, name, layout, config)
    argv = _loadgen(
        "duration",
        gateway,
        f"--connections={o.connections}",
        f"--duration={seconds}",
        "--warmup=0",
        f"--secret={secret}",
        f"--tag=e2e{_slug(label)}{uuid.uuid4().hex[:6]}",
    )
    meter = CpuMeter(_pids(gateway))
    started = time.monotonic()
    (out,) = ctx.procs.run_json(f"loadgen-{name}", [argv], timeout=seconds + 60)
    load_ended = time.monotonic()
    accepted = out["statuses"].get("200", 0) + out["statuses"].get("202", 0)
    stats = _wait_count(receiver, accepted, timeout=300)
    done = time.monotonic()
    cpu = meter.read()
    ctx.procs.stop(gateway.proc)
    ctx.procs.stop(receiver.proc)
    return {
        "accepted_per_s": round(accepted / seconds, 1),
        "delivered": stats["count"],
        "last_delivery_after_load_s": round(max(0.0, done - load_ended), 2),
        "cpu_cores": cpu,
        "cpu_us_per_event": _cpu_us_per(cpu, done - started, accepted),
    }


def rows(d: dict[str, Any]) -> list[str]:
    table = []
    for label, r in d["layouts"].items():
        i, dl, e = r["ingress"], r["delivery"], r["e2e"]
        table.append(
            [
                label,
                i["req_per_s"],
                i["cpu_us_per_event"]["gateway"],
                dl["deliveries_per_s"],
                dl["cpu_us_per_event"]["gateway"],
                e["accepted_per_s"],
                e["cpu_us_per_event"]["gateway"],
                i["other_cores"],
            ]
        )
    headers = ["layout", "ingress/s", "µs/event", "delivery/s", "µs/deliv.", "e2e/s", "µs/e2e", "other"]
    lines = report.table(table, headers).splitlines()
    lines.append("medians of the rounds; µs: CPU of the gateway's processes per event (nats-server apart)")
    for label, r in d["layouts"].items():
        per_round = "; ".join(
            f"{load} " + ", ".join(_fmt_round(x) for x in r[load][f"{FIGURES[load][0]}_rounds"])
            for load in FIGURES
        )
        lines.append(f"  {label} per round: {per_round}")
    return lines


def _fmt_round(x: float) -> str:
    return f"{x:,.0f}"
