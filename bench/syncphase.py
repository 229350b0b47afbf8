"""What `broker.sync` costs ingress: the embedded server forcing its store to disk.

Three gateways run side by side, identical but for `broker.sync`: `2m` (nats-server's own default),
`1s` (hookgate's default) and `always` (an fsync on every write). The ingress load of phase 1 runs
against each in turn, in rounds that rotate the order. Each gets its req/s, latency, and the CPU
of the gateway and its nats-server per accepted event.
"""

from __future__ import annotations

import secrets
from typing import Any

import report
from phases import SOURCE, Context, _loadgen, _mean_cpu, _source_config
from procs import CpuMeter, Hookgate, free_port, hookgate_config, start_hookgate

# (broker.sync, what it is)
VARIANTS = [("2m", "nats-server's default"), ("1s", "hookgate's default"), ("always", "every write")]


def sync_cost(ctx: Context) -> dict[str, Any]:
    o = ctx.options
    secret = secrets.token_hex(16)
    gateways: dict[str, Hookgate] = {}
    for sync, _ in VARIANTS:
        config = hookgate_config(
            free_port(), ctx.data_dir(f"sync-{sync}"), sources={SOURCE: _source_config(secret)}
        )
        config["broker"]["sync"] = sync
        gateways[sync] = start_hookgate(ctx.procs, f"hookgate-sync-{sync}", ctx.work_dir, config, o.log_level)
    runs: dict[str, list[dict[str, Any]]] = {sync: [] for sync, _ in VARIANTS}
    cpu: dict[str, list[dict[str, float]]] = {sync: [] for sync, _ in VARIANTS}
    for round_ in range(o.rounds):
        order = [VARIANTS[(i + round_) % len(VARIANTS)][0] for i in range(len(VARIANTS))]
        for sync in order:
            gateway = gateways[sync]
            argv = _loadgen(
                "duration",
                gateway,
                f"--connections={o.connections}",
                f"--duration={o.ingress_seconds}",
                f"--warmup={o.warmup}",
                f"--secret={secret}",
                f"--tag=sync-{sync}-{round_}",
            )
            meter = CpuMeter({"hookgate": gateway.proc.pid, "nats-server": gateway.nats_pid})
            (out,) = ctx.procs.run_json(
                f"loadgen-sync-{sync}", [argv], timeout=o.warmup + o.ingress_seconds + 60
            )
            cpu[sync].append(meter.read())
            runs[sync].append(out)
    for gateway in gateways.values():
        ctx.procs.stop(gateway.proc)
    seconds = o.rounds * o.ingress_seconds
    variants: dict[str, dict[str, Any]] = {}
    for sync, what in VARIANTS:
        merged = report.merge_runs(runs[sync], seconds)
        merged["what"] = what
        merged["cpu_cores"] = _mean_cpu(cpu[sync])
        cores = merged["cpu_cores"].get("hookgate", 0.0) + merged["cpu_cores"].get("nats-server", 0.0)
        rate = merged["req_per_s"]
        merged["cpu_ms_per_event"] = round(cores * 1000 / rate, 3) if rate else None
        variants[sync] = merged
    base = variants["2m"]["req_per_s"]
    return {
        "setup": (
            f"the ingress load of phase 1 ({o.connections} connections, hmac source, no routes) against "
            f"three gateways that differ only in broker.sync; {o.rounds} rounds of {o.ingress_seconds:g}s "
            f"each after {o.warmup:g}s warm-up, the order rotated per round; the store is in a temp dir"
        ),
        "variants": variants,
        "ratios_to_2m": {sync: report.ratio(v["req_per_s"], base) for sync, v in variants.items()},
    }


def rows(d: dict[str, Any]) -> list[str]:
    table: list[list[object]] = []
    for sync, v in d["variants"].items():
        table.append(
            [
                f"sync: {sync} ({v['what']})",
                v["req_per_s"],
                d["ratios_to_2m"][sync],
                v["p50_ms"],
                v["p99_ms"],
                v["errors"],
                v["cpu_ms_per_event"],
                ", ".join(f"{k} {c:.2f}" for k, c in v["cpu_cores"].items()),
            ]
        )
    headers = ["", "req/s", "vs 2m", "p50 ms", "p99 ms", "errors", "CPU ms/event", "CPU (cores)"]
    return report.table(table, headers).splitlines()
