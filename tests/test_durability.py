"""kill -9: every webhook answered 2xx is delivered after a restart, and no nats-server is orphaned."""

from __future__ import annotations

import hashlib
import hmac
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest
import trio

from tests.support import Receiver, hookgate_command, receiver

SECRET = "durable"
EVENTS = 1000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_config(tmp_path: Path, port: int, receiver_url: str) -> Path:
    path = tmp_path / "hookgate.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            server:
              listen: 127.0.0.1:{port}
              shutdown_grace: 2s
              workers: 1  # one process, killed and restarted as one (the supervisor: test_workers)
            broker:
              data_dir: {tmp_path / "data"}
            egress:
              allow_networks: [127.0.0.0/8]
            sources:
              prov:
                verify: {{type: hmac, header: X-Sig, secret: {SECRET}}}
                event_id: header.X-Delivery
            endpoints:
              svc: {{url: "{receiver_url}/in", concurrency: 20, retry: {{schedule: [200ms, 1s, 2s]}}}}
            routes:
              - {{from: [prov], to: [svc]}}
            """
        )
    )
    return path


class GatewayProcess:
    def __init__(self, config: Path, port: int, log: Path):
        self.config = config
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                hookgate_command("run", "-c", str(self.config)), stdout=out, stderr=subprocess.STDOUT
            )
        async with httpx.AsyncClient() as client:
            with trio.fail_after(20):
                while True:
                    assert self.process.poll() is None, self.log.read_text()
                    try:
                        if (await client.get(f"{self.url}/readyz")).status_code == 200:
                            return
                    except httpx.TransportError:
                        pass
                    await trio.sleep(0.1)

    def kill(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    async def wait(self, timeout: float = 20) -> int:
        assert self.process is not None
        process = self.process
        with trio.fail_after(timeout):
            return await trio.to_thread.run_sync(process.wait)

    def ensure_stopped(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def _nats_pid(tmp_path: Path) -> int:
    return int((tmp_path / "data" / "nats-server.pid").read_text())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is gone for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


async def _wait_gone(pid: int, timeout: float = 10) -> None:
    with trio.fail_after(timeout):
        while _alive(pid):
            await trio.sleep(0.05)


def _signed(n: int) -> tuple[bytes, dict[str, str]]:
    body = f'{{"n": {n}}}'.encode()
    return body, {
        "X-Sig": hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest(),
        "X-Delivery": f"d-{n}",
    }


async def _ingest(url: str, accepted: set[str], killed: trio.Event, kill_after: int, on_kill: object) -> None:
    """Send EVENTS webhooks 16 at a time; kill the gateway once `kill_after` were accepted."""
    send, receive = trio.open_memory_channel[int](EVENTS)
    for n in range(EVENTS):
        send.send_nowait(n)
    send.close()

    async def worker(client: httpx.AsyncClient) -> None:
        async for n in receive:
            body, headers = _signed(n)
            try:
                response = await client.post(f"{url}/webhooks/prov", content=body, headers=headers)
            except httpx.TransportError:
                continue  # the gateway is gone: the provider would retry later
            if response.status_code == 202:
                accepted.add(f"d-{n}")
                if len(accepted) >= kill_after and not killed.is_set():
                    on_kill()  # type: ignore[operator]
                    killed.set()

    async with httpx.AsyncClient(timeout=5) as client, trio.open_nursery() as nursery:
        for _ in range(16):
            nursery.start_soon(worker, client)


@pytest.mark.slow
async def test_kill_9_during_ingestion_loses_no_accepted_event(tmp_path: Path) -> None:
    port = _free_port()
    async with receiver() as rx:
        gw = GatewayProcess(_write_config(tmp_path, port, rx.url), port, tmp_path / "gateway.log")
        try:
            await gw.start()
            first_nats = _nats_pid(tmp_path)
            accepted: set[str] = set()
            killed = trio.Event()
            await _ingest(gw.url, accepted, killed, 300, lambda: gw.kill(signal.SIGKILL))
            assert killed.is_set()
            await gw.wait()
            # The embedded server got SIGTERM from the kernel when its parent died.
            await _wait_gone(first_nats)

            await gw.start()
            assert _nats_pid(tmp_path) != first_nats
            await _wait_delivered(rx, accepted)
            gw.kill(signal.SIGTERM)
            assert await gw.wait() == 0
            await _wait_gone(_nats_pid(tmp_path))
        finally:
            gw.ensure_stopped()
    assert len(accepted) >= 300


async def _wait_delivered(rx: Receiver, accepted: set[str], timeout: float = 60) -> None:
    with trio.fail_after(timeout):
        while not accepted <= {r.headers.get("x-delivery") for r in rx.requests}:
            await rx.wait_for(len(rx.requests) + 1, timeout=timeout)


async def test_kill_9_of_the_gateway_leaves_no_orphan_and_restarts_cleanly(tmp_path: Path) -> None:
    port = _free_port()
    async with receiver() as rx:
        gw = GatewayProcess(_write_config(tmp_path, port, rx.url), port, tmp_path / "gateway.log")
        try:
            await gw.start()
            nats_pid = _nats_pid(tmp_path)
            gw.kill(signal.SIGKILL)
            await gw.wait()
            await _wait_gone(nats_pid)
            await gw.start()
            async with httpx.AsyncClient() as client:
                body, headers = _signed(1)
                response = await client.post(f"{gw.url}/webhooks/prov", content=body, headers=headers)
            assert response.status_code == 202
            await rx.wait_for(1)
        finally:
            gw.ensure_stopped()


async def test_a_leftover_server_from_an_earlier_crash_is_stopped_before_start(tmp_path: Path) -> None:
    port = _free_port()
    async with receiver() as rx:
        gw = GatewayProcess(_write_config(tmp_path, port, rx.url), port, tmp_path / "gateway.log")
        try:
            await gw.start()
            gw.kill(signal.SIGTERM)
            assert await gw.wait() == 0
            # Simulate a server that outlived its gateway (e.g. PDEATHSIG unavailable): start one
            # on the same data directory and config, as the gateway would have.
            from hookgate.broker.embedded import find_server_binary

            data = tmp_path / "data"
            stale = subprocess.Popen(
                [find_server_binary(), "-c", str(data / "nats-server.conf")],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                with trio.fail_after(10):
                    while not (data / "nats-server.pid").exists() or _nats_pid(tmp_path) != stale.pid:
                        await trio.sleep(0.05)
                await gw.start()
                await trio.to_thread.run_sync(stale.wait)
                assert _nats_pid(tmp_path) != stale.pid
            finally:
                if stale.poll() is None:
                    stale.kill()
                    stale.wait()
        finally:
            gw.ensure_stopped()


def test_missing_nats_server_binary_fails_with_a_clear_message(tmp_path: Path) -> None:
    config = _write_config(tmp_path, _free_port(), "http://127.0.0.1:9")
    result = subprocess.run(
        hookgate_command("run", "-c", str(config)),
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "HOOKGATE_NATS_SERVER": str(tmp_path / "no-such-nats-server")},
    )
    assert result.returncode == 1
    assert "cannot start" in result.stderr
    assert "Traceback" not in result.stderr


CANCEL_FROM_OUTSIDE = """
import sys, trio
from hookgate import config, gateway
from hookgate.plugin_host.hooks import Hooks

async def main():
    hooks = Hooks()
    loaded = config.load(sys.argv[1], hooks.registry)
    async with trio.open_nursery() as nursery:
        run = lambda task_status: gateway.run(loaded, hooks, stopping=trio.Event(), task_status=task_status)
        await nursery.start(run)
        nursery.cancel_scope.cancel()  # as a crash of a sibling task would, without `stopping`

trio.run(main)
"""


async def test_a_gateway_cancelled_from_outside_stops(tmp_path: Path) -> None:
    # Code that embeds the gateway may cancel it, and so does an error in any of its tasks. Every
    # endpoint worker must then end for good: one that restarted itself as it was cancelled kept
    # the process alive, spawning workers without end.
    async with receiver() as rx:
        config = _write_config(tmp_path, _free_port(), rx.url)
        # A timeout kills it (and the kernel its nats-server) and fails the test.
        result = await trio.to_thread.run_sync(
            lambda: subprocess.run(
                [sys.executable, "-c", CANCEL_FROM_OUTSIDE, str(config)], capture_output=True, timeout=30
            )
        )
    assert result.returncode == 0, result.stderr.decode()
