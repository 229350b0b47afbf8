"""The load generator: a trio + h11 HTTP/1.1 client over N concurrent keep-alive connections.

One process, one trio loop; the orchestrator runs several processes when one is not enough and
merges their JSON. Three modes, each printing one JSON object on stdout:

- `duration`: closed loop for `--warmup` + `--duration` seconds; only requests that complete
  inside the measured window count. Gives req/s and latency percentiles.
- `count`: closed loop until `--total` requests are answered; gives the elapsed time.
- `rate`: open loop, `--rate` requests/s for `--duration` s; records when each request was sent
  (system-wide monotonic clock) under its `x-bench-id`, for end-to-end latency.

Two request kinds: `ingress` (a correctly HMAC-signed webhook with a distinct event id, for
`POST /webhooks/<source>`) and `delivery` (shaped like what hookgate POSTs to an endpoint).

    python bench/loadgen.py duration --port 8080 --kind ingress --secret s --connections 32
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import math
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import h11
import trio

SIG_HEADER = "X-Sig"
SIG_PREFIX = "sha256="
EVENT_ID_HEADER = "X-Event-Id"
EVENT_TYPE_HEADER = "X-Event-Type"
_CONNECTION_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError)


def sample_data(event_id: str) -> bytes:
    """The JSON event payload every benchmark sends (about 420 bytes): an order-like object."""
    return json.dumps(
        {
            "id": event_id,
            "object": "order",
            "created": 1700000000,
            "customer": {"id": "cus_0123456789", "email": "someone@example.com", "country": "NL"},
            "items": [
                {"sku": f"sku-{n}", "quantity": n + 1, "unit_amount": 1250 * (n + 1)} for n in range(3)
            ],
            "amount": 8750,
            "currency": "eur",
            "metadata": {"channel": "web", "campaign": "spring", "note": "x" * 40},
        },
        separators=(",", ":"),
    ).encode()


@dataclass(frozen=True)
class Job:
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    bench_id: str


def ingress_job(source: str, secret: bytes, event_id: str) -> Job:
    body = sample_data(event_id)
    signature = SIG_PREFIX + hmac.new(secret, body, hashlib.sha256).hexdigest()
    headers = [
        (b"content-type", b"application/json"),
        (SIG_HEADER.encode(), signature.encode()),
        (EVENT_ID_HEADER.encode(), event_id.encode()),
        (EVENT_TYPE_HEADER.encode(), b"order.created"),
        (b"x-bench-id", event_id.encode()),
    ]
    return Job(f"/webhooks/{source}".encode(), headers, body, event_id)


def delivery_job(event_id: str) -> Job:
    """What hookgate sends for an internal event: a Standard Webhooks body and its headers."""
    body = b'{"type":"order.created","timestamp":"2024-01-01T00:00:00.000Z","data":' + sample_data(event_id)
    body += b"}"
    headers = [
        (b"content-type", b"application/json"),
        (b"webhook-id", event_id.encode()),
        (b"webhook-timestamp", str(int(time.time())).encode()),
        (b"hookgate-delivery-id", b"dlv_" + event_id.encode()),
        (b"hookgate-attempt", b"1"),
        (b"user-agent", b"hookgate-bench"),
    ]
    return Job(b"/hooks", headers, body, event_id)


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)  # seconds, successful requests only
    statuses: Counter[int] = field(default_factory=Counter)
    exceptions: Counter[str] = field(default_factory=Counter)
    sent: dict[str, float] = field(default_factory=dict)  # bench id -> monotonic send time

    @property
    def errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if not 200 <= status < 300) + sum(
            self.exceptions.values()
        )


class Connection:
    """One keep-alive HTTP/1.1 connection, reopened after an error or a `Connection: close`."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.host_header = f"{host}:{port}".encode()
        self.stream: trio.SocketStream | None = None
        self.h11 = h11.Connection(h11.CLIENT)

    async def request(self, job: Job, sent: dict[str, float] | None = None) -> int:
        if self.stream is None:
            self.stream = await trio.open_tcp_stream(self.host, self.port)
            self.h11 = h11.Connection(h11.CLIENT)
        conn, stream = self.h11, self.stream
        headers = [(b"host", self.host_header), (b"content-length", b"%d" % len(job.body)), *job.headers]
        data = conn.send(h11.Request(method=b"POST", target=job.target, headers=headers))
        data += conn.send(h11.Data(data=job.body)) + conn.send(h11.EndOfMessage())
        if sent is not None:
            sent[job.bench_id] = time.monotonic()
        try:
            await stream.send_all(data)
            status = 0
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        raise ConnectionResetError("server closed the connection")
                    conn.receive_data(chunk)
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.EndOfMessage):
                    break
        except BaseException:
            self.close()
            raise
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        else:
            self.close()
        return status

    def close(self) -> None:
        if self.stream is not None:
            self.stream.socket.close()
            self.stream = None


