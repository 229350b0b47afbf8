"""The `shopify` verifier: independent signatures, published HMAC-SHA256 vectors, refusals, the gateway.

There is no Shopify SDK for Python here. Expected signatures are computed independently with Python's
`hmac` and `base64`, and cross-checked against two published HMAC-SHA256 values re-encoded in
base64 (Shopify's encoding): RFC 4231 test case 2, and GitHub's documented webhook example (the
same HMAC-SHA256 of the body; GitHub sends it in hex, Shopify in base64).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import pytest

from hookgate.broker.ids import event_id_for
from hookgate.plugin_host.hooks import Hooks
from hookgate.types import IngressRequest, Rejection
from tests.plugin_support import (
    assert_http_error,
    assert_problem,
    assert_rejection,
    ingress_request,
    load_error,
    load_verifier,
    nested,
)
from tests.support import NatsServer, base_config, receiver, run_gateway, stored_events

SECRET = "shpss_0123456789abcdef"
BODY = (
    b'{"id": 820982911946154508, "email": "jon@example.com", "note": "caf\xc3\xa9", "total_price": "12.00"}'
)
HEADER = "X-Shopify-Hmac-Sha256"

# RFC 4231, 4.3 (test case 2): HMAC-SHA-256 of "what do ya want for nothing?" under the key "Jefe".
RFC4231_KEY = "Jefe"
RFC4231_DATA = b"what do ya want for nothing?"
RFC4231_HEX = "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
RFC4231_BASE64 = "W9zBRr9gdU5qBCQmCJV1x1oAPwidJzmDnexYuWTsOEM="
# GitHub's documented example (see test_plugin_github.py), in base64.
GITHUB_DOCS_KEY = "It's a Secret to Everybody"
GITHUB_DOCS_DATA = b"Hello, World!"
GITHUB_DOCS_HEX = "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"


@pytest.fixture(scope="module")
def hooks() -> Hooks:
    return Hooks()


def make_verifier(hooks: Hooks, **options: Any) -> Any:
    return load_verifier(hooks, "shop", {"type": "shopify", **options})


def request(body: bytes = BODY, headers: dict[str, str] | None = None) -> IngressRequest:
    return ingress_request("shop", headers=headers or {}, body=body)


def signature(secret: str, body: bytes = BODY) -> str:
    return base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()


def assert_rejected(result: Rejection | None, code: str) -> None:
    assert_rejection(result, 401, code, never=[SECRET, signature(SECRET)])


# --- accepted signatures ---------------------------------------------------------------------


def test_published_hmac_sha256_vectors_in_base64_are_accepted(hooks: Hooks) -> None:
    assert base64.b64encode(bytes.fromhex(RFC4231_HEX)).decode() == RFC4231_BASE64
    verifier = make_verifier(hooks, secret=RFC4231_KEY)
    assert verifier.verify(request(RFC4231_DATA, {HEADER: RFC4231_BASE64})) is None
    assert_rejected(
        verifier.verify(request(RFC4231_DATA + b"!", {HEADER: RFC4231_BASE64})), "invalid_signature"
    )
    github = base64.b64encode(bytes.fromhex(GITHUB_DOCS_HEX)).decode()
    verifier = make_verifier(hooks, secret=GITHUB_DOCS_KEY)
    assert verifier.verify(request(GITHUB_DOCS_DATA, {HEADER: github})) is None


def test_a_signature_computed_with_hmac_and_base64_is_accepted_on_the_raw_bytes(hooks: Hooks) -> None:
    verifier = make_verifier(hooks, secret=SECRET)
    assert verifier.verify(request(headers={HEADER: signature(SECRET)})) is None
    assert verifier.verify(request(headers={"x-shopify-hmac-sha256": signature(SECRET)})) is None
    reserialised = json.dumps(json.loads(BODY)).encode()
    assert_rejected(verifier.verify(request(reserialised, {HEADER: signature(SECRET)})), "invalid_signature")
    raw = b"\xff\xfe\x00 not UTF-8"
    assert verifier.verify(request(raw, {HEADER: signature(SECRET, raw)})) is None


def test_any_secret_of_a_rotation_list_is_accepted(hooks: Hooks) -> None:
    verifier = make_verifier(hooks, secret=["old-secret", "new-secret"])
    for secret in ("old-secret", "new-secret"):
        assert verifier.verify(request(headers={HEADER: signature(secret)})) is None, secret
    assert_rejected(verifier.verify(request(headers={HEADER: signature("unrelated")})), "invalid_signature")


def test_default_event_type_and_id_are_shopifys_headers(hooks: Hooks) -> None:
    verifier = make_verifier(hooks, secret=SECRET)
    assert verifier.default_event_type == "header.X-Shopify-Topic"
    assert verifier.default_event_id == "header.X-Shopify-Webhook-Id"


# --- refusals ----------------------------------------------------------------------------------


def test_tampered_body_and_wrong_secret_are_invalid_signature(hooks: Hooks) -> None:
    verifier = make_verifier(hooks, secret=SECRET)
    good = {HEADER: signature(SECRET)}
    assert_rejected(verifier.verify(request(BODY.replace(b"12.00", b"0.01"), good)), "invalid_signature")
    assert_rejected(verifier.verify(request(BODY + b"\n", good)), "invalid_signature")
    assert_rejected(verifier.verify(request(headers={HEADER: signature("wrong")})), "invalid_signature")


def test_missing_header_is_missing_signature(hooks: Hooks) -> None:
    verifier = make_verifier(hooks, secret=SECRET)
    assert_rejected(verifier.verify(request(headers={})), "missing_signature")
    assert_rejected(verifier.verify(request(headers={HEADER: ""})), "missing_signature")
    assert_rejected(verifier.verify(request(headers={"X-Shopify-Hmac-Sha1": "abc"})), "missing_signature")


def _urlsafe(value: str) -> str:
    return value.replace("+", "-").replace("/", "_")


@pytest.mark.parametrize(
    "value",
    [
        hmac.new(SECRET.encode(), BODY, hashlib.sha256).hexdigest(),  # hex, not base64
        signature(SECRET).rstrip("="),  # unpadded
        "sha256=" + signature(SECRET),  # a prefix Shopify does not send
        " " + signature(SECRET),
        signature(SECRET) + "\n",
        signature(SECRET)[:-4] + "====",
        signature(SECRET) + signature(SECRET),  # too long
        base64.b64encode(b"\x00" * 31).decode(),  # too short a digest
        "not base64 at all!",
        "%%%%" * 11,
        "A" * 100_000,  # absurdly long
        "\xe9" * 43 + "=",  # non-ASCII (a latin-1 decoded header)
        "\x00\x01garbage",
    ],
)
def test_malformed_header_is_invalid_signature(hooks: Hooks, value: str) -> None:
    verifier = make_verifier(hooks, secret=SECRET)
    assert_rejected(verifier.verify(request(headers={HEADER: value})), "invalid_signature")


def test_urlsafe_base64_is_refused(hooks: Hooks) -> None:
    # Find a body whose signature has a "+" or "/" so that the URL-safe alphabet differs.
    body = next(b for n in range(100) if _urlsafe(signature(SECRET, b := b"%d" % n)) != signature(SECRET, b))
    verifier = make_verifier(hooks, secret=SECRET)
    assert verifier.verify(request(body, {HEADER: signature(SECRET, body)})) is None
    assert_rejected(
        verifier.verify(request(body, {HEADER: _urlsafe(signature(SECRET, body))})), "invalid_signature"
    )


# --- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("block", "where", "word"),
    [
        ("type: shopify\nsecret: s\nheader: X-Sig\n", "x.yaml:6: $.sources.shop.verify.header", "unknown"),
        ("type: shopify\n", "x.yaml:3: $.sources.shop.verify", "secret"),
        ("type: shopify\nsecret: []\n", "x.yaml:3: $.sources.shop.verify", "at least one secret"),
        ("type: shopify\nsecret: {a: b}\n", "x.yaml:5: $.sources.shop.verify.secret", "expected"),
    ],
)
def test_bad_options_are_refused_with_file_line_and_path(
    hooks: Hooks, block: str, where: str, word: str
) -> None:
    assert_problem(load_error(hooks, nested("sources:\n  shop:\n    verify:\n", block, 6)), where, word)


# --- through the real gateway ------------------------------------------------------------------


def shopify_config(nats_url: str, receiver_url: str) -> str:
    return base_config(
        nats_url,
        f"""
        sources:
          shopify:
            verify: {{type: shopify, secret: ["{SECRET}", previous-secret]}}
            response: {{status: 200}}
        endpoints:
          orders:
            url: {receiver_url}/orders
            retry: {{schedule: [100ms]}}
        routes:
          - from: [shopify]
            types: ["orders/*"]
            to: [orders]
        """,
    )


def shopify_headers(body: bytes, topic: str, webhook_id: str, secret: str = SECRET) -> dict[str, str]:
    return {
        HEADER: signature(secret, body),
        "X-Shopify-Topic": topic,
        "X-Shopify-Webhook-Id": webhook_id,
        "X-Shopify-Shop-Domain": "example.myshopify.com",
        "Content-Type": "application/json",
    }


async def test_signed_order_is_stored_once_per_webhook_id_and_routed_by_topic(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    paid = b'{"id": 2, "financial_status": "paid"}'
    product = b'{"id": 3, "title": "Hat"}'
    async with receiver() as rx, run_gateway(tmp_path, shopify_config(nats_server.url, rx.url)) as gw:
        url = f"{gw.url}/webhooks/shopify"
        first = await gw.http.post(url, content=BODY, headers=shopify_headers(BODY, "orders/create", "w-1"))
        # Shopify retries with the same webhook id: answered 2xx, neither stored nor routed again.
        again = await gw.http.post(url, content=BODY, headers=shopify_headers(BODY, "orders/create", "w-1"))
        rotated = await gw.http.post(
            url, content=paid, headers=shopify_headers(paid, "orders/paid", "w-2", "previous-secret")
        )
        # Stored, but no route takes products/*: it proves the topic is the event type.
        other = await gw.http.post(
            url, content=product, headers=shopify_headers(product, "products/update", "w-3")
        )
        got = await rx.wait_for(2)
        stored = await stored_events(nats_server.url)
    assert [r.status_code for r in (first, again, rotated, other)] == [200, 200, 200, 200]
    assert first.json()["id"] == again.json()["id"] == event_id_for("shopify", "w-1")
    assert sorted(r.body for r in got) == sorted([BODY, paid])
    order = next(r for r in got if r.body == BODY)
    assert order.headers["x-shopify-topic"] == "orders/create"
    assert order.headers["hookgate-event-id"] == event_id_for("shopify", "w-1")
    assert sorted((e.type, e.external_id) for e in stored) == [
        ("orders/create", "w-1"),
        ("orders/paid", "w-2"),
        ("products/update", "w-3"),
    ]
    assert len(rx.requests) == 2


async def test_wrongly_signed_or_unsigned_requests_get_401_and_nothing_is_stored(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    async with receiver() as rx, run_gateway(tmp_path, shopify_config(nats_server.url, rx.url)) as gw:
        url = f"{gw.url}/webhooks/shopify"
        wrong = await gw.http.post(
            url, content=BODY, headers=shopify_headers(BODY, "orders/create", "w-1", "unrelated")
        )
        tampered = await gw.http.post(
            url, content=BODY + b" ", headers=shopify_headers(BODY, "orders/create", "w-1")
        )
        unsigned = await gw.http.post(url, content=BODY, headers={"X-Shopify-Topic": "orders/create"})
        garbage = await gw.http.post(
            url,
            content=b"\xff\x00",
            headers={HEADER.encode(): b"\xe9" * 8000, b"X-Shopify-Topic": b"orders/create"},
        )
    assert_http_error(wrong, 401, "invalid_signature")
    assert_http_error(tampered, 401, "invalid_signature")
    assert_http_error(unsigned, 401, "missing_signature")
    assert_http_error(garbage, 401, "invalid_signature")
    assert SECRET not in wrong.text
    assert await stored_events(nats_server.url) == []
    assert rx.requests == []
