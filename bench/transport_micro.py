"""Micro-benchmark of hookgate's egress transport, without NATS or the dispatcher.

N POSTs at concurrency C against the trio+h11 `receiver.py` in its own process, three ways:

- `httpx`: what the dispatcher used to do per delivery: build an `httpx.Request`, wrap
  `PooledTransport.handle_async_request` in `trio.fail_after`, read headers and content.
- `fast`: `PooledTransport.send` with a `Target` parsed once and str header pairs.
- `bare`: a bare trio+h11 keep-alive client (`loadgen.Connection`), the ceiling.

    python bench/transport_micro.py [--total 20000] [--concurrency 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadgen

from hookgate.transport.pool import PooledTransport
from hookgate.transport.url import parse_url

TIMEOUT = 10.0


def _headers(i: int) -> list[tuple[str, str]]:
    """Shaped like the dispatcher's headers for an internal event."""
    return [
        ("content-type", "application/json"),
        ("webhook-id", f"evt_{i:024d}"),
        ("webhook-timestamp", "1700000000"),
        ("hookgate-delivery-id", f"dlv_{i:024d}"),
        ("hookgate-attempt", "1"),
        ("user-agent", "hookgate"),
        ("webhook-signature", "v1,K5oZfzN95Z9UVu1EsfQmfVNQhnkZ2pj9o9NDN/H/pI4="),
    ]


BODY = b'{"type":"order.created","timestamp":"2024-01-01T00:00:00.000Z","data":' + (
    loadgen.sample_data("evt_000000000000000000000000") + b"}"
)


async def _drive(total: int, concurrency: int, one: Callable[[int], Awaitable[int]]) -> float:
    counter = iter(range(total))
    statuses: list[int] = []

    async def worker() -> None:
        for i in counter:
            statuses.append(await one(i))

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    elapsed = time.perf_counter() - started
    assert len(statuses) == total and set(statuses) == {200}, set(statuses)
    return elapsed


async def run_httpx(url: str, total: int, concurrency: int) -> float:
    async with PooledTransport(max_connections=concurrency) as transport:

        async def one(i: int) -> int:
            request = httpx.Request(
                "POST",
                url,
                headers=_headers(i),
                content=BODY,
                extensions={"timeout": dict.fromkeys(("connect", "read", "write", "pool"), TIMEOUT)},
            )
            with trio.fail_after(TIMEOUT):
                response = await transport.handle_async_request(request)
            list(response.headers.items())
            response.content[:4096]
            return response.status_code

        return await _drive(total, concurrency, one)


async def run_fast(url: str, total: int, concurrency: int) -> float:
    target = parse_url(url)
    async with PooledTransport(max_connections=concurrency) as transport:

        async def one(i: int) -> int:
            response = await transport.send(target, _headers(i), BODY, TIMEOUT)
            response.content[:4096]
            return response.status_code

        return await _drive(total, concurrency, one)


async def run_bare(url: str, total: int, concurrency: int) -> float:
    port = httpx.URL(url).port
    assert port is not None
    conns = [loadgen.Connection("127.0.0.1", port) for _ in range(concurrency)]
    free = list(conns)

    async def one(i: int) -> int:
        conn = free.pop()
        try:
            headers = [(k.encode(), v.encode()) for k, v in _headers(i)]
            return await conn.request(loadgen.Job(b"/hooks", headers, BODY, ""))
        finally:
            free.append(conn)

    try:
        return await _drive(total, concurrency, one)
    finally:
        for conn in conns:
            conn.close()


RUNNERS = {"httpx": run_httpx, "fast": run_fast, "bare": run_bare}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("receiver did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--total", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default=",".join(RUNNERS))
    args = parser.parse_args()
    modes = args.modes.split(",")

    port = _free_port()
    receiver = Path(__file__).resolve().parent / "receiver.py"
    server = subprocess.Popen([sys.executable, str(receiver), "--port", str(port)])
    try:
        _wait_listening(port)
        url = f"http://127.0.0.1:{port}/hooks"
        trio.run(RUNNERS[modes[0]], url, 2_000, args.concurrency)  # warm up
        rates: dict[str, list[float]] = {mode: [] for mode in modes}
        cpus: dict[str, list[float]] = {mode: [] for mode in modes}  # client CPU per request
        for _ in range(args.rounds):
            for mode in modes:  # interleaved, so drift in machine load hits every mode alike
                cpu = time.process_time()
                elapsed = trio.run(RUNNERS[mode], url, args.total, args.concurrency)
                cpu_us = (time.process_time() - cpu) / args.total * 1e6
                rates[mode].append(args.total / elapsed)
                cpus[mode].append(cpu_us)
                print(
                    f"{mode:>6}: {rates[mode][-1]:8.0f} req/s, {cpu_us:5.1f} us CPU/request", file=sys.stderr
                )
        print(
            f"\n{args.total} POSTs x {args.rounds} rounds, concurrency {args.concurrency}, pid {os.getpid()}"
        )
        bare = statistics.median(rates["bare"]) if "bare" in rates else None
        for mode, values in rates.items():
            median = statistics.median(values)
            ratio = f"  {median / bare:5.2f}x bare" if bare else ""
            spread = f"(min {min(values):.0f}, max {max(values):.0f})"
            cpu = statistics.median(cpus[mode])
            print(f"{mode:>6}: median {median:8.0f} req/s  {spread}{ratio}  client CPU {cpu:5.1f} us/request")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
