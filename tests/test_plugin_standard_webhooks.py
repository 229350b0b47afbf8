"""The `standard-webhooks` signer, checked against the providers' own SDKs as oracles.

`standardwebhooks.Webhook(secret).verify` and `svix.webhooks.Webhook(secret).verify` must accept
what we sign. Both check the timestamp against the clock (5 minutes either way), so every request
here is signed with the current time.
"""

from __future__ import annotations

import base64
import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import standardwebhooks.webhooks
import svix.webhooks

from hookgate.config import ConfigError
from hookgate.plugin_host.hooks import Hooks
from hookgate.types import ComponentKind, OutgoingRequest
from tests.plugin_support import (
    ENDPOINT,
    assert_problem,
    load_error,
    load_signer,
    nested,
    only_header,
    outgoing_request,
)
from tests.plugin_support import standard_webhooks_sdks_accept as sdk_accepts
from tests.support import NatsServer, Received, base_config, publish_with_nats, receiver, run_gateway

SECRET_A = "whsec_" + base64.b64encode(b"A" * 8 + os.urandom(24)).decode()
SECRET_B = "whsec_" + base64.b64encode(b"B" * 8 + os.urandom(24)).decode()
BODY = (
    b'{"type":"invoice.paid","timestamp":"2024-05-01T12:00:00.000Z",'
    b'"data":{"amount":1200,"who":"Zo\xc3\xab"}}'
)


@pytest.fixture(scope="module")
def hooks() -> Hooks:
    return Hooks()


def make_signer(hooks: Hooks, secret: str | list[str]) -> Any:
    """Load an endpoint with `signing: {scheme: standard-webhooks}` and build its signer."""
    return load_signer(hooks, f"{{scheme: standard-webhooks, secret: {json.dumps(secret)}}}")


def outgoing(body: bytes = BODY, event_id: str = "evt_123", timestamp: int | None = None) -> OutgoingRequest:
    ts = int(time.time()) if timestamp is None else timestamp
    headers = [
        ("content-type", "application/json"),
        ("webhook-id", event_id),
        ("webhook-timestamp", str(ts)),
        ("hookgate-delivery-id", "dlv_1"),
        ("hookgate-attempt", "1"),
    ]
    return outgoing_request(body, event_id=event_id, timestamp=ts, headers=headers)


def signed(signer: Any, request: OutgoingRequest) -> dict[str, str]:
    signer.sign(request)
    only_header(request.headers, "webhook-signature")
    return dict(request.headers)


# --- the signature itself --------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [BODY, b"{}", b'{"data": [1, 2, 3],\n "spaces" :  true}\n', '{"emoji": "\U0001f600"}'.encode()],
)
def test_signature_verifies_with_standardwebhooks_and_svix(hooks: Hooks, body: bytes) -> None:
    signer = make_signer(hooks, SECRET_A)
    headers = signed(signer, outgoing(body))
    assert headers["webhook-signature"].startswith("v1,")
    assert " " not in headers["webhook-signature"]
    assert standardwebhooks.webhooks.Webhook(SECRET_A).verify(body, headers) == json.loads(body)
    svix.webhooks.Webhook(SECRET_A).verify(body, headers)  # raises if not accepted


def test_signature_is_the_documented_hmac_of_id_timestamp_and_body(hooks: Hooks) -> None:
    signer = make_signer(hooks, SECRET_A)
    ts = int(time.time())
    headers = signed(signer, outgoing(BODY, "evt_abc", ts))
    # What the SDK itself would send for the same message.
    sent_at = datetime.fromtimestamp(ts, UTC)
    oracle = standardwebhooks.webhooks.Webhook(SECRET_A).sign("evt_abc", sent_at, BODY.decode())
    assert headers["webhook-signature"] == oracle


