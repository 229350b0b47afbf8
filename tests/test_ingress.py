"""Webhook ingress: verification, storage before 2xx, forwarding of the original bytes, limits."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import httpx
import pytest
import trio

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
    # The provider's own User-Agent goes through, and is not joined by a second one.
    assert [v for k, v in got.header_lines if k == "user-agent"] == [f"python-httpx/{httpx.__version__}"]


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


async def _raw_request(url: str, request: bytes) -> bytes:
    """Send bytes as they are (httpx would refuse to send malformed requests) and read the answer."""
    host, port = url.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(request)
        response = b""
        with trio.fail_after(5):
            while b"\r\n\r\n" not in response:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                response += chunk
    return response


async def test_bad_input_gets_4xx_never_500_and_is_not_stored(
    tmp_path: Path, nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    text = acme_config(nats_server.url, "http://127.0.0.1:9").replace(
        "event_id: header.X-Acme-Delivery", "event_id: body.id"
    )
    not_utf8 = b"\xff\xfe\x00garbage"
    async with run_gateway(tmp_path, text) as gw:
        statuses = {}
        statuses["non-utf8 unsigned"] = (
            await gw.http.post(f"{gw.url}/webhooks/acme", content=not_utf8)
        ).status_code
        # Correctly signed but not JSON where the source reads body.id: 400, not stored.
        signed_garbage = await gw.http.post(
            f"{gw.url}/webhooks/acme", content=not_utf8, headers=signed(not_utf8, "x")
        )
        statuses["signed non-JSON"] = signed_garbage.status_code
        # JSON nested deeper than the decoder goes is malformed too: 400, never a 500.
        deep = b"[" * 100_000 + b"]" * 100_000
        signed_deep = await gw.http.post(f"{gw.url}/webhooks/acme", content=deep, headers=signed(deep, "y"))
        statuses["signed non-JSON"] = max(statuses["signed non-JSON"], signed_deep.status_code)
        for name, value in {
            "empty": "",
            "no prefix": "deadbeef",
            "not hex": "sha256=zz",
            "huge": "sha256=" + "a" * 8000,
            "latin-1": "sha256=\xe9\xe9",
        }.items():
            response = await gw.http.post(
                f"{gw.url}/webhooks/acme",
                content=b"{}",
                headers={"X-Acme-Signature": value.encode("latin-1")},  # type: ignore[arg-type]
            )
            statuses[name] = response.status_code
            assert response.json()["error"] in ("missing_signature", "invalid_signature")
        huge_headers = await _raw_request(
            gw.url,
            b"POST /webhooks/acme HTTP/1.1\r\nHost: x\r\nX-Big: "
            + b"b" * 200_000
            + b"\r\nContent-Length: 2\r\n\r\n{}",
        )
        garbage_request = await _raw_request(gw.url, b"\x00\x01\x02 nonsense\r\n\r\n")
    assert statuses["non-utf8 unsigned"] == 401
    assert statuses["signed non-JSON"] == 400
    assert signed_garbage.json()["error"] == "malformed_body"
    assert signed_deep.status_code == 400 and signed_deep.json()["error"] == "malformed_body"
    assert all(
        status == 401
        for name, status in statuses.items()
        if name not in ("signed non-JSON", "non-utf8 unsigned")
    )
    for raw in (huge_headers, garbage_request):
        if raw:  # the server may also just close the connection, which is fine
            status = int(raw.split(b" ", 2)[1])
            assert 400 <= status < 500, raw[:200]
    assert await stream_messages(nats_server.url, "HOOKGATE_EVENTS") == []
    rejections = [r for r in caplog.records if "rejected webhook" in r.getMessage()]
    assert rejections and all("acme" in r.getMessage() for r in rejections)
    assert not any(SECRET in r.getMessage() for r in caplog.records)


# --- selectors (event_type, event_id) ------------------------------------------------------------


def _selected(spec: str, body: bytes, content_type: str = "application/json") -> str | None:
    from hookgate.ingress.handler import MalformedBody, _Body, select
    from hookgate.types import IngressRequest

    request = IngressRequest(
        source="s",
        method="POST",
        url="http://127.0.0.1/webhooks/s",
        path="/webhooks/s",
        query_string=b"",
        headers=[("content-type", content_type), ("x-kind", "from-header")],
        body=body,
    )
    try:
        return select(spec, request, _Body(body, content_type))
    except MalformedBody as exc:
        return f"malformed: {exc}"


def test_selectors_read_json_form_fields_and_json_inside_a_field() -> None:
    assert _selected("body.data.items.1.id", b'{"data": {"items": [{"id": 1}, {"id": 2}]}}') == "2"
    assert _selected("body.data.items.5.id", b'{"data": {"items": []}}') is None
    assert _selected("body.data", b'{"data": {"a": 1}}') is None  # not a single value
    assert _selected("header.X-Kind", b"{}") == "from-header"
    assert _selected("order.created", b"{}") == "order.created"  # a literal
    form = "application/x-www-form-urlencoded"
    payload = b"payload=%7B%22type%22%3A%22block_actions%22%7D&command=%2Fdeploy"
    assert _selected("body.payload.type", payload, form) == "block_actions"
    assert _selected("body.command", payload, form) == "/deploy"
    assert _selected("body.payload.type", b"payload=%7Bnot-json", form) is None


def test_a_body_selector_on_an_unreadable_body_is_malformed() -> None:
    assert _selected("body.id", b"\xff\xfe") == "malformed: the body is not JSON (or is nested too deeply)"
    assert _selected("body.id", b"[" * 100_000 + b"]" * 100_000) == (
        "malformed: the body is not JSON (or is nested too deeply)"
    )
    form = "application/x-www-form-urlencoded"
    assert _selected("body.a", b"a=\xff", form) == "malformed: the form body is not valid UTF-8"
