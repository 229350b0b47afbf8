"""`hookgate run --workers N`: a supervisor, its worker processes, one port and one nats-server.

Every test runs the real command as a subprocess on loopback, with its embedded nats-server, and
looks at the processes through /proc.
"""

from __future__ import annotations

import os
import re
import signal
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio

from tests.credentials import make_pki
from tests.support import NatsServer, free_port, hookgate_command, receiver

TOKEN = "workers-token"
START_TIMEOUT = 40


def _config(tmp_path: Path, port: int, receiver_url: str, server: str = "") -> Path:
    """A gateway with one endpoint that every internal event goes to; `server` adds keys (one a
    line) under `server:`."""
    extra = "".join(f"\n  {line.strip()}" for line in server.strip().splitlines())
    path = tmp_path / "hookgate.yaml"
    path.write_text(
        f"""\
server:
  listen: 127.0.0.1:{port}
  api_tokens: [{TOKEN}]
  shutdown_grace: 10s{extra}
broker:
  data_dir: {tmp_path / "data"}
egress:
  allow_networks: [127.0.0.0/8]
endpoints:
  svc: {{url: "{receiver_url}/in", concurrency: 10, retry: {{schedule: [1s]}}}}
routes:
  - {{from: [internal], to: [svc]}}
"""
    )
    return path


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited: only its parent has not collected it yet.
    with suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    return False


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(int(target[len("socket:[") : -1]))
    return inodes


def _tcp_sockets(port: int) -> dict[int, str]:
    """Local-port `port` TCP sockets on loopback: inode -> state (0A listening, 01 established)."""
    out = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port:
                    out[int(fields[9])] = fields[3]
    return out


@dataclass
class Supervised:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def workers(self) -> list[int]:
        return [p for p in _children(self.process.pid) if "hookgate.cli run" in _cmdline(p)]

    def nats_server(self) -> int:
        (pid,) = [p for p in _children(self.process.pid) if "nats-server" in _cmdline(p)]
        return pid

    def worker_roles(self) -> dict[int, str]:
        return {p: _cmdline(p).split("--role ", 1)[1].split()[0] for p in self.workers()}

    async def wait_for(self, what: str, check: Callable[[], bool], timeout: float = START_TIMEOUT) -> None:
        """Poll until `check()` holds; fail with the log if it does not within `timeout`."""
        with trio.move_on_after(timeout):
            while not check():
                assert self.process.poll() is None, self.log.read_text()
                await trio.sleep(0.05)
            return
        pytest.fail(f"{what} within {timeout}s; log:\n{self.log.read_text()}")

    async def wait_exit(self, timeout: float) -> int:
        with trio.fail_after(timeout):
            while self.process.poll() is None:
                await trio.sleep(0.05)
        return self.process.returncode


@asynccontextmanager
async def supervised(
    config: Path, port: int, *args: str, workers: int = 2, verify: ssl.SSLContext | None = None
) -> AsyncIterator[Supervised]:
    """`hookgate run` on `config`, ready; `verify`: it serves HTTPS, with a certificate this trusts."""
    log = config.parent / "gateway.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            hookgate_command("run", "-c", str(config), *args), stdout=out, stderr=subprocess.STDOUT
        )
    sup = Supervised(process, f"{'https' if verify else 'http'}://127.0.0.1:{port}", log)
    try:
        await sup.wait_for(
            "every worker started", lambda: "hookgate listening on" in log.read_text() or workers == 1
        )
        async with httpx.AsyncClient(timeout=10, verify=verify or True) as http:

            async def ready() -> bool:
                try:
                    return (await http.get(f"{sup.url}/readyz")).status_code == 200
                except httpx.TransportError:
                    return False

            with trio.fail_after(START_TIMEOUT):
                while not await ready():
                    assert process.poll() is None, log.read_text()
                    await trio.sleep(0.05)
        yield sup
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                await sup.wait_exit(30)
            except trio.TooSlowError:
                for pid in _children(process.pid):
                    with suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                process.kill()
                process.wait()


