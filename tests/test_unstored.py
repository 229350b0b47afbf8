"""A 503 that may be stored after all: it names the event's id, a retry with that id makes no
second event, and events stored after their 503 are counted."""

from __future__ import annotations

import hashlib
import hmac
import signal
from pathlib import Path

import httpx
import trio

from tests.support import NatsServer, base_config, receiver, run_gateway, stored_events

SECRET = "unstored-secret"
AUTH = {"Authorization": "Bearer test-token"}


def _config(nats_url: str, receiver_url: str) -> str:
    return base_config(
        nats_url,
        f"""
        sources:
          acme:
            verify: {{type: hmac, header: X-Sig, prefix: "sha256=", secret: {SECRET}}}
            event_id: header.X-Delivery
        endpoints:
          svc: {{url: "{receiver_url}/in"}}
        routes:
          - {{to: [svc]}}
        """,
    ).replace("publish_timeout: 2s", "publish_timeout: 500ms")


def _signed(body: bytes, delivery: str) -> dict[str, str]:
    digest = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    return {"X-Sig": f"sha256={digest}", "X-Delivery": delivery}


def _late(metrics: str, source: str) -> float:
    prefix = f'hookgate_events_stored_late_total{{source="{source}"}} '
    lines = [line for line in metrics.splitlines() if line.startswith(prefix)]
    return float(lines[0].removeprefix(prefix)) if lines else 0.0


async def test_a_503_names_the_id_and_a_retry_with_it_makes_no_second_event(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    async with receiver() as rx, run_gateway(tmp_path, _config(nats_server.url, rx.url)) as gw:
        assert nats_server.process is not None
        body = b'{"n": 1}'
        nats_server.process.send_signal(signal.SIGSTOP)  # the broker stops answering: PubAcks wait
        try:
            webhook = await gw.http.post(
                f"{gw.url}/webhooks/acme", content=body, headers=_signed(body, "d-1")
            )
            published = await gw.http.post(
                f"{gw.url}/api/v1/events",
                json={"type": "order.created", "data": {"n": 2}},
                headers={**AUTH, "Idempotency-Key": "order-2"},
            )
            unnamed = await gw.publish("order.created", {"n": 3})
        finally:
            nats_server.process.send_signal(signal.SIGCONT)
        # The broker had them all along: they are stored once it answers again, and counted.
        with trio.fail_after(10):
            while (
                _late(metrics := (await gw.http.get(f"{gw.url}/metrics")).text, "acme") < 1
                or _late(metrics, "internal") < 2
            ):
                await trio.sleep(0.05)
        # The clients retry with what the 503 told them: nothing is stored twice.
        again = await gw.http.post(f"{gw.url}/webhooks/acme", content=body, headers=_signed(body, "d-1"))
        again_published = await gw.http.post(
            f"{gw.url}/api/v1/events",
            json={"type": "order.created", "data": {"n": 2}},
            headers={**AUTH, "Idempotency-Key": "order-2"},
        )
        again_unnamed = await gw.publish("order.created", {"n": 3}, id=unnamed.json()["id"])
        await rx.wait_for(3)
        with trio.move_on_after(1):  # no fourth delivery
            await rx.wait_for(4)
    for answer in (webhook, published, unnamed):
        assert answer.status_code == 503 and answer.json()["error"] == "broker_unavailable"
        assert "same id" in answer.json()["message"]
    assert published.json()["id"] == "order-2"
    assert [a.status_code for a in (again, again_published, again_unnamed)] == [202, 202, 202]
    assert again.json()["id"] == webhook.json()["id"]
    assert again_unnamed.json()["id"] == unnamed.json()["id"]
    assert len(await stored_events(nats_server.url)) == 3
    assert len(rx.requests) == 3


async def test_an_idempotency_key_is_the_event_id(tmp_path: Path, nats_server: NatsServer) -> None:
    async with receiver() as rx, run_gateway(tmp_path, _config(nats_server.url, rx.url)) as gw:

        async def publish(key: str, body_id: str | None = None) -> httpx.Response:
            body = {"type": "order.created", "data": {}, **({"id": body_id} if body_id else {})}
            return await gw.http.post(
                f"{gw.url}/api/v1/events", json=body, headers={**AUTH, "Idempotency-Key": key}
            )

        first = await publish("k-1")
        second = await publish("k-1")
        same = await publish("k-1", "k-1")
        conflicting = await publish("k-1", "k-2")
        invalid = await publish("not a key!")
        await rx.wait_for(1)
    assert first.status_code == second.status_code == same.status_code == 202
    assert first.json() == second.json() == {"id": "k-1"}
    assert (conflicting.status_code, conflicting.json()["error"]) == (422, "invalid_event")
    assert "Idempotency-Key" in conflicting.json()["message"]
    assert (invalid.status_code, invalid.json()["error"]) == (422, "invalid_event")
    assert len(await stored_events(nats_server.url)) == 1
