"""The gateway process as a whole: graceful shutdown, external NATS options, idempotent topology."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import trio

from hookgate.embedded import find_server_binary
from tests.support import NatsServer, Received, base_config, receiver, run_gateway, stream_messages


async def test_shutdown_lets_in_flight_deliveries_finish(tmp_path: Path, nats_server: NatsServer) -> None:
    started = trio.Event()

    def respond(request: Received, n: int) -> float:
        started.set()
        return 0.8  # answer 200 after 0.8s, inside the 2s grace period

    async with receiver(respond) as rx:
        text = base_config(
            nats_server.url,
            f"""
            endpoints:
              svc: {{url: "{rx.url}/in"}}
            routes:
              - {{from: [internal], to: [svc]}}
            """,
        )
        async with run_gateway(tmp_path, text) as gw:
            await gw.publish("slow", {})
            await started.wait()
            gw.stopping.set()
        # The gateway has stopped; the delivery it had in flight completed and was acked, so a
        # new gateway on the same broker does not deliver it again.
        async with run_gateway(tmp_path, text) as gw:
            await gw.publish("after-restart", {})
            await rx.wait_for(2)
    assert [r.json()["type"] for r in rx.requests] == ["slow", "after-restart"]
    attempts = await stream_messages(nats_server.url, "HOOKGATE_LOG", "hookgate.log.attempts.>")
    assert len(attempts) == 2


async def test_topology_is_created_once_and_updated_when_the_config_changes(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    def text(concurrency: int) -> str:
        return base_config(
            nats_server.url,
            f"""
            endpoints:
              svc: {{url: "http://127.0.0.1:9/in", concurrency: {concurrency}}}
            """,
        )

    async with run_gateway(tmp_path, text(1)):
        pass
    async with run_gateway(tmp_path, text(40)) as gw:
        info = await gw.running.broker.bridge.run(_consumer_max_ack_pending(gw.running.broker))
    assert info == 160


def _consumer_max_ack_pending(broker):  # type: ignore[no-untyped-def]
    async def go() -> int:
        consumer = await broker.bridge.js._jsm.consumer_info("HOOKGATE_DELIVERIES", "endpoint-svc")
        return consumer.config.max_ack_pending

    return go


@pytest.fixture
def token_nats(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A nats-server that requires a user and password."""
    conf = tmp_path / "auth.conf"
    conf.write_text(
        'listen: "127.0.0.1:-1"\n'
        f'jetstream {{ store_dir: "{tmp_path / "authjs"}" }}\n'
        'authorization { user: hg, password: "s3cret pass" }\n'
        f'ports_file_dir: "{tmp_path}"\n'
    )
    process = subprocess.Popen([find_server_binary(), "-c", str(conf)], stderr=subprocess.DEVNULL)
    ports = tmp_path / f"nats-server_{process.pid}.ports"
    import json
    import time

    deadline = time.monotonic() + 10
    while not (ports.exists() and ports.read_text().strip()):
        assert time.monotonic() < deadline, "nats-server did not start"
        time.sleep(0.02)
    url = json.loads(ports.read_text())["nats"][0]
    yield url
    process.terminate()
    process.wait(10)


async def test_external_nats_with_credentials_and_a_list_of_servers(tmp_path: Path, token_nats: str) -> None:
    port = token_nats.rsplit(":", 1)[1]
    async with receiver() as rx:
        text = base_config(
            None,
            f"""
            endpoints:
              svc: {{url: "{rx.url}/in"}}
            routes:
              - {{from: [internal], to: [svc]}}
            """,
            data_dir=tmp_path / "unused",
        ).replace(
            f"data_dir: {tmp_path / 'unused'}",
            # The first server is down: the client moves on to the next one.
            f'url: ["nats://127.0.0.1:1", "nats://127.0.0.1:{port}"]\n  user: hg\n  password: "s3cret pass"',
        )
        async with run_gateway(tmp_path, text) as gw:
            response = await gw.publish("auth.ok", {})
            await rx.wait_for(1)
    assert response.status_code == 202