def test_wrong_secret_tampered_body_id_or_timestamp_do_not_verify(hooks: Hooks) -> None:
    signer = make_signer(hooks, SECRET_A)
    headers = signed(signer, outgoing(BODY, "evt_1"))
    assert sdk_accepts(SECRET_A, BODY, headers)
    assert not sdk_accepts(SECRET_B, BODY, headers)
    assert not sdk_accepts(SECRET_A, BODY.replace(b"1200", b"9200"), headers)
    assert not sdk_accepts(SECRET_A, BODY, {**headers, "webhook-id": "evt_2"})
    later = str(int(headers["webhook-timestamp"]) + 1)
    assert not sdk_accepts(SECRET_A, BODY, {**headers, "webhook-timestamp": later})


def test_sign_replaces_a_signature_header_already_present(hooks: Hooks) -> None:
    signer = make_signer(hooks, SECRET_A)
    request = outgoing()
    request.headers.append(("Webhook-Signature", "v1,Zm9yZ2Vk"))
    headers = signed(signer, request)
    assert sdk_accepts(SECRET_A, BODY, headers)


def test_rotation_gives_one_space_separated_signature_per_secret(hooks: Hooks) -> None:
    signer = make_signer(hooks, [SECRET_A, SECRET_B])
    headers = signed(signer, outgoing())
    parts = headers["webhook-signature"].split(" ")
    assert len(parts) == 2
    assert all(p.startswith("v1,") for p in parts)
    assert parts[0] != parts[1]
    # The full header verifies with either secret (what a receiver mid-rotation holds)...
    assert sdk_accepts(SECRET_A, BODY, headers)
    assert sdk_accepts(SECRET_B, BODY, headers)
    # ...and each signature verifies with its own secret only.
    for part, own, other in ((parts[0], SECRET_A, SECRET_B), (parts[1], SECRET_B, SECRET_A)):
        alone = {**headers, "webhook-signature": part}
        assert sdk_accepts(own, BODY, alone)
        assert not sdk_accepts(other, BODY, alone)


def test_secret_without_prefix_or_padding_is_accepted_like_the_sdks_accept_it(hooks: Hooks) -> None:
    key = os.urandom(16)  # 16 bytes: base64 ends in "==" padding
    padded = base64.b64encode(key).decode()
    assert padded.endswith("==")
    for secret in (padded, "whsec_" + padded.rstrip("=")):
        signer = make_signer(hooks, secret)
        headers = signed(signer, outgoing())
        assert sdk_accepts("whsec_" + padded, BODY, headers), secret


# --- config ------------------------------------------------------------------------------------


def config_error(hooks: Hooks, signing_block: str) -> ConfigError:
    return load_error(hooks, nested(ENDPOINT + "    signing:\n", signing_block, 6))


SIGNING = "x.yaml:4: $.endpoints.billing.signing"


@pytest.mark.parametrize(
    ("block", "where", "words"),
    [
        (
            """\
            scheme: standard-webhooks
            secret: "whsec_not base64!"
            """,
            SIGNING,
            ("secret must be 'whsec_' followed by base64",),
        ),
        (
            """\
            scheme: standard-webhooks
            secret: whsec_c2hvcnQ=
            """,
            SIGNING,
            ("secret is too short", "16 random bytes"),
        ),
        (
            f"""\
            scheme: standard-webhooks
            secret:
              - {SECRET_A}
              - whsec_%%%%
            """,
            SIGNING,
            ("secret[1] must be 'whsec_' followed by base64",),
        ),
        (
            f"""\
            scheme: standard-webhooks
            secret: [{SECRET_A}, whsec_c2hvcnQ]
            """,
            SIGNING,
            ("secret[1] is too short",),
        ),
        (
            """\
            scheme: standard-webhooks
            secret: []
            """,
            SIGNING,
            ("at least one secret",),
        ),
        (
            """\
            scheme: standard-webhooks
            """,
            SIGNING,
            ("missing", "secret"),
        ),
        (
            f"""\
            scheme: standard-webhooks
            secret: {SECRET_A}
            tolerance: 5m
            """,
            "x.yaml:7: $.endpoints.billing.signing.tolerance",
            ("unknown",),
        ),
    ],
)
def test_bad_secrets_and_options_are_refused_with_file_line_and_path(
    hooks: Hooks, block: str, where: str, words: tuple[str, ...]
) -> None:
    assert_problem(config_error(hooks, block), where, *words)