async def _one(
    conn: Connection, job: Job, tally: Tally, counted: Callable[[], bool], *, track_sent: bool = False
) -> int | None:
    """Send one request; the status, or None after a connection error (counted, then a short pause)."""
    started = time.perf_counter()
    try:
        status = await conn.request(job, tally.sent if track_sent else None)
    except _CONNECTION_ERRORS as exc:
        if counted():
            tally.exceptions[type(exc).__name__] += 1
        await trio.sleep(0.01)
        return None
    if counted():
        tally.statuses[status] += 1
        if 200 <= status < 300:
            tally.latencies.append(time.perf_counter() - started)
    return status


def _always() -> bool:
    return True


def _job_factory(args: argparse.Namespace) -> Callable[[int], Job]:
    run = f"{args.tag}-{uuid.uuid4().hex[:8]}"
    if args.kind == "ingress":
        secret = args.secret.encode()
        return lambda i: ingress_job(args.source, secret, f"{run}-{i}")
    return lambda i: delivery_job(f"{run}-{i}")


async def run_duration(args: argparse.Namespace) -> dict[str, object]:
    make = _job_factory(args)
    tally = Tally()
    counter = iter(range(sys.maxsize))
    start = trio.current_time()
    measure_from, measure_to = start + args.warmup, start + args.warmup + args.duration

    def measuring() -> bool:
        return measure_from <= trio.current_time() <= measure_to

    async def worker() -> None:
        conn = Connection(args.host, args.port)
        while True:
            await _one(conn, make(next(counter)), tally, measuring)

    with trio.move_on_at(measure_to):
        async with trio.open_nursery() as nursery:
            for _ in range(args.connections):
                nursery.start_soon(worker)
    return _summary(tally, args.duration)


async def run_count(args: argparse.Namespace) -> dict[str, object]:
    make = _job_factory(args)
    tally = Tally()
    counter = iter(range(args.total))
    started = time.perf_counter()

    async def worker() -> None:
        conn = Connection(args.host, args.port)
        for i in counter:
            job = make(i)
            for _ in range(100):  # retry after a connection error, so the total is really answered
                if await _one(conn, job, tally, _always) is not None:
                    break
        conn.close()

    with trio.fail_after(args.timeout):
        async with trio.open_nursery() as nursery:
            for _ in range(args.connections):
                nursery.start_soon(worker)
    return _summary(tally, time.perf_counter() - started)


async def run_rate(args: argparse.Namespace) -> dict[str, object]:
    make = _job_factory(args)
    tally = Tally()
    total = int(args.rate * args.duration)
    send, receive = trio.open_memory_channel[Job](math.inf)

    async def schedule() -> None:
        async with send:
            start = trio.current_time()
            for i in range(total):
                await trio.sleep_until(start + i / args.rate)
                send.send_nowait(make(i))

    async def worker() -> None:
        conn = Connection(args.host, args.port)
        async for job in receive:
            await _one(conn, job, tally, _always, track_sent=True)
        conn.close()

    started = time.perf_counter()
    with trio.fail_after(args.duration + args.timeout):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(schedule)
            for _ in range(args.connections):
                nursery.start_soon(worker)
    result = _summary(tally, time.perf_counter() - started)
    result["sent"] = tally.sent
    return result


def _summary(tally: Tally, elapsed: float) -> dict[str, object]:
    ok = len(tally.latencies)
    return {
        "ok": ok,
        "errors": tally.errors,
        "statuses": {str(k): v for k, v in sorted(tally.statuses.items())},
        "exceptions": dict(tally.exceptions),
        "elapsed": elapsed,
        "latencies_ms": [round(x * 1000, 3) for x in tally.latencies],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("mode", choices=["duration", "count", "rate"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--kind", choices=["ingress", "delivery"], default="ingress")
    parser.add_argument("--source", default="bench", help="ingress: the source name")
    parser.add_argument("--secret", default="bench-secret", help="ingress: the HMAC secret")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=float, default=10.0, help="duration/rate: measured seconds")
    parser.add_argument("--warmup", type=float, default=2.0, help="duration: seconds not measured")
    parser.add_argument("--total", type=int, default=20_000, help="count: requests to answer")
    parser.add_argument("--rate", type=float, default=200.0, help="rate: requests per second")
    parser.add_argument("--timeout", type=float, default=120.0, help="count/rate: give up after this")
    parser.add_argument("--tag", default="lg", help="prefix of event ids, distinct per process")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    runner = {"duration": run_duration, "count": run_count, "rate": run_rate}[args.mode]
    result = trio.run(runner, args)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
