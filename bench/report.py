"""Percentiles, merging load-generator results, and the printed table."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any


def percentile(values: Sequence[float], p: float) -> float | None:
    """The p-th percentile (nearest rank) of `values`, or None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def latency_summary(values_ms: Sequence[float]) -> dict[str, float | None]:
    return {
        "p50_ms": _round(percentile(values_ms, 50)),
        "p90_ms": _round(percentile(values_ms, 90)),
        "p99_ms": _round(percentile(values_ms, 99)),
        "max_ms": _round(max(values_ms) if values_ms else None),
    }


def merge_runs(runs: Iterable[dict[str, Any]], measured_seconds: float) -> dict[str, Any]:
    """Load-generator outputs of equal-length windows, as one: req/s over the total time."""
    runs = list(runs)
    latencies = [x for r in runs for x in r["latencies_ms"]]
    ok = sum(r["ok"] for r in runs)
    statuses: dict[str, int] = {}
    exceptions: dict[str, int] = {}
    for r in runs:
        for k, v in r["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
        for k, v in r["exceptions"].items():
            exceptions[k] = exceptions.get(k, 0) + v
    return {
        "req_per_s": round(ok / measured_seconds, 1),
        "ok": ok,
        "errors": sum(r["errors"] for r in runs),
        "statuses": statuses,
        "exceptions": exceptions,
        "seconds": measured_seconds,
        **latency_summary(latencies),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or not b:
        return None
    return round(a / b, 3)


def _round(x: float | None, digits: int = 2) -> float | None:
    return None if x is None else round(x, digits)


def _fmt(x: object) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.1f}" if abs(x) >= 100 else f"{x:,.2f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    cells = [[_fmt(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        first = row[0].ljust(widths[0])
        lines.append("  ".join([first, *(c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True))]))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def verdict(value: float | None, target: float) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f}x  (target >= {target}x: {'MET' if value >= target else 'MISSED'})"


def cpu_us_per_event(cores: dict[str, float], events_per_s: float | None, *names: str) -> float | None:
    """CPU µs the named processes spent per event: their cores over the event rate."""
    if not events_per_s:
        return None
    return round(sum(cores.get(n, 0.0) for n in names) / events_per_s * 1e6, 1)