def test_a_misspelt_scheme_names_the_installed_signers(hooks: Hooks) -> None:
    error = config_error(hooks, f"scheme: standard-webhook\nsecret: {SECRET_A}\n")
    installed = hooks.registry.names(ComponentKind.SIGNER)
    assert "standard-webhooks" in installed
    assert_problem(error, "x.yaml:5: $.endpoints.billing.signing.scheme", "unknown", *installed)


# --- end to end --------------------------------------------------------------------------------


def check_standard_webhook(got: Received, secret: str, event_id: str, type_: str, data: Any) -> None:
    assert got.headers["webhook-id"] == event_id
    assert abs(int(got.headers["webhook-timestamp"]) - time.time()) < 60
    assert got.headers["webhook-signature"].startswith("v1,")
    assert got.headers["content-type"] == "application/json"
    assert standardwebhooks.webhooks.Webhook(secret).verify(got.body, got.headers) == got.json()
    svix.webhooks.Webhook(secret).verify(got.body, got.headers)
    payload = got.json()
    assert set(payload) == {"type", "timestamp", "data"}
    assert payload["type"] == type_
    assert payload["data"] == data
    sent = datetime.strptime(payload["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert abs(sent.timestamp() - time.time()) < 60


async def test_internal_events_from_the_api_and_from_jetstream_arrive_signed(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    async with receiver() as rx:
        text = base_config(
            nats_server.url,
            f"""
            endpoints:
              billing:
                url: {rx.url}/billing
                signing: {{scheme: standard-webhooks, secret: "{SECRET_A}"}}
                retry: {{schedule: [100ms]}}
            routes:
              - from: [internal]
                types: ["order.*"]
                to: [billing]
            """,
        )
        async with run_gateway(tmp_path, text) as gw:
            response = await gw.publish("order.created", {"order": 1, "items": ["a", "b"]})
            api_id = response.json()["id"]
            await publish_with_nats(
                nats_server.url, "hookgate.publish.order.shipped", b'{"order": 2}', "ord-2-shipped"
            )
            await rx.wait_for(2)
    got = rx.requests
    assert response.status_code == 202
    by_id = {r.headers["webhook-id"]: r for r in got}
    assert set(by_id) == {api_id, "ord-2-shipped"}
    check_standard_webhook(
        by_id[api_id], SECRET_A, api_id, "order.created", {"order": 1, "items": ["a", "b"]}
    )
    check_standard_webhook(by_id["ord-2-shipped"], SECRET_A, "ord-2-shipped", "order.shipped", {"order": 2})
    for r in got:
        assert r.path == "/billing"
        assert r.headers["hookgate-attempt"] == "1"
        assert not sdk_accepts(SECRET_B, r.body, r.headers)


async def test_a_rotating_endpoint_gets_signatures_for_both_secrets(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    async with receiver() as rx:
        text = base_config(
            nats_server.url,
            f"""
            endpoints:
              billing:
                url: {rx.url}/billing
                signing:
                  scheme: standard-webhooks
                  secret: ["{SECRET_A}", "{SECRET_B}"]
            routes:
              - from: [internal]
                to: [billing]
            """,
        )
        async with run_gateway(tmp_path, text) as gw:
            response = await gw.publish("user.deleted", {"user": "u_1"})
            await rx.wait_for(1)
    (got,) = rx.requests
    assert response.status_code == 202
    parts = got.headers["webhook-signature"].split(" ")
    assert len(parts) == 2
    for part, secret in zip(parts, (SECRET_A, SECRET_B), strict=True):
        alone = {**got.headers, "webhook-signature": part}
        assert sdk_accepts(secret, got.body, alone)
        check_standard_webhook(got, secret, response.json()["id"], "user.deleted", {"user": "u_1"})