async def _publish(http: httpx.AsyncClient, url: str, count: int, prefix: str) -> None:
    for i in range(count):
        response = await http.post(
            f"{url}/api/v1/events",
            json={"type": "order.created", "data": {"n": i}, "id": f"{prefix}-{i}"},
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        assert response.status_code == 202, response.text


def _metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus exposition, whatever order its labels come in."""
    for line in text.splitlines():
        match = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
        if match is None or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if found == labels:
            return float(match.group(3))
    return 0.0


async def test_a_killed_worker_is_restarted_and_the_gateway_keeps_answering(tmp_path: Path) -> None:
    port = free_port()
    async with (
        receiver() as rx,
        supervised(_config(tmp_path, port, rx.url, "workers: 2"), port) as sup,
        httpx.AsyncClient(timeout=10) as http,
        # A new connection for every request: each goes to whichever worker accepts it.
        httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_keepalive_connections=0)) as fresh,
    ):
        before = sup.workers()
        assert len(before) == 2

        async def succeeded(count: int) -> None:
            """Wait until /metrics counts `count` deliveries succeeded: an attempt is counted once
            it is recorded, a moment after the receiver saw it."""
            with trio.fail_after(10):
                while True:
                    text = (await fresh.get(f"{sup.url}/metrics")).text
                    if (
                        _metric(text, "hookgate_deliveries_total", endpoint="svc", outcome="succeeded")
                        >= count
                    ):
                        return
                    await trio.sleep(0.05)

        await _publish(http, sup.url, 6, "a")
        await rx.wait_for(6)
        await succeeded(6)  # settled: no delivery is in flight when a worker is killed

        victim = before[0]
        os.kill(victim, signal.SIGKILL)
        answered = 0
        with trio.fail_after(START_TIMEOUT):
            while victim in sup.workers() or len(sup.workers()) < 2:
                assert (await fresh.get(f"{sup.url}/healthz")).status_code == 200
                answered += 1
        assert answered > 0
        await sup.wait_for(
            "the new worker started", lambda: sup.log.read_text().count("listening on http") == 3
        )
        assert re.search(
            rf"worker \d \(all, pid {victim}\) exited: killed by SIGKILL; restarting in", sup.log.read_text()
        )

        # Both workers, the new one too, serve and deliver.
        await _publish(http, sup.url, 4, "b")
        await rx.wait_for(10)

        await succeeded(10)
        # /metrics is the whole gateway's whichever worker answers, and the dead worker's counts stay.
        for _ in range(6):
            text = (await fresh.get(f"{sup.url}/metrics")).text
            assert _metric(text, "hookgate_events_stored_total", source="internal") == 10
            assert _metric(text, "hookgate_deliveries_total", endpoint="svc", outcome="succeeded") == 10
            # Gauges of what each process holds are summed over the live workers: one sample, no pid.
            assert re.search(r"^hookgate_events_in_flight 0\.0$", text, re.MULTILINE), text
            assert _metric(text, "hookgate_http_connections_open") >= 1
            assert 'pid="' not in text


async def test_sigterm_drains_every_worker_and_stops_the_nats_server_last(tmp_path: Path) -> None:
    port = free_port()
    held = 8
    # The first deliveries are answered 2 s after they arrive: in flight when SIGTERM comes.
    async with receiver(lambda request, n: 2.0 if n < held else 200) as rx:
        config = _config(tmp_path, port, rx.url, "workers: 2")
        async with supervised(config, port) as sup, httpx.AsyncClient(timeout=10) as http:
            workers, nats_server = sup.workers(), sup.nats_server()
            assert len(workers) == 2
            await _publish(http, sup.url, held, "d")
            await rx.wait_for(held)
            sup.process.send_signal(signal.SIGTERM)
            assert await sup.wait_exit(30) == 0, sup.log.read_text()
            assert not [pid for pid in [*workers, nats_server] if _alive(pid)]
            log = sup.log.read_text()
            assert log.count("exited: exit code 0") == 2, log
            assert "killing" not in log

        # A gateway started again on the same store (one process: no supervisor) finds every
        # delivery that was in flight succeeded, and sends none of them again.
        async with (
            supervised(config, port, "--workers", "1", workers=1) as again,
            httpx.AsyncClient(timeout=10) as http,
        ):
            assert again.workers() == []
            response = await http.get(
                f"{again.url}/api/v1/deliveries",
                params={"endpoint": "svc", "limit": 50},
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
            assert response.status_code == 200, response.text
            statuses = [d["status"] for d in response.json()["data"]]
            assert statuses == ["succeeded"] * held
        assert len(rx.requests) == held


async def test_every_serving_worker_accepts_on_the_one_port_with_tls(tmp_path: Path) -> None:
    port = free_port()
    pki = make_pki(tmp_path / "tls")
    tls = f"tls: {{certfile: {pki.server_cert}, keyfile: {pki.server_key}}}"
    verify = ssl.create_default_context(cafile=str(pki.ca))
    async with (
        receiver() as rx,
        supervised(_config(tmp_path, port, rx.url, f"workers: 2\n{tls}"), port, verify=verify) as sup,
        AsyncExitStack() as clients,
    ):
        workers = sup.workers()
        listening = {inode for inode, state in _tcp_sockets(port).items() if state == "0A"}
        assert len(listening) == 1
        assert all(listening <= _socket_inodes(pid) for pid in workers)
        # Keep-alive HTTPS connections, opened one by one until each worker has accepted one.
        holders: set[int] = set()
        for _ in range(200):
            client = await clients.enter_async_context(httpx.AsyncClient(timeout=10, verify=verify))
            assert (await client.get(f"{sup.url}/healthz")).status_code == 200
            accepted = {inode for inode, state in _tcp_sockets(port).items() if state == "01"}
            holders = {pid for pid in workers if _socket_inodes(pid) & accepted}
            if holders == set(workers):
                break
        assert holders == set(workers)


async def test_one_ingress_and_one_delivery_worker_deliver_end_to_end(tmp_path: Path) -> None:
    port = free_port()
    config = _config(tmp_path, port, "http://127.0.0.1:1", "workers: {ingress: 1, delivery: 1}")
    async with receiver() as rx:
        config.write_text(config.read_text().replace("http://127.0.0.1:1", rx.url))
        async with supervised(config, port) as sup, httpx.AsyncClient(timeout=10) as http:
            roles = {role: pid for pid, role in sup.worker_roles().items()}
            assert sorted(roles) == ["delivery", "ingress"]
            # Only the ingress worker holds the port; the delivery worker serves no HTTP.
            (listening,) = {inode for inode, state in _tcp_sockets(port).items() if state == "0A"}
            assert listening in _socket_inodes(roles["ingress"])
            assert listening not in _socket_inodes(roles["delivery"])

            await _publish(http, sup.url, 5, "s")
            received = await rx.wait_for(5)
            assert sorted(r.json()["data"]["n"] for r in received) == list(range(5))
            # The delivery worker's figures reach /metrics through the ingress worker.
            text = (await http.get(f"{sup.url}/metrics")).text
            assert _metric(text, "hookgate_deliveries_total", endpoint="svc", outcome="succeeded") == 5


async def test_a_worker_that_cannot_start_stops_the_supervisor(tmp_path: Path) -> None:
    """Workers refused by the broker would be refused on every restart: the supervisor exits 1."""
    server = NatsServer(tmp_path / "nats", "authorization { token: right-token }\n")
    server.start()
    try:
        port = free_port()
        config = tmp_path / "hookgate.yaml"
        config.write_text(
            f"server:\n  listen: 127.0.0.1:{port}\n  workers: 2\n"
            f"broker:\n  url: {server.url}\n  token: wrong-token\n"
        )
        log = tmp_path / "gateway.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                hookgate_command("run", "-c", str(config)), stdout=out, stderr=subprocess.STDOUT
            )
        sup = Supervised(process, f"http://127.0.0.1:{port}", log)
        try:
            assert await sup.wait_exit(60) == 1
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        text = log.read_text()
        assert re.search(r"worker \d \(all\) could not start: exit code 1", text), text
        assert "Traceback" not in text
        assert "restarting" not in text
    finally:
        server.stop()
