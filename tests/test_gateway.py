"""The gateway process as a whole: graceful shutdown, external NATS options, idempotent topology."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import trio

from hookgate.broker.embedded import find_server_binary
from tests.support import (
    NatsServer,
    Received,
    attempt_records,
    base_config,
    receiver,
    run_gateway,
)


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
    attempts = await attempt_records(nats_server.url)
    assert len(attempts) == 2


async def test_topology_is_created_once_and_updated_when_the_config_changes(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    def text(ordered: bool) -> str:
        return base_config(
            nats_server.url,
            f"""
            endpoints:
              svc: {{url: "http://127.0.0.1:9/in", ordered: {str(ordered).lower()}}}
            """,
        )

    async with run_gateway(tmp_path, text(False)) as gw:
        first = await gw.running.broker.bridge.run(_consumers(gw.running.broker))
    async with run_gateway(tmp_path, text(True)) as gw:
        second = await gw.running.broker.bridge.run(_consumers(gw.running.broker))
    shards = {f"shard-{k}": 10_000 for k in range(16)}
    assert first == shards
    # An ordered endpoint has a consumer of its own, with one delivery in flight at a time.
    assert second == {**shards, "ordered-svc": 1}


def _consumers(broker):  # type: ignore[no-untyped-def]
    async def go() -> dict[str, int]:
        infos = await broker.bridge.jsm.consumers_info("HOOKGATE_DELIVERIES")
        return {info.name: info.config.max_ack_pending for info in infos}

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


def _start_nats(tmp_path: Path, conf_body: str) -> tuple[subprocess.Popen[bytes], str]:
    import json
    import time

    conf = tmp_path / "nats.conf"
    conf.write_text(
        f'listen: "127.0.0.1:-1"\njetstream {{ store_dir: "{tmp_path / "js"}" }}\n'
        f'ports_file_dir: "{tmp_path}"\n{conf_body}\n'
    )
    process = subprocess.Popen([find_server_binary(), "-c", str(conf)], stderr=subprocess.DEVNULL)
    ports = tmp_path / f"nats-server_{process.pid}.ports"
    deadline = time.monotonic() + 10
    while not (ports.exists() and ports.read_text().strip()):
        assert process.poll() is None and time.monotonic() < deadline, "nats-server did not start"
        time.sleep(0.02)
    return process, json.loads(ports.read_text())["nats"][0]


def _external_config(tmp_path: Path, receiver_url: str, broker: str) -> str:
    return base_config(
        None,
        f"""
        endpoints:
          svc: {{url: "{receiver_url}/in"}}
        routes:
          - {{from: [internal], to: [svc]}}
        """,
        data_dir=tmp_path / "unused",
    ).replace(f"data_dir: {tmp_path / 'unused'}", broker)


async def test_external_nats_with_a_token(tmp_path: Path) -> None:
    process, url = _start_nats(tmp_path, 'authorization { token: "t0ken-value" }')
    try:
        async with receiver() as rx:
            text = _external_config(tmp_path, rx.url, f'url: {url}\n  token: "t0ken-value"')
            async with run_gateway(tmp_path, text) as gw:
                assert (await gw.publish("token.ok", {})).status_code == 202
                await rx.wait_for(1)
    finally:
        process.terminate()
        process.wait(10)


async def test_external_nats_over_tls(tmp_path: Path) -> None:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hookgate test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "server.pem", tmp_path / "server.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    process, url = _start_nats(tmp_path, f'tls {{ cert_file: "{cert_file}", key_file: "{key_file}" }}')
    port = url.rsplit(":", 1)[1]
    try:
        async with receiver() as rx:
            text = _external_config(
                tmp_path, rx.url, f'url: "tls://127.0.0.1:{port}"\n  tls: {{ca_file: "{cert_file}"}}'
            )
            async with run_gateway(tmp_path, text) as gw:
                assert (await gw.publish("tls.ok", {})).status_code == 202
                await rx.wait_for(1)
    finally:
        process.terminate()
        process.wait(10)


async def test_shutdown_hands_back_cut_off_and_unstarted_deliveries_at_once(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    # The grace period (base_config: 2s) cuts off a hanging attempt. It and the deliveries that
    # were fetched but never started go back to the consumer at once, not when ack_wait (30s)
    # runs out; the cut-off attempt is recorded, and the resend is its next attempt.
    hanging = True

    def respond(request: Received, n: int) -> float | int:
        return 60.0 if hanging else 200

    async with receiver(respond) as rx:
        text = base_config(
            nats_server.url,
            f"""
            endpoints:
              svc: {{url: "{rx.url}/in", concurrency: 1}}
            routes:
              - {{from: [internal], to: [svc]}}
            """,
        )
        async with run_gateway(tmp_path, text) as gw:
            for n in (1, 2, 3):
                await gw.publish("work", {"n": n})
            await rx.wait_for(1)
            stopped_at = trio.current_time()
            gw.stopping.set()
        shutdown = trio.current_time() - stopped_at
        hanging = False
        async with run_gateway(tmp_path, text):
            restarted_at = trio.current_time()
            (resend,) = await rx.wait_for(
                1, timeout=10, predicate=lambda r: r.headers["hookgate-attempt"] == "2"
            )
            waited = resend.at - restarted_at
            got = await rx.wait_for(4, timeout=10)
    assert shutdown < 2 + 1.0, f"shutdown took {shutdown:.1f}s with a 2s grace"
    assert waited < 10, f"the cut-off delivery came {waited:.1f}s after the restart"
    resent = {r.json()["data"]["n"]: r.headers["hookgate-attempt"] for r in got[1:]}
    assert resent == {1: "2", 2: "1", 3: "1"}
    records = [json.loads(m.data) for m in await attempt_records(nats_server.url)]
    (cut_off,) = [r for r in records if r["error_kind"] == "shutdown"]
    assert (cut_off["attempt"], cut_off["outcome"]) == (1, "retrying")
    assert "grace" in cut_off["error"]
