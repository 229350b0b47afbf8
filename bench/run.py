"""hookgate's benchmark harness: one command, eight measurements, ratios against bare baselines.

    python bench/run.py [--quick] [--json PATH] [--profile]
        [--only ingress,delivery,e2e,dedup,endpoints,log,sync,workers]

Everything runs on this machine over 127.0.0.1: hookgate as a subprocess (`python -m hookgate.cli
run`) with its embedded NATS in a temp dir, a trio+h11 receiver, a bare hypercorn-trio app, and a
trio+h11 load generator. Absolute numbers on a shared machine are noisy; quote the ratios.
See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import endpointsphase
import logphase
import phases
import report
import syncphase
import workersphase
from procs import BENCH, Processes

PHASES: dict[str, Callable[[phases.Context], dict[str, Any]]] = {
    "ingress": phases.ingress,
    "delivery": phases.delivery,
    "e2e": phases.end_to_end,
    "dedup": phases.dedup_memory,
    "endpoints": endpointsphase.endpoint_count,
    "log": logphase.delivery_log,
    "sync": syncphase.sync_cost,
    "workers": workersphase.workers,
}


def options(args: argparse.Namespace) -> phases.Options:
    if args.quick:
        return phases.Options(
            quick=True,
            connections=args.connections,
            ingress_seconds=4,
            rounds=2,
            warmup=1,
            backlog=5_000,
            concurrency=args.concurrency,
            e2e_rate=100,
            e2e_seconds=5,
            dedup_ids=50_000,
            log_deliveries=20_000,
            log_level=args.log_level,
            profile=args.profile,
        )
    return phases.Options(
        quick=False,
        connections=args.connections,
        ingress_seconds=10,
        rounds=2,
        warmup=2,
        backlog=20_000,
        concurrency=args.concurrency,
        e2e_rate=200,
        e2e_seconds=10,
        dedup_ids=100_000,
        log_deliveries=100_000,
        log_level=args.log_level,
        profile=args.profile,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a ~1-minute smoke run with smaller counts")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--only", default=",".join(PHASES), help="comma-separated subset of: " + ", ".join(PHASES)
    )
    parser.add_argument("--connections", type=int, default=32, help="ingress load connections (default 32)")
    parser.add_argument("--concurrency", type=int, default=20, help="endpoint concurrency (default 20)")
    parser.add_argument("--log-level", default="INFO", help="hookgate's --log-level (default INFO)")
    parser.add_argument(
        "--profile", action="store_true", help="py-spy the gateway during ingress, delivery and e2e"
    )
    args = parser.parse_args()
    selected = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = [p for p in selected if p not in PHASES]
    if unknown:
        parser.error(f"unknown phase(s): {', '.join(unknown)}")

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = BENCH / "results" / stamp
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"meta": _meta(args, out_dir)}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="hookgate-bench-") as tmp, Processes(out_dir) as procs:
        ctx = phases.Context(options(args), procs, Path(tmp), out_dir)
        for name in selected:
            print(f"[{time.monotonic() - started:5.0f}s] {name} ...", file=sys.stderr, flush=True)
            try:
                results[name] = PHASES[name](ctx)
            except Exception as exc:  # keep going: one failed phase should not hide the others
                results[name] = {"error": f"{type(exc).__name__}: {exc}"}
                print(f"  {name} failed: {exc} (logs in {out_dir})", file=sys.stderr)
            finally:
                procs.close()
    results["meta"]["seconds"] = round(time.monotonic() - started, 1)
    results["meta"]["loadavg_at_end"] = Path("/proc/loadavg").read_text().split()[:3]

    print(render(results))
    text = json.dumps(results, indent=2, default=str)
    (out_dir / "results.json").write_text(text)
    if args.json:
        args.json.write_text(text)
    print("\nJSON:", json.dumps(_without_profiles(results), default=str))
    return 1 if any("error" in v for k, v in results.items() if k != "meta") else 0


def _meta(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    return {
        "when": datetime.datetime.now().isoformat(timespec="seconds"),
        "quick": args.quick,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "load_generator": (
            "python trio+h11 client (bench/loadgen.py), 1 process; "
            + (
                "wrk is installed but not used: it cannot HMAC-sign each request with a fresh id"
                if shutil.which("wrk")
                else "wrk not installed"
            )
        ),
        "receiver": "trio+h11 server (bench/receiver.py), 1 process",
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
        "logs": str(out_dir),
    }


def _without_profiles(results: dict[str, Any]) -> dict[str, Any]:
    return {k: {kk: vv for kk, vv in v.items() if kk != "profile"} for k, v in results.items()}


def render(r: dict[str, Any]) -> str:
    out: list[str] = [f"\nhookgate benchmark ({r['meta']['machine']}; {r['meta']['load_generator']})"]
    if "ingress" in r:
        out += _section("1. ingress: HMAC-verified webhooks accepted per second", r["ingress"], _ingress_rows)
    if "delivery" in r:
        out += _section("2. delivery: draining a backlog to a fast receiver", r["delivery"], _delivery_rows)
    if "e2e" in r:
        out += _section("3. end-to-end latency: ingress request -> receiver", r["e2e"], _e2e_rows)
    if "dedup" in r:
        out += _section("4. dedup memory: nats-server RSS per stored event id", r["dedup"], _dedup_rows)
    if "log" in r:
        title = "5. delivery log: nats-server RSS per delivery kept, API latency at that size"
        out += _section(title, r["log"], _log_rows)
    if "sync" in r:
        title = "6. broker.sync: ingress with the embedded server syncing its store to disk"
        out += _section(title, r["sync"], syncphase.rows)
    if "endpoints" in r:
        title = "7. endpoint count: idle cost, start, a new endpoint's first delivery, p99 to a random one"
        out += _section(title, r["endpoints"], endpointsphase.rows)
    if "workers" in r:
        title = "8. workers: one gateway process against several under the supervisor"
        out += _section(title, r["workers"], workersphase.rows)
    out.append("\nRATIOS (quote these; absolute numbers on a shared machine are noisy)")
    if "ratio" in r.get("ingress", {}):
        out.append(
            f"  ingress  hookgate / bare hypercorn-trio : {report.verdict(r['ingress']['ratio'], 0.8)}"
        )
    if "ratio" in r.get("delivery", {}):
        out.append(
            f"  delivery hookgate / bare trio+h11 client: {report.verdict(r['delivery']['ratio'], 0.5)}"
        )
    if r.get("e2e", {}).get("cpu_us_per_event") is not None:
        e = r["e2e"]
        out.append(
            f"  e2e      {e['cpu_us_per_event'] / 1000:.2f} ms of gateway CPU per webhook (target < 1.5), "
            f"p50 {e['p50_ms']} ms, p99 {e['p99_ms']} ms (target < 20)"
        )
    if "bytes_per_id" in r.get("dedup", {}):
        d = r["dedup"]
        out.append(
            f"  dedup    {d['bytes_per_id']:.0f} B per id -> {d['extrapolated_bytes'] / 2**30:.2f} GiB "
            f"for {d['extrapolated_ids']:,} ids ({d['extrapolated_note']})"
        )
    if "rss_bytes_per_delivery" in r.get("log", {}):
        g = r["log"]
        first, dead = g["api"]["list, first page"], g["api"][next(k for k in g["api"] if "status=dead" in k)]
        per = g["live_bytes_per_delivery"]
        memory = (
            f"{per:.0f} B live heap per delivery -> {g['extrapolated_live_bytes'] / 2**30:.2f} GiB"
            if per is not None
            else f"{g['rss_bytes_per_delivery']:.0f} B RSS per delivery -> "
            f"{g['extrapolated_rss_bytes'] / 2**30:.2f} GiB"
        )
        out.append(
            f"  log      {memory} for {g['extrapolated_deliveries']:,} deliveries "
            f"({g['extrapolated_note']}); first page {first['median_ms']:.0f} ms, "
            f"status=dead page {dead['median_ms']:.0f} ms (medians)"
        )
    if "ratios_to_2m" in r.get("sync", {}):
        ratios = r["sync"]["ratios_to_2m"]
        out.append("  sync     ingress req/s vs sync 2m: " + ", ".join(f"{k} {v}" for k, v in ratios.items()))
    return "\n".join(out)


def _section(title: str, data: dict[str, Any], rows: Callable[[dict[str, Any]], list[str]]) -> list[str]:
    lines = ["", title]
    if "error" in data:
        return [*lines, f"  FAILED: {data['error']}"]
    lines.append(f"  ({data['setup']})")
    lines += ["  " + line for line in rows(data)]
    profile = data.get("profile")
    if profile and profile.get("self"):
        threads = ", ".join(f"{name} {share:.0f}%" for name, share in profile["threads"])
        lines.append(f"  py-spy (samples holding the GIL; {threads}); top functions by own time:")
        lines += [f"    {share:5.1f}%  {frame}" for frame, share in profile["self"][:12]]
    return lines


def _ingress_rows(d: dict[str, Any]) -> list[str]:
    rows: list[list[object]] = []
    for label, s in (("hookgate", d["hookgate"]), ("bare hypercorn-trio", d["bare_hypercorn"])):
        per = s.get("cpu_us_per_event")
        rows.append([label, s["req_per_s"], s["p50_ms"], s["p99_ms"], s["errors"], per, _cpu(s)])
    rounds = ", ".join(f"{r:.2f}" for r in d["round_ratios"])
    rows.append(["ratio", d["ratio"], None, None, None, None, f"per round: {rounds}"])
    headers = ["", "req/s", "p50 ms", "p99 ms", "errors", "CPU µs/event", "CPU (cores)"]
    return report.table(rows, headers).splitlines()


def _delivery_rows(d: dict[str, Any]) -> list[str]:
    h, b, c = d["hookgate"], d["bare_client"], d["receiver_ceiling"]
    rows: list[list[object]] = [
        [
            "hookgate (drain)",
            h["deliveries_per_s"],
            h["delivered"],
            h["seconds"],
            h.get("cpu_us_per_event"),
            _cpu(h),
        ]
    ]
    for when in ("before", "after"):
        r = b[when]
        per = r.get("cpu_us_per_event")
        rows.append([f"bare trio+h11 client, {when}", r["req_per_s"], r["ok"], r["seconds"], per, _cpu(r)])
    rows += [
        ["bare client, mean", b["req_per_s"], None, None, b.get("cpu_us_per_event"), ""],
        [f"receiver ceiling ({c['connections']} conns)", c["req_per_s"], None, None, None, ""],
        ["ratio", d["ratio"], None, None, None, ""],
    ]
    headers = ["", "req/s", "requests", "seconds", "CPU µs/event", "CPU (cores)"]
    lines = report.table(rows, headers).splitlines()
    lines.append(
        f"backlog built with nats-py at {h['backlog_publish_per_s']:,.0f} publishes/s, routed at "
        f"{h['backlog_routed_per_s']:,.0f} events/s"
    )
    return lines


def _cpu(stats: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in stats.get("cpu_cores", {}).items() if v >= 0.005)


def _e2e_rows(d: dict[str, Any]) -> list[str]:
    i = d["ingress_response"]
    rows = [
        ["ingress -> receiver", d["p50_ms"], d["p90_ms"], d["p99_ms"], d["max_ms"]],
        ["ingress response", i["p50_ms"], i["p90_ms"], i["p99_ms"], i["max_ms"]],
    ]
    lines = report.table(rows, ["ms", "p50", "p90", "p99", "max"]).splitlines()
    lines.append(f"CPU (cores): {_cpu(d)}")
    if d.get("cpu_us_per_event") is not None:
        lines.append(
            f"CPU per webhook: hookgate {d['cpu_us_per_event']:,.0f} µs, "
            f"with its nats-server {d['cpu_us_per_event_with_nats']:,.0f} µs"
        )
    lines.append(
        f"sent {d['sent']:,}, accepted {d['accepted']:,}, delivered {d['delivered']:,}, "
        f"missing {d['missing']:,}"
    )
    return lines


def _dedup_rows(d: dict[str, Any]) -> list[str]:
    w, c = d["with_ids"], d["control_without_ids"]
    mib = 2**20
    rows = [
        [
            "with distinct Nats-Msg-Id",
            w["rss_before"] / mib,
            w["rss_after"] / mib,
            w["rss_growth"] / mib,
            w["stored"],
        ],
        [
            "control, no Nats-Msg-Id",
            c["rss_before"] / mib,
            c["rss_after"] / mib,
            c["rss_growth"] / mib,
            c["stored"],
        ],
    ]
    lines = report.table(rows, ["", "RSS before MiB", "after MiB", "growth MiB", "stored"]).splitlines()
    lines.append(
        f"{d['bytes_per_id']:.0f} B per id net of the control ({d['bytes_per_id_raw']:.0f} B raw); "
        f"{d['extrapolated_ids']:,} ids -> {d['extrapolated_bytes'] / 2**30:.2f} GiB "
        f"({d['extrapolated_note']}); with the deliveries stream's ids for one endpoint: "
        f"{d['extrapolated_bytes_with_one_endpoint'] / 2**30:.2f} GiB"
    )
    return lines


def _log_rows(d: dict[str, Any]) -> list[str]:
    mib = 2**20

    def heap(x: int | None) -> float | None:
        return None if x is None else x / mib

    rows = [
        [
            label,
            s["rss_before"] / mib,
            s["rss_after"] / mib,
            s["rss_growth"] / mib,
            heap(s.get("idle_live_heap")),
            s["published"],
        ]
        for label, s in (
            (f"log, {d['subjects']:,} subjects", d["log"]),
            ("control, 4 subjects", d["control_few_subjects"]),
        )
    ]
    headers = ["", "RSS before MiB", "after MiB", "growth MiB", "idle live heap MiB", "messages"]
    lines = report.table(rows, headers).splitlines()
    gib, n = 2**30, d["extrapolated_deliveries"]
    if d["live_bytes_per_delivery"] is not None:
        lines.append(
            f"live heap: {d['live_bytes_per_delivery']:.0f} B per delivery net of the control "
            f"({d['subjects_per_delivery']:.2f} subjects per delivery, "
            f"{d['live_bytes_per_subject']:.0f} B each) "
            f"-> {d['extrapolated_live_bytes'] / gib:.2f} GiB for {n:,} deliveries ({d['extrapolated_note']})"
        )
    else:
        lines.append("live heap: not measured (--quick does not wait for the idle collection)")
    lines.append(
        f"RSS while busy: {d['rss_bytes_per_delivery']:.0f} B per delivery net of the control "
        f"({d['rss_bytes_per_delivery_raw']:.0f} B raw) -> {d['extrapolated_rss_bytes'] / gib:.2f} GiB; "
        f"stored {d['stored_bytes_per_delivery']:.0f} B per delivery on disk; "
        f"published at {d['log']['publish_per_s']:,.0f} messages/s"
    )
    more = {True: "yes", False: "no"}
    api = [
        [
            label,
            a["median_ms"],
            a["max_ms"],
            a["reps"],
            a.get("rows"),
            more.get(a.get("more")),
            a["cpu_ms_per_request"]["hookgate"],
            a["cpu_ms_per_request"]["nats-server"],
        ]
        for label, a in d["api"].items()
    ]
    headers = ["GET /api/v1/...", "median ms", "max ms", "reps", "rows", "next", "CPU ms: gw", "nats"]
    lines += report.table(api, headers).splitlines()
    rc = d["recover"]
    lines.append(
        f"recover over {rc['deliveries_in_range']:,} deliveries ({rc['dead_in_range']} dead): "
        f"job {rc['state']} in {rc['seconds']:.2f} s, scanned {rc['scanned']:,}, "
        f"requeued {rc['requeued']:,}, skipped {rc['skipped']}; "
        f"the receiver then got {rc['delivered_after']:,}"
    )
    return lines


if __name__ == "__main__":
    sys.exit(main())
