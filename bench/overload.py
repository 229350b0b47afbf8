"""Overload: accepted webhooks per second and latency under many connections, and what was stored.

Starts one gateway (`python -m hookgate.cli run`, embedded nats-server in a temp dir) on
127.0.0.1, runs `loadgen.py duration` against it with `--connections` keep-alive connections of
correctly signed webhooks, and prints one JSON object: the statuses, accepted req/s, p50/p99 of
the accepted, and how many events the events stream holds 3 s after the load stopped (events
stored beyond those answered 2xx were stored for clients that had given up). Everything it starts
is stopped by pid at the end.

    python bench/overload.py --connections 1000 --duration 10
    python bench/overload.py --connections 1000 --server "max_in_flight: 64"

`--pythonpath DIR` runs the gateway from another copy of the source (a directory holding a
`hookgate` package), to measure before and after a change with the same client.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BENCH = Path(__file__).resolve().parent
SECRET = "bench-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config(port: int, data_dir: Path, server: list[str]) -> str:
    extra = "".join(f"  {line}\n" for line in server)
    return f"""\
server:
  listen: 127.0.0.1:{port}
  shutdown_grace: 2s
{extra}broker:
  data_dir: {data_dir}
sources:
  bench:
    verify: {{type: hmac, header: X-Sig, prefix: "sha256=", secret: {SECRET}}}
    event_type: header.X-Event-Type
    event_id: header.X-Event-Id
log:
  level: warning
"""


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the gateway exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit("the gateway did not get ready")


def stored_events(data_dir: Path) -> int:
    """Messages in the events stream, read with the embedded server's credentials."""
    import natsops  # beside this file; imports nats-py, which only this measurement needs

    try:
        server = natsops.embedded_server(data_dir, timeout=2)
        return natsops.stream_numbers(server.url, "HOOKGATE_EVENTS")["messages"]
    except Exception as exc:
        print(f"could not count the stored events: {exc}", file=sys.stderr)
        return -1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--server", action="append", default=[], help='extra server: lines, "key: value"')
    parser.add_argument("--pythonpath", help="run the gateway from this source copy")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="hookgate-overload-") as tmp:
        work = Path(tmp)
        port = free_port()
        data_dir = work / "data"
        (work / "hookgate.yaml").write_text(config(port, data_dir, args.server))
        env = dict(os.environ)
        if args.pythonpath:
            env["PYTHONPATH"] = args.pythonpath
        with (work / "gateway.log").open("wb") as log:
            gateway = subprocess.Popen(
                [sys.executable, "-m", "hookgate.cli", "run", "-c", str(work / "hookgate.yaml")],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=work,
            )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, gateway)
            load = subprocess.run(
                [
                    sys.executable,
                    str(BENCH / "loadgen.py"),
                    "duration",
                    "--port",
                    str(port),
                    "--secret",
                    SECRET,
                    "--connections",
                    str(args.connections),
                    "--duration",
                    str(args.duration),
                    "--warmup",
                    str(args.warmup),
                ],
                capture_output=True,
                check=True,
                timeout=args.warmup + args.duration + 60,
            )
            result = json.loads(load.stdout)
            time.sleep(3)
            stored = stored_events(data_dir)
            tracebacks = (work / "gateway.log").read_text(errors="replace").count("Traceback")
        finally:
            gateway.terminate()
            try:
                gateway.wait(timeout=30)
            except subprocess.TimeoutExpired:
                gateway.kill()
                gateway.wait()
    latencies = sorted(result["latencies_ms"])

    def pct(p: float) -> float | None:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else None

    print(
        json.dumps(
            {
                "connections": args.connections,
                "server": args.server,
                "source": args.pythonpath or "this checkout",
                "accepted_per_s": round(result["ok"] / args.duration, 1),
                "statuses": result["statuses"],
                "exceptions": result["exceptions"],
                "p50_ms": pct(0.5),
                "p99_ms": pct(0.99),
                "stored_total_incl_warmup": stored,
                "gateway_log_tracebacks": tracebacks,
            }
        )
    )


if __name__ == "__main__":
    main()
