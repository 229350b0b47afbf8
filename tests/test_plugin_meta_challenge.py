"""The `meta` handshake: Meta's `hub.challenge` verification request, config errors, the gateway."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import trio

from hookgate.config import ConfigError
from hookgate.plugin_host.hooks import Hooks
from hookgate.types import HandshakeResponse, IngressRequest
from tests.plugin_support import (
    assert_http_error,
    assert_problem,
    ingress_request,
    load_error,
    load_handshake,
    nested,
    sources_config,
    the_problem,
)
from tests.support import NatsServer, receiver, run_gateway, stream_messages

TOKEN = "meta-verify-token"


@pytest.fixture(scope="module")
def hooks() -> Hooks:
    return Hooks()


def make_handshake(hooks: Hooks, **options: Any) -> Any:
    return load_handshake(hooks, "meta", "meta", **options)


def request(query: bytes | dict[str, str], method: str = "GET") -> IngressRequest:
    raw = urlencode(query).encode() if isinstance(query, dict) else query
    return ingress_request("meta", method=method, query=raw, body=b"")


def verification(
    token: str = TOKEN, challenge: str = "1158201444", mode: str = "subscribe"
) -> dict[str, str]:
    return {"hub.mode": mode, "hub.verify_token": token, "hub.challenge": challenge}


def assert_refused(answer: HandshakeResponse | None, *words: str) -> None:
    assert isinstance(answer, HandshakeResponse), f"expected a refusal, got {answer!r}"
    assert answer.status == 403
    assert answer.content_type == "application/json"
    body = json.loads(answer.body)
    assert body["error"] == "forbidden"
    assert all(w in body["message"] for w in words), body
    assert TOKEN not in answer.body.decode()


def test_the_challenge_is_echoed_when_the_token_matches(hooks: Hooks) -> None:
    answer = make_handshake(hooks, verify_token=TOKEN).answer(request(verification()))
    assert answer == HandshakeResponse(status=200, body=b"1158201444", content_type="text/plain")


def test_the_challenge_is_echoed_byte_for_byte(hooks: Hooks) -> None:
    handshake = make_handshake(hooks, verify_token="t&k=n ☃")
    answer = handshake.answer(request(verification(token="t&k=n ☃", challenge="a b+c&d=é")))
    assert answer.status == 200
    assert answer.body == "a b+c&d=é".encode()
    raw = b"hub.mode=subscribe&hub.challenge=%00%ff&hub.verify_token=" + b"t%26k%3Dn+%E2%98%83"
    assert handshake.answer(request(raw)).body == b"\x00\xff"


def test_a_head_request_gets_the_same_answer(hooks: Hooks) -> None:
    handshake = make_handshake(hooks, verify_token=TOKEN)
    assert handshake.answer(request(verification(), "HEAD")) == handshake.answer(request(verification()))


@pytest.mark.parametrize("token", ["wrong", "", TOKEN + "x", TOKEN[:-1], TOKEN.upper(), " " + TOKEN])
def test_a_wrong_token_is_refused(hooks: Hooks, token: str) -> None:
    assert_refused(
        make_handshake(hooks, verify_token=TOKEN).answer(request(verification(token=token))), "token"
    )


def test_a_missing_token_mode_or_challenge_is_refused(hooks: Hooks) -> None:
    handshake = make_handshake(hooks, verify_token=TOKEN)
    assert_refused(handshake.answer(request({"hub.mode": "subscribe", "hub.challenge": "1"})), "token")
    assert_refused(handshake.answer(request(verification(mode="unsubscribe"))), "hub.mode")
    assert_refused(handshake.answer(request(verification(mode=""))), "hub.mode")
    assert_refused(
        handshake.answer(request({"hub.mode": "subscribe", "hub.verify_token": TOKEN})), "challenge"
    )
    assert_refused(handshake.answer(request(verification(challenge=""))), "challenge")


@pytest.mark.parametrize(
    "query",
    [b"", b"hub.challenge=1&hub.verify_token=" + TOKEN.encode(), b"foo=bar", b"%%%", b"hub_mode=subscribe"],
)
def test_gets_without_hub_mode_are_not_handshakes(hooks: Hooks, query: bytes) -> None:
    assert make_handshake(hooks, verify_token=TOKEN).answer(request(query)) is None


def test_posts_are_never_answered(hooks: Hooks) -> None:
    assert make_handshake(hooks, verify_token=TOKEN).answer(request(verification(), "POST")) is None


# --- config ------------------------------------------------------------------------------------


def config_error(hooks: Hooks, block: str) -> ConfigError:
    return load_error(hooks, nested("sources:\n  meta:\n    handshake:\n      type: meta\n", block, 6))


@pytest.mark.parametrize(
    ("block", "where", "message"),
    [
        ("", "x.yaml:3: $.sources.meta.handshake", 'missing required key "verify_token"'),
        ('verify_token: ""\n', "x.yaml:5: $.sources.meta.handshake.verify_token", "must not be empty"),
        ("verify_token: 42\n", "x.yaml:5: $.sources.meta.handshake.verify_token", "expected a string"),
        ("verify_token: t\napp_secret: s\n", "x.yaml:6: $.sources.meta.handshake.app_secret", "unknown key"),
    ],
)
def test_bad_options_are_refused_with_file_line_and_path(
    hooks: Hooks, block: str, where: str, message: str
) -> None:
    assert_problem(config_error(hooks, block), where, message, ignore_case=False)


def test_an_unknown_handshake_type_lists_the_installed_ones(hooks: Hooks) -> None:
    problem = the_problem(load_error(hooks, "sources:\n  meta:\n    handshake: {type: facebook}\n"))
    assert problem.startswith("x.yaml:3: $.sources.meta.handshake.type: unknown handshake")
    assert "meta" in problem and "twitter_crc" in problem


# --- through the gateway -----------------------------------------------------------------------


async def test_gateway_echoes_the_challenge_and_stores_only_real_events(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    app_secret = "meta-app-secret"
    with trio.fail_after(30):
        async with receiver() as rx:
            text = sources_config(
                nats_server.url,
                rx.url,
                f"""
                whatsapp:
                  handshake: {{type: meta, verify_token: {TOKEN}}}
                  verify:
                    {{type: hmac, header: X-Hub-Signature-256, prefix: "sha256=", secret: {app_secret}}}
                """,
            )
            async with run_gateway(tmp_path, text) as gw:
                url = f"{gw.url}/webhooks/whatsapp"
                challenge = await gw.http.get(url, params=verification(challenge="98765"))
                wrong = await gw.http.get(url, params=verification(token="guess"))
                plain = await gw.http.get(url)
                body = b'{"object": "whatsapp_business_account", "entry": []}'
                signature = "sha256=" + hmac.new(app_secret.encode(), body, hashlib.sha256).hexdigest()
                event = await gw.http.post(url, content=body, headers={"X-Hub-Signature-256": signature})
                (got,) = await rx.wait_for(1)
    assert challenge.status_code == 200
    assert challenge.content == b"98765"
    assert challenge.headers["content-type"].startswith("text/plain")
    assert_http_error(wrong, 403, "forbidden")
    assert "guess" not in wrong.text and TOKEN not in wrong.text
    assert plain.status_code == 405
    assert event.status_code == 202
    assert got.body == body
    assert len(await stream_messages(nats_server.url, "HOOKGATE_EVENTS")) == 1
    assert rx.requests == [got]
