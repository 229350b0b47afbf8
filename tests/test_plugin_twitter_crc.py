"""The `twitter_crc` handshake: Twitter's challenge-response check (CRC), config errors, the gateway.

Expected response tokens are computed here with Python's `hmac` (and with `cryptography`'s HMAC in
the gateway test), independently of the plugin.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac

from hookgate.plugin_host.hooks import Hooks
from hookgate.types import HandshakeResponse, IngressRequest
from tests.plugin_support import (
    assert_problem,
    ingress_request,
    load_error,
    load_handshake,
    nested,
    sources_config,
)
from tests.support import NatsServer, receiver, run_gateway, stream_messages

SECRET = "twitter-consumer-secret"


@pytest.fixture(scope="module")
def hooks() -> Hooks:
    return Hooks()


def make_handshake(hooks: Hooks, **options: Any) -> Any:
    return load_handshake(hooks, "twitter", "twitter_crc", **options)


def request(query: bytes, method: str = "GET") -> IngressRequest:
    return ingress_request("twitter", method=method, query=query, body=b"")


def expected_token(secret: str, crc_token: bytes) -> str:
    return (
        "sha256=" + base64.b64encode(hmac.new(secret.encode(), crc_token, hashlib.sha256).digest()).decode()
    )


def test_a_crc_get_is_answered_with_the_response_token(hooks: Hooks) -> None:
    answer = make_handshake(hooks, consumer_secret=SECRET).answer(request(b"crc_token=abc123"))
    assert isinstance(answer, HandshakeResponse)
    assert answer.status == 200
    assert answer.content_type == "application/json"
    assert json.loads(answer.body) == {"response_token": expected_token(SECRET, b"abc123")}


def test_the_token_is_percent_decoded_before_signing(hooks: Hooks) -> None:
    handshake = make_handshake(hooks, consumer_secret=SECRET)
    answer = handshake.answer(request(b"nonce=1&crc_token=a%2Bb%2Fc%3D%3D&x=y"))
    assert json.loads(answer.body) == {"response_token": expected_token(SECRET, b"a+b/c==")}
    # The first of repeated parameters is the one answered.
    answer = handshake.answer(request(b"crc_token=first&crc_token=second"))
    assert json.loads(answer.body) == {"response_token": expected_token(SECRET, b"first")}


def test_a_head_request_gets_the_same_answer(hooks: Hooks) -> None:
    handshake = make_handshake(hooks, consumer_secret=SECRET)
    assert handshake.answer(request(b"crc_token=t", "HEAD")) == handshake.answer(request(b"crc_token=t"))


def test_the_secret_decides_the_token(hooks: Hooks) -> None:
    answer = make_handshake(hooks, consumer_secret="other-secret").answer(request(b"crc_token=abc123"))
    token = json.loads(answer.body)["response_token"]
    assert token == expected_token("other-secret", b"abc123")
    assert token != expected_token(SECRET, b"abc123")


@pytest.mark.parametrize("query", [b"", b"crc_token=", b"crc_token", b"crc=abc", b"CRC_TOKEN=abc", b"%%%"])
def test_gets_without_a_crc_token_are_not_handshakes(hooks: Hooks, query: bytes) -> None:
    assert make_handshake(hooks, consumer_secret=SECRET).answer(request(query)) is None


def test_posts_are_never_answered(hooks: Hooks) -> None:
    assert make_handshake(hooks, consumer_secret=SECRET).answer(request(b"crc_token=abc", "POST")) is None


def test_odd_bytes_in_the_token_are_signed_as_sent_never_raised(hooks: Hooks) -> None:
    handshake = make_handshake(hooks, consumer_secret=SECRET)
    answer = handshake.answer(request(b"crc_token=%ff%00\xfe"))
    assert json.loads(answer.body) == {"response_token": expected_token(SECRET, b"\xff\x00\xfe")}


# --- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("block", "where", "message"),
    [
        ("", "x.yaml:3: $.sources.twitter.handshake", 'missing required key "consumer_secret"'),
        (
            'consumer_secret: ""\n',
            "x.yaml:5: $.sources.twitter.handshake.consumer_secret",
            "must not be empty",
        ),
        (
            "consumer_secret: [a]\n",
            "x.yaml:5: $.sources.twitter.handshake.consumer_secret",
            "expected a string",
        ),
        ("consumer_secret: s\nsecret: s\n", "x.yaml:6: $.sources.twitter.handshake.secret", "unknown key"),
        (
            'consumer_secret: "${TWITTER_SECRET}"\n',
            "x.yaml:5: $.sources.twitter.handshake.consumer_secret",
            "TWITTER_SECRET is not set",
        ),
    ],
)
def test_bad_options_are_refused_with_file_line_and_path(
    hooks: Hooks, block: str, where: str, message: str
) -> None:
    text = nested("sources:\n  twitter:\n    handshake:\n      type: twitter_crc\n", block, 6)
    assert_problem(load_error(hooks, text), where, message, ignore_case=False)


# --- through the gateway -----------------------------------------------------------------------


def twitter_signature(secret: str, data: bytes) -> str:
    """HMAC-SHA256, base64, with cryptography's implementation rather than Python's."""
    mac = crypto_hmac.HMAC(secret.encode(), hashes.SHA256())
    mac.update(data)
    return "sha256=" + base64.b64encode(mac.finalize()).decode()


async def test_gateway_answers_the_crc_and_stores_only_real_events(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    with trio.fail_after(30):
        async with receiver() as rx:
            text = sources_config(
                nats_server.url,
                rx.url,
                """
                twitter:
                  handshake: {type: twitter_crc, consumer_secret: "${TWITTER_SECRET}"}
                  verify: {type: hmac, header: X-Twitter-Webhooks-Signature, encoding: base64,
                           prefix: "sha256=", secret: "${TWITTER_SECRET}"}
                """,
            )
            async with run_gateway(tmp_path, text, env={"TWITTER_SECRET": SECRET}) as gw:
                url = f"{gw.url}/webhooks/twitter"
                crc = await gw.http.get(url, params={"crc_token": "Zm9vYmFy+/="})
                plain = await gw.http.get(url)
                crc_by_post = await gw.http.post(url, params={"crc_token": "abc"}, content=b"{}")
                body = b'{"for_user_id": "2244994945", "tweet_create_events": []}'
                event = await gw.http.post(
                    url,
                    content=body,
                    headers={"X-Twitter-Webhooks-Signature": twitter_signature(SECRET, body)},
                )
                (got,) = await rx.wait_for(1)
    assert crc.status_code == 200
    assert crc.headers["content-type"] == "application/json"
    assert crc.json() == {"response_token": twitter_signature(SECRET, b"Zm9vYmFy+/=")}
    assert plain.status_code == 405
    assert crc_by_post.status_code == 401  # a POST must be signed like any event, CRC or not
    assert event.status_code == 202
    assert got.body == body
    assert len(await stream_messages(nats_server.url, "HOOKGATE_EVENTS")) == 1
    assert rx.requests == [got]
