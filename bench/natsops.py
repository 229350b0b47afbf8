"""Direct NATS work for the benchmarks (nats-py on asyncio, called from the synchronous orchestrator).

Finding the embedded server of a running hookgate, bulk JetStream publishing, waiting for consumers
to catch up, and reading a process's resident memory.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError


@dataclass(frozen=True)
class EmbeddedServer:
    pid: int
    url: str
    nkey_seed_file: str  # the user nkey the server accepts (a new one per gateway start)


# The credentials of the embedded servers found so far, by URL: every connection below uses them.
_SEEDS: dict[str, str] = {}


def embedded_server(data_dir: Path, timeout: float = 10.0) -> EmbeddedServer:
    """The nats-server a hookgate started in `data_dir`: its pid file, then its ports file, and the
    seed of the one user it accepts (`nats-client.nk`, readable by the owner only, as this is)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            pid = int((data_dir / "nats-server.pid").read_text().strip())
            ports = json.loads((data_dir / f"nats-server_{pid}.ports").read_text())
            seed_file = data_dir / "nats-client.nk"
            seed_file.read_text()
            server = EmbeddedServer(pid, ports["nats"][0], str(seed_file))
            _SEEDS[server.url] = server.nkey_seed_file
            return server
        except (OSError, ValueError, KeyError, IndexError):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no embedded nats-server found in {data_dir}") from None
            time.sleep(0.05)


async def _connect(url: str, **options: Any) -> nats.NATS:
    """A nats-py connection to `url`, with the embedded server's credentials if it is one."""
    seed = _SEEDS.get(url)
    if seed is not None:
        options["nkeys_seed"] = seed
    return await nats.connect(url, name="hookgate-bench", **options)


@dataclass(frozen=True)
class Published:
    count: int
    errors: int
    duplicates: int
    seconds: float


def publish_bulk(
    url: str,
    count: int,
    subject: Callable[[int], str],
    payload: Callable[[int], bytes],
    msg_id: Callable[[int], str] | None,
) -> Published:
    """JetStream-publish `count` messages as fast as the server acks them (async publish, windowed)."""

    async def go() -> Published:
        nc = await _connect(url)
        try:
            js = nc.jetstream(publish_async_max_pending=2000)
            started = time.perf_counter()
            futures = []
            for i in range(count):
                headers = {"Nats-Msg-Id": msg_id(i)} if msg_id is not None else None
                futures.append(await js.publish_async(subject(i), payload(i), wait_stall=30, headers=headers))
            acks = await asyncio.gather(*futures, return_exceptions=True)
            elapsed = time.perf_counter() - started
        finally:
            await nc.close()
        errors = sum(1 for a in acks if isinstance(a, BaseException))
        duplicates = sum(1 for a in acks if not isinstance(a, BaseException) and a.duplicate)
        return Published(count, errors, duplicates, elapsed)

    return asyncio.run(go())


def publish_pipelined(
    url: str,
    count: int,
    subject: Callable[[int], str],
    payload: Callable[[int], bytes],
    window: int = 4000,
) -> Published:
    """Like `publish_bulk` without message ids, several times faster: plain publishes with a reply
    inbox, every PubAck on one wildcard subscription, at most `window` unacknowledged at a time."""

    async def go() -> Published:
        nc = await _connect(url, pending_size=64 * 2**20)
        acked, errors = 0, 0
        room = asyncio.Semaphore(window)
        done = asyncio.Event()

        async def on_ack(msg: Msg) -> None:
            nonlocal acked, errors
            acked += 1
            if not msg.data or b'"error"' in msg.data:
                errors += 1
            room.release()
            if acked == count:
                done.set()

        try:
            inbox = f"_INBOX.bench{nc._nuid.next().decode()}."
            await nc.subscribe(inbox + "*", cb=on_ack, pending_msgs_limit=window * 4)
            started = time.perf_counter()
            for i in range(count):
                await room.acquire()
                await nc.publish(subject(i), payload(i), reply=f"{inbox}{i:x}")
            if count:
                await asyncio.wait_for(done.wait(), 60)
            elapsed = time.perf_counter() - started
        finally:
            await nc.close()
        return Published(count, errors, 0, elapsed)

    return asyncio.run(go())


def consumer_backlog(url: str, stream: str, durable: str) -> tuple[int, int]:
    """(messages not yet delivered, messages delivered but not yet acked) of a durable consumer."""

    async def go() -> tuple[int, int]:
        nc = await _connect(url)
        try:
            info = await nc.jetstream().consumer_info(stream, durable)
        finally:
            await nc.close()
        return info.num_pending or 0, info.num_ack_pending or 0

    return asyncio.run(go())


def wait_consumer(
    url: str, stream: str, durable: str, until: Callable[[int, int], bool], timeout: float
) -> tuple[int, int]:
    """Poll a consumer until `until(pending, ack_pending)`; its last state, or TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            state = consumer_backlog(url, stream, durable)
            if until(*state):
                return state
        except NotFoundError:
            state = (-1, -1)
        if time.monotonic() > deadline:
            raise TimeoutError(f"consumer {stream}/{durable} still at {state} after {timeout:.0f}s")
        time.sleep(0.2)


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def settled_rss(pid: int, seconds: float = 3.0, interval: float = 0.25) -> int:
    """RSS after letting the server settle: the lowest of several samples over `seconds`."""
    samples = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        samples.append(rss_bytes(pid))
        time.sleep(interval)
    return min(samples) if samples else rss_bytes(pid)


def stream_numbers(url: str, stream: str) -> dict[str, int]:
    """A stream's state as the server reports it: messages, bytes, first_seq, last_seq, num_subjects.

    Asked with a raw `$JS.API.STREAM.INFO` request: nats-py's StreamState has no `num_subjects`.
    """

    async def go() -> dict[str, int]:
        nc = await _connect(url)
        try:
            reply = await nc.request(f"$JS.API.STREAM.INFO.{stream}", b"", timeout=10)
        finally:
            await nc.close()
        state = json.loads(reply.data)["state"]
        keys = ("messages", "bytes", "first_seq", "last_seq", "num_subjects")
        return {k: int(state.get(k) or 0) for k in keys}

    return asyncio.run(go())


def stream_state(url: str, stream: str) -> tuple[float, int]:
    """(duplicate window in seconds, messages stored) of a stream."""

    async def go() -> tuple[float, int]:
        nc = await _connect(url)
        try:
            info = await nc.jetstream().stream_info(stream)
        finally:
            await nc.close()
        return float(info.config.duplicate_window or 0), info.state.messages

    return asyncio.run(go())


# With GODEBUG=gctrace=1 the Go runtime logs each collection to stderr (the embedded server's log):
#   gc 21 @126.111s 0%: ..., 97->97->46 MB, 162 MB goal, ...
# heap at start -> heap at end -> live heap after marking, in MiB.
_GC_LINE = re.compile(rb"^gc (\d+) @([\d.]+)s .*?(\d+)->(\d+)->(\d+) MB", re.MULTILINE)


@dataclass(frozen=True)
class GcTrace:
    number: int
    at: float  # seconds since the process started
    live_bytes: int  # the live heap the collection found


def gc_traces(log_file: Path) -> list[GcTrace]:
    """Every collection a Go process run with GODEBUG=gctrace=1 logged to `log_file`, in order."""
    try:
        text = log_file.read_bytes()
    except OSError:
        return []
    return [GcTrace(int(m[1]), float(m[2]), int(m[5]) * 2**20) for m in _GC_LINE.finditer(text)]
