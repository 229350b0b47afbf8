"""Clients that hold connections open, stall, flood or leave: the gateway stays up and keeps serving.

Against a real gateway (in-process, or a subprocess for the fd and RSS figures) over loopback.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from hookgate.hookspecs import hookimpl
from hookgate.ingress import server as server_mod
from hookgate.types import IngressRequest, SourceView
from tests.support import (
    NatsServer,
    base_config,
    free_port,
    receiver,
    run_gateway,
    stream_messages,
    write_config,
)
from tests.test_durability import GatewayProcess
from tests.test_ingress import SECRET, signed

SOURCE = f"""
sources:
  acme:
    verify: {{type: hmac, header: X-Acme-Signature, prefix: "sha256=", secret: {SECRET}}}
    event_id: header.X-Acme-Delivery
"""


def config(nats_url: str, server: str, extra: str = SOURCE) -> str:
    text = base_config(nats_url, extra)
    # The limits under test go into the server section base_config writes.
    return text.replace("server:\n", "server:\n" + "".join(f"  {line}\n" for line in server.splitlines()), 1)


def host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


async def connect(url: str) -> trio.SocketStream:
    return await trio.open_tcp_stream(*host_port(url))


async def closed_after(stream: trio.SocketStream, limit: float) -> float:
    """Seconds until the server closes the connection (EOF or reset); fails past `limit`."""
    start = trio.current_time()
    with trio.fail_after(limit):
        while True:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                break
            if not data:
                break
    return trio.current_time() - start


STALLED_HEAD = b"POST /webhooks/acme HTTP/1.1\r\nHost: x\r\nX-Acme-Signa"
STALLED_BODY = b"POST /webhooks/acme HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n0123456789"


async def test_stalled_head_and_body_are_closed_within_their_timeouts(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    text = config(nats_server.url, "header_timeout: 600ms\nbody_timeout: 900ms")
    async with run_gateway(tmp_path, text) as gw:
        silent = await connect(gw.url)
        head = await connect(gw.url)
        await head.send_all(STALLED_HEAD)
        body = await connect(gw.url)
        await body.send_all(STALLED_BODY)
        drip = await connect(gw.url)
        await drip.send_all(STALLED_BODY)
        times: dict[str, float] = {}

        async def watch(name: str, stream: trio.SocketStream) -> None:
            times[name] = await closed_after(stream, 5)

        async def dribble() -> None:
            # A byte every 100 ms: never idle for long, but the body as a whole is late.
            with trio.move_on_after(5):
                while True:
                    await trio.sleep(0.1)
                    try:
                        await drip.send_all(b"x")
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        return

        async with trio.open_nursery() as nursery:
            for name, stream in [("silent", silent), ("head", head), ("body", body), ("drip", drip)]:
                nursery.start_soon(watch, name, stream)
            nursery.start_soon(dribble)
        # The gateway still serves.
        assert (await gw.http.get(f"{gw.url}/healthz")).status_code == 200
        for stream in (silent, head, body, drip):
            await stream.aclose()
    assert 0.5 <= times["silent"] < 1.6, times
    assert 0.5 <= times["head"] < 1.6, times
    assert 0.8 <= times["body"] < 1.9, times
    assert 0.8 <= times["drip"] < 1.9, times


class Gate:
    """A plugin that holds webhooks carrying `X-Hold` in their access check until released: a
    request whose body is in and that is being processed."""

    def __init__(self) -> None:
        self.entered = 0
        self.arrived = trio.Event()
        self.release = trio.Event()

    @hookimpl
    async def hookgate_authenticate(self, request: IngressRequest, source: SourceView) -> None:
        if request.header("x-hold") is None:
            return
        self.entered += 1
        self.arrived.set()
        await self.release.wait()


def metric(text: str, name: str, labels: str = "") -> float:
    pattern = re.escape(name) + (re.escape("{" + labels + "}") if labels else "") + r" (\S+)"
    found = re.search(r"^" + pattern + "$", text, re.M)
    return float(found.group(1)) if found else 0.0


async def test_at_the_connection_cap_health_checks_and_webhooks_still_work(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    gate = Gate()
    async with receiver() as rx:
        routes = (
            SOURCE + f"endpoints:\n  sink: {{url: {rx.url}}}\nroutes:\n  - {{from: [acme], to: [sink]}}\n"
        )
        text = config(nats_server.url, "max_connections: 20\nheader_timeout: 30s\nbody_timeout: 30s", routes)
        async with run_gateway(tmp_path, text, plugins=(gate,)) as gw:
            # One request in progress (its body is in), held by the plugin.
            held_body = b"{}"
            held = trio.Event()
            held_status: list[int] = []

            async def hold() -> None:
                async with httpx.AsyncClient(timeout=10) as client:
                    headers = {**signed(held_body, "held"), "X-Hold": "1"}
                    response = await client.post(
                        f"{gw.url}/webhooks/acme", content=held_body, headers=headers
                    )
                    held_status.append(response.status_code)
                    held.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(hold)
                with trio.fail_after(5):
                    await gate.arrived.wait()
                # Fill every other connection with stalled clients, half mid-head, half mid-body,
                # and then as many again.
                stalled = []
                for i in range(40):
                    stream = await connect(gw.url)
                    await stream.send_all(STALLED_HEAD if i % 2 else STALLED_BODY)
                    stalled.append(stream)
                async with httpx.AsyncClient(timeout=5) as client:
                    assert (await client.get(f"{gw.url}/healthz")).status_code == 200
                    body = b'{"n": 1}'
                    response = await client.post(
                        f"{gw.url}/webhooks/acme", content=body, headers=signed(body, "after-cap")
                    )
                    assert response.status_code == 202, response.text
                    metrics = (await client.get(f"{gw.url}/metrics")).text
                gate.release.set()
                with trio.fail_after(5):
                    await held.wait()
                await rx.wait_for(2)
                for stream in stalled:
                    await stream.aclose()
    assert held_status == [202]  # the request in progress was never closed to make room
    assert metric(metrics, "hookgate_http_connections_refused_total", 'reason="evicted"') >= 20
    assert metric(metrics, "hookgate_http_connections_open") <= 21


async def test_when_every_connection_is_processing_a_new_one_is_refused_at_once(
    tmp_path: Path, nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    gate = Gate()
    text = config(nats_server.url, "max_connections: 2")
    async with run_gateway(tmp_path, text, plugins=(gate,)) as gw:
        statuses: list[int] = []

        async def hold(n: int) -> None:
            async with httpx.AsyncClient(timeout=10) as client:
                headers = {**signed(b"{}", f"held-{n}"), "X-Hold": "1"}
                response = await client.post(f"{gw.url}/webhooks/acme", content=b"{}", headers=headers)
                statuses.append(response.status_code)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hold, 1)
            nursery.start_soon(hold, 2)
            with trio.fail_after(5):
                while gate.entered < 2:
                    await gate.arrived.wait()
                    gate.arrived = trio.Event()
            refused = []
            for _ in range(30):
                start = trio.current_time()
                try:
                    stream = await connect(gw.url)
                except OSError:  # reset before the handshake was seen through: refused too
                    refused.append(trio.current_time() - start)
                    continue
                refused.append(await closed_after(stream, 2))
                await stream.aclose()
            gate.release.set()
        assert statuses == [202, 202]
        assert (await gw.http.get(f"{gw.url}/healthz")).status_code == 200
    assert max(refused) < 0.5
    lines = [
        r.getMessage() for r in caplog.records if "refused" in r.getMessage() and r.name == "hookgate.http"
    ]
    # One line at once, one summary at the end (the interval is longer than the test).
    assert 1 <= len(lines) <= 2, lines
    assert not any(r.exc_info for r in caplog.records if r.name.startswith(("hookgate", "trio")))


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_fds_and_memory_return_to_where_they_were(tmp_path: Path, nats_server: NatsServer) -> None:
    port = free_port()
    # One process (workers: 1), whose descriptors and memory are the ones counted.
    limits = "workers: 1\nmax_connections: 200\nheader_timeout: 1s\nbody_timeout: 1s"
    text = config(nats_server.url, limits).replace("listen: 127.0.0.1:0", f"listen: 127.0.0.1:{port}")
    process = GatewayProcess(write_config(tmp_path, text), port, tmp_path / "gateway.log")
    await process.start()
    try:
        assert process.process is not None
        pid = process.process.pid
        async with httpx.AsyncClient(timeout=5) as client:
            for i in range(20):  # warm up: pools, imports, caches
                body = b"{}"
                await client.post(f"{process.url}/webhooks/acme", content=body, headers=signed(body, f"w{i}"))
            fds_before, rss_before = _fds(pid), _rss_kib(pid)
            # 400 stalled clients against a cap of 200: half are evicted, the rest time out.
            stalled = []
            for i in range(400):
                stream = await connect(process.url)
                await stream.send_all(STALLED_BODY if i % 2 else STALLED_HEAD)
                stalled.append(stream)
            peak = _fds(pid)
            # On a new connection: the idle keep-alive one of `client` is the first to be closed
            # to make room, as the longest waiting.
            async with httpx.AsyncClient(timeout=5) as fresh:
                assert (await fresh.get(f"{process.url}/healthz")).status_code == 200
            with trio.fail_after(10):
                for stream in stalled:
                    await closed_after(stream, 10)
                    await stream.aclose()
                while _fds(pid) > fds_before + 2:
                    await trio.sleep(0.05)
            fds_after, rss_after = _fds(pid), _rss_kib(pid)
            async with httpx.AsyncClient(timeout=5) as fresh:
                assert (await fresh.get(f"{process.url}/healthz")).status_code == 200
    finally:
        if process.process is not None:
            process.kill(signal.SIGTERM)
            await process.wait()
        process.ensure_stopped()
    # An evicted connection's socket is closed when its task next runs, which can trail the
    # accepts that evicted it by a few on a loaded machine: the cap holds, not to the socket.
    assert peak <= fds_before + 200 + 20, (fds_before, peak)
    assert fds_after <= fds_before + 2, (fds_before, fds_after)
    assert rss_after - rss_before < 20 * 1024, (rss_before, rss_after)
    assert "Traceback" not in (tmp_path / "gateway.log").read_text()


# --- admission control ------------------------------------------------------------------------


async def test_past_max_in_flight_a_webhook_gets_503_with_retry_after_at_once(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    text = config(nats_server.url, "max_in_flight: 1")
    async with run_gateway(tmp_path, text) as gw:
        assert nats_server.process is not None
        first: list[httpx.Response] = []
        nats_server.process.send_signal(signal.SIGSTOP)  # the broker stops answering: PubAcks wait
        try:
            async with trio.open_nursery() as nursery:

                async def waiting() -> None:
                    body = b'{"n": 1}'
                    first.append(
                        await gw.http.post(f"{gw.url}/webhooks/acme", content=body, headers=signed(body, "a"))
                    )

                nursery.start_soon(waiting)
                with trio.fail_after(5):  # until the first holds the only slot
                    while (
                        metric((await gw.http.get(f"{gw.url}/metrics")).text, "hookgate_events_in_flight") < 1
                    ):
                        await trio.sleep(0.01)
                body = b'{"n": 2}'
                start = trio.current_time()
                second = await gw.http.post(
                    f"{gw.url}/webhooks/acme", content=body, headers=signed(body, "b")
                )
                took = trio.current_time() - start
                published = await gw.publish("thing.created", {"n": 3})
                nats_server.process.send_signal(signal.SIGCONT)
        finally:
            nats_server.process.send_signal(signal.SIGCONT)
        metrics = (await gw.http.get(f"{gw.url}/metrics")).text
    assert second.json()["error"] == "overloaded"
    assert second.headers["retry-after"] == "1"
    assert took < 0.1
    assert published.status_code == 503 and published.json()["error"] == "overloaded"
    assert published.headers["retry-after"] == "1"
    assert first[0].status_code == 202  # stored once the broker answered again
    assert metric(metrics, "hookgate_overload_rejections_total", 'reason="in_flight"') >= 1


class WaitForClientToLeave:
    """Holds a webhook in its access check until its client has closed the connection."""

    def __init__(self) -> None:
        self.arrived = trio.Event()

    @hookimpl
    async def hookgate_authenticate(self, request: IngressRequest, source: SourceView) -> None:
        connection: Any = server_mod._current.get()
        self.arrived.set()
        with trio.fail_after(5):
            while not connection.peer_closed:
                await trio.sleep(0.01)


GONE = ("hookgate_overload_rejections_total", 'reason="client_gone"')


async def test_a_webhook_whose_client_left_is_not_stored(
    tmp_path: Path, nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    plugin = WaitForClientToLeave()
    async with run_gateway(tmp_path, config(nats_server.url, ""), plugins=(plugin,)) as gw:
        body = b'{"n": 1}'
        head = "".join(f"{k}: {v}\r\n" for k, v in signed(body, "gone").items())
        stream = await connect(gw.url)
        await stream.send_all(
            f"POST /webhooks/acme HTTP/1.1\r\nHost: x\r\n{head}Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        with trio.fail_after(5):
            await plugin.arrived.wait()
        await stream.aclose()
        with trio.fail_after(5):
            while metric(metrics := (await gw.http.get(f"{gw.url}/metrics")).text, *GONE) < 1:
                await trio.sleep(0.02)
    assert metric(metrics, *GONE) == 1
    assert not any(r.exc_info for r in caplog.records)
    assert await stream_messages(nats_server.url, "HOOKGATE_EVENTS") == []


# --- rejected webhooks in the log ------------------------------------------------------------


async def test_a_flood_of_bad_webhooks_is_a_few_log_lines_whose_counts_add_up(
    tmp_path: Path, nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with run_gateway(tmp_path, config(nats_server.url, "")) as gw:
        for i in range(60):
            bad = {"X-Acme-Signature": "sha256=" + "0" * 64} if i % 3 else {}
            response = await gw.http.post(f"{gw.url}/webhooks/acme", content=b"{}", headers=bad)
            assert response.status_code == 401
        metrics = (await gw.http.get(f"{gw.url}/metrics")).text
    lines = [r.getMessage() for r in caplog.records if r.name == "hookgate.ingress"]
    rejected = [line for line in lines if "rejected" in line]
    # Two reasons: for each, the first at once (with its detail) and one summary at shutdown.
    assert len(rejected) <= 4, rejected
    counts: dict[str, int] = {"invalid_signature": 0, "missing_signature": 0}
    for line in rejected:
        reason = next(r for r in counts if r in line)
        more = re.search(r"(\d+) more", line)
        counts[reason] += int(more.group(1)) if more else 1
    assert counts == {"invalid_signature": 40, "missing_signature": 20}
    assert (
        metric(metrics, "hookgate_ingress_rejections_total", 'reason="invalid_signature",source="acme"') == 40
    )


class HoldRouting:
    """Holds the router in its routing hook until released, so stored events wait to be routed."""

    def __init__(self) -> None:
        self.holding = trio.Event()
        self.release = trio.Event()

    @hookimpl
    async def hookgate_route(self, event: Any, endpoints: list[str]) -> None:
        self.holding.set()
        await self.release.wait()


async def test_past_max_unrouted_a_webhook_gets_503_until_the_router_catches_up(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    plugin = HoldRouting()
    async with run_gateway(tmp_path, config(nats_server.url, "max_unrouted: 2"), plugins=(plugin,)) as gw:
        url = f"{gw.url}/webhooks/acme"
        try:
            statuses = []
            for i in range(3):  # the router holds the first; two more wait behind it
                body = f'{{"n": {i}}}'.encode()
                response = await gw.http.post(url, content=body, headers=signed(body, f"u{i}"))
                statuses.append(response.status_code)
            with trio.fail_after(5):
                await plugin.holding.wait()
                while True:  # the router's backlog is read once a second
                    body = b'{"n": "late"}'
                    refused = await gw.http.post(url, content=body, headers=signed(body, "late"))
                    if refused.status_code == 503:
                        break
                    await trio.sleep(0.1)
        finally:
            plugin.release.set()
        with trio.fail_after(5):  # routed again: admitted again
            while True:
                body = b'{"n": "again"}'
                again = await gw.http.post(url, content=body, headers=signed(body, "again"))
                if again.status_code == 202:
                    break
                await trio.sleep(0.1)
    assert statuses == [202, 202, 202]
    assert refused.json()["error"] == "overloaded" and refused.headers["retry-after"] == "1"
    assert "routed" in refused.json()["message"]


async def test_connections_the_clients_closed_do_not_stay_open_until_the_keep_alive_timeout(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    # hypercorn keeps a connection whose client closed right after its answer open until its
    # keep-alive timeout (75 s), in CLOSE-WAIT; clients like curl do exactly that.
    port = free_port()
    text = config(nats_server.url, "workers: 1").replace("listen: 127.0.0.1:0", f"listen: 127.0.0.1:{port}")
    process = GatewayProcess(write_config(tmp_path, text), port, tmp_path / "gateway.log")
    await process.start()
    try:
        for _ in range(10):
            answer = await _get_and_close(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", half_close=False)
            assert answer.startswith(b"HTTP/1.1 200 ")
        # A client that half-closes after its request still gets the answer.
        answer = await _get_and_close(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", half_close=True)
        assert answer.startswith(b"HTTP/1.1 200 ")
        async with httpx.AsyncClient(timeout=5) as client:
            with trio.fail_after(3):
                while True:  # the poll's own connection is the one left open
                    metrics = (await client.get(f"{process.url}/metrics")).text
                    if "hookgate_http_connections_open 1.0" in metrics:
                        break
                    await trio.sleep(0.05)
    finally:
        process.kill(signal.SIGTERM)
        await process.wait()


async def _get_and_close(port: int, request: bytes, *, half_close: bool) -> bytes:
    """Send a request, read its whole answer (Content-Length), and close at once."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        await stream.send_all(request)
        if half_close:
            await stream.send_eof()
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(4096)
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
        while len(body) < length:
            body += await stream.receive_some(4096)
        return data
    finally:
        await stream.aclose()
