"""Webhook ingress: verification, storage before 2xx, forwarding of the original bytes, limits."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from tests.support import NatsServer, base_config, receiver, run_gateway, stream_messages

SECRET = "acme-secret"


def acme_config(nats_url: str, receiver_url: str, extra_source: str = "") -> str:
    return base_config(
        nats_url,
        f"""
        sources:
          acme:
            verify: {{type: hmac, header: X-Acme-Signature, prefix: "sha256=", secret: {SECRET}}}
            event_type: header.X-Acme-Event
            event_id: header.X-Acme-Delivery
        {extra_source}
        endpoints:
          internal:
            url: {receiver_url}/hooks
            retry: {{schedule: [100ms, 100ms]}}
        routes:
          - from: [acme]
            to: [internal]
        """,
    )


def signed(body: bytes, delivery: str, event: str = "thing.created", secret: str = SECRET) -> dict[str, str]:
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {
        "X-Acme-Signature": f"sha256={digest}",
        "X-Acme-Event": event,
        "X-Acme-Delivery": delivery,
        "Content-Type": "application/vnd.acme+json",
    }


async def test_signed_webhook_is_accepted_and_forwarded_with_original_bytes(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    body = b'{"b": 2,  "a": [1, 2, 3], "unicode": "\\u00e9"}\n'
    async with receiver() as rx, run_gateway(tmp_path, acme_config(nats_server.url, rx.url)) as gw:
        response = await gw.http.post(f"{gw.url}/webhooks/acme", content=body, headers=signed(body, "d-1"))
        assert response.status_code == 202
        event_id = response.json()["id"]
        (got,) = await rx.wait_for(1)
    assert got.body == body
    assert got.path == "/hooks"
    assert got.headers["content-type"] == "application/vnd.acme+json"
    assert got.headers["x-acme-event"] == "thing.created"
    assert got.headers["x-acme-signature"] == signed(body, "d-1")["X-Acme-Signature"]
    assert got.headers["hookgate-source"] == "acme"
    assert got.headers["hookgate-event-id"] == event_id
    assert got.headers["webhook-id"] == event_id
    assert got.headers["hookgate-attempt"] == "1"
    assert got.headers["hookgate-delivery-id"].startswith("dlv_")


async def test_wrongly_signed_webhook_gets_401_and_is_neither_stored_nor_delivered(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    body = b'{"a": 1}'
    async with receiver() as rx, run_gateway(tmp_path, acme_config(nats_server.url, rx.url)) as gw:
        bad = await gw.http.post(
            f"{gw.url}/webhooks/acme", content=body, headers=signed(body, "d-1", secret="wrong")
        )
        missing = await gw.http.post(f"{gw.url}/webhooks/acme", content=body)
        # A correctly signed webhook afterwards proves the pipeline was running all along.
        good = await gw.http.post(f"{gw.url}/webhooks/acme", content=b"{}", headers=signed(b"{}", "d-2"))
        await rx.wait_for(1)
    assert bad.status_code == 401
    assert bad.json()["error"] == "invalid_signature"
    assert missing.status_code == 401
    assert missing.json()["error"] == "missing_signature"
    assert good.status_code == 202
    assert [r.body for r in rx.requests] == [b"{}"]
    stored = await stream_messages(nats_server.url, "HOOKGATE_EVENTS")
    assert len(stored) == 1


async def test_unknown_source_is_404_and_oversized_body_is_413(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    text = acme_config(nats_server.url, "http://127.0.0.1:9").replace(
        "publish_timeout: 2s", "publish_timeout: 2s\n  max_body: 1KiB"
    )
    async with run_gateway(tmp_path, text) as gw:
        unknown = await gw.http.post(f"{gw.url}/webhooks/nope", content=b"{}")
        big = b"x" * 2048
        too_large = await gw.http.post(f"{gw.url}/webhooks/acme", content=big, headers=signed(big, "d"))
        health = await gw.http.get(f"{gw.url}/healthz")
        ready = await gw.http.get(f"{gw.url}/readyz")
    assert unknown.status_code == 404
    assert too_large.status_code == 413
    assert too_large.json()["error"] == "body_too_large"
    assert health.status_code == 200
    assert ready.status_code == 200
