"""JetStream that does not answer for a while (issue 12). At startup the gateway waits for it
(retried with backoff, not a crash); the delivery log through the API while its nats-server is
paused (SIGSTOP) or gone is retried within a bounded time, then answered 503 with Retry-After,
never 500."""

from __future__ import annotations

import contextlib
import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path

import trio

from hookgate.broker import transient
from hookgate.broker.embedded import find_server_binary
from tests.support import NatsServer, base_config, free_port, receiver, run_gateway

AUTH = {"Authorization": "Bearer test-token"}
FILTERED = "/api/v1/deliveries?endpoint=ok&status=retrying"


def _config(nats_url: str, ok: str) -> str:
    return base_config(
        nats_url,
        f"""
        endpoints:
          ok: {{url: "{ok}/in"}}
        routes:
          - {{from: [internal], to: [ok]}}
        """,
    )


async def test_a_paused_server_gets_a_503_with_retry_after_and_a_resumed_one_a_200(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    async with receiver() as rx, run_gateway(tmp_path, _config(nats_server.url, rx.url)) as gw:
        assert nats_server.process is not None
        pid = nats_server.process.pid
        await nats_server.freeze()
        try:
            with trio.fail_after(transient.READ_BUDGET + 5):
                paused = await gw.http.get(f"{gw.url}{FILTERED}", headers=AUTH, timeout=30)
        finally:
            nats_server.thaw()
        assert nats_server.process.pid == pid
        resumed = await gw.http.get(f"{gw.url}{FILTERED}", headers=AUTH, timeout=30)
    assert paused.status_code == 503, paused.text
    assert paused.json()["error"] == "broker_unavailable"
    assert paused.headers["retry-after"] == "2"
    assert resumed.status_code == 200, resumed.text
    assert resumed.json()["data"] == []


async def test_a_stopped_server_gets_a_503_not_a_500(tmp_path: Path, nats_server: NatsServer) -> None:
    async with receiver() as rx, run_gateway(tmp_path, _config(nats_server.url, rx.url)) as gw:
        nats_server.stop()
        with trio.fail_after(transient.READ_BUDGET + 5):
            response = await gw.http.get(f"{gw.url}{FILTERED}", headers=AUTH, timeout=30)
        # A graceful stop of the gateway with its broker gone: restart the server for it.
        nats_server.start()
    assert response.status_code == 503, response.text
    assert response.json()["error"] == "broker_unavailable"
    assert response.headers["retry-after"] == "2"


class _Seen(logging.Handler):
    """Sets `event` when a record of the gateway's logger contains `text`."""

    def __init__(self, text: str, event: trio.Event):
        super().__init__()
        self.text, self.event = text, event

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == "hookgate" and self.text in record.getMessage():
            self.event.set()


@contextlib.contextmanager
def _logged(text: str, event: trio.Event) -> Iterator[None]:
    handler = _Seen(text, event)
    logging.getLogger("hookgate").addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger("hookgate").removeHandler(handler)


async def test_a_gateway_waits_for_jetstream_to_answer_and_then_starts(tmp_path: Path) -> None:
    # A nats-server whose JetStream does not answer yet (here: a plain one, then one with
    # JetStream on the same port): the gateway retries with its backoff instead of stopping.
    port = free_port()
    plain = subprocess.Popen(
        [find_server_binary(), "-a", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    jetstream = NatsServer(tmp_path / "nats")
    jetstream.port = port
    retried = trio.Event()
    ready: list[int] = []

    async def gateway() -> None:
        async with run_gateway(tmp_path, _config(jetstream.url, "http://127.0.0.1:9")) as gw:
            ready.append((await gw.http.get(f"{gw.url}/readyz")).status_code)

    try:
        with _logged("JetStream is not available yet", retried), trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(gateway)
                await retried.wait()
                plain.terminate()
                plain.wait(10)
                jetstream.start()
    finally:
        if plain.poll() is None:
            plain.terminate()
            plain.wait(10)
        jetstream.stop()
    assert ready == [200]
