"""The `slack` verifier, with Slack's own SDK as the oracle: signatures, tolerance, challenge, gateway.

Requests are signed with `slack_sdk.signature.SignatureVerifier.generate_signature`, and every
decision of ours is cross-checked with `SignatureVerifier.is_valid` under the same clock. The clock
is injected (`SlackVerifier(config, now=...)`), so Slack's documented example from 2018 verifies
without sleeping or patching time.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from slack_sdk.signature import Clock, SignatureVerifier

from hookgate.broker.ids import event_id_for
from hookgate.plugin_host.hooks import Hooks
from hookgate.types import HandshakeResponse, IngressRequest, Rejection
from hookgate_builtins.slack import SlackVerifier
from tests.plugin_support import (
    assert_http_error,
    assert_problem,
    assert_rejection,
    ingress_request,
    load,
    load_error,
    load_verifier,
    nested,
)
from tests.support import NatsServer, base_config, receiver, run_gateway, stored_events

SECRET = "e3b0c44298fc1c149afbf4c8996fb924"
NOW = 1_700_000_000
BODY = (
    b'{"token":"x","team_id":"T1","type":"event_callback","event_id":"Ev01","event_time":1700000000,'
    b'"event":{"type":"app_mention","user":"U1","text":"h\xc3\xa9llo <@U2>","ts":"1700000000.000100"}}'
)

# https://docs.slack.dev/authentication/verifying-requests-from-slack/ (the worked example)
DOCS_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
DOCS_TIMESTAMP = "1531420618"
DOCS_BODY = (
    b"token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V"
    b"&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text="
    b"&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN"
    b"&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c"
)
DOCS_SIGNATURE = "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503"


class FixedClock(Clock):
    def __init__(self, now: float):
        self.value = now

    def now(self) -> float:
        return self.value


@pytest.fixture(scope="module")
def hooks() -> Hooks:
    return Hooks()


def make_verifier(hooks: Hooks, now: float = NOW, **options: Any) -> Any:
    """Load `verify: {type: slack, **options}` and build the verifier with a fixed clock."""
    verifier = load_verifier(hooks, "slack", {"type": "slack", **options}, now=now)
    assert isinstance(verifier, SlackVerifier)
    return verifier


def request(body: bytes = BODY, headers: dict[str, str] | None = None) -> IngressRequest:
    return ingress_request("slack", headers=headers or {}, body=body)


def sdk_headers(secret: str, body: bytes = BODY, timestamp: int | str = NOW) -> dict[str, str]:
    """Headers as Slack sends them, signed by Slack's SDK."""
    sig = SignatureVerifier(secret).generate_signature(timestamp=str(timestamp), body=body)
    assert sig is not None
    return {"X-Slack-Signature": sig, "X-Slack-Request-Timestamp": str(timestamp)}


def sdk_accepts(secret: str, body: bytes, headers: dict[str, str], now: float = NOW) -> bool:
    return SignatureVerifier(secret, clock=FixedClock(now)).is_valid_request(body, headers)


def assert_rejected(result: Rejection | None, code: str) -> None:
    signatures = [sdk_headers(SECRET, timestamp=t)["X-Slack-Signature"][3:] for t in (NOW, NOW - 3600)]
    assert_rejection(result, 401, code, never=[SECRET, *signatures])


# --- accepted signatures ---------------------------------------------------------------------


def test_slacks_documented_example_is_accepted_at_its_time(hooks: Hooks) -> None:
    headers = {"X-Slack-Signature": DOCS_SIGNATURE, "X-Slack-Request-Timestamp": DOCS_TIMESTAMP}
    now = int(DOCS_TIMESTAMP) + 10
    verifier = make_verifier(hooks, now=now, secret=DOCS_SECRET)
    assert verifier.verify(request(DOCS_BODY, headers)) is None
    assert sdk_accepts(DOCS_SECRET, DOCS_BODY, headers, now)
    assert sdk_headers(DOCS_SECRET, DOCS_BODY, DOCS_TIMESTAMP)["X-Slack-Signature"] == DOCS_SIGNATURE
    # The same request today is a replay.
    assert_rejected(
        make_verifier(hooks, now=NOW, secret=DOCS_SECRET).verify(request(DOCS_BODY, headers)),
        "timestamp_out_of_tolerance",
    )


def test_sdk_signed_requests_are_accepted_and_agree_with_the_sdk(hooks: Hooks) -> None:
    verifier = make_verifier(hooks, secret=SECRET)
    headers = sdk_headers(SECRET)
    assert verifier.verify(request(headers=headers)) is None
    assert sdk_accepts(SECRET, BODY, headers)
    lower = {k.lower(): v for k, v in headers.items()}
    assert verifier.verify(request(headers=lower)) is None


@pytest.mark.parametrize(
    ("name", "body", "headers", "now"),
    [
        ("valid", BODY, sdk_headers(SECRET), NOW),
        ("tampered", BODY.replace(b"U1", b"U9"), sdk_headers(SECRET), NOW),
        ("wrong secret", BODY, sdk_headers("not-" + SECRET), NOW),
        ("5 minutes old", BODY, sdk_headers(SECRET, timestamp=NOW - 300), NOW),
        ("5 minutes and 1s old", BODY, sdk_headers(SECRET, timestamp=NOW - 301), NOW),
        ("5 minutes ahead", BODY, sdk_headers(SECRET, timestamp=NOW + 300), NOW),
        ("5 minutes and 1s ahead", BODY, sdk_headers(SECRET, timestamp=NOW + 301), NOW),
        ("timestamp swapped", BODY, {**sdk_headers(SECRET), "X-Slack-Request-Timestamp": str(NOW - 1)}, NOW),
        ("form body", DOCS_BODY, sdk_headers(SECRET, DOCS_BODY), NOW),
        ("empty body", b"", sdk_headers(SECRET, b""), NOW),
    ],
)
def test_decisions_match_slacks_sdk(
    hooks: Hooks, name: str, body: bytes, headers: dict[str, str], now: float
) -> None:
    verifier = make_verifier(hooks, now=now, secret=SECRET)
    ours = verifier.verify(request(body, headers))
    assert (ours is None) == sdk_accepts(SECRET, body, headers, now), (name, ours)


def test_non_utf8_bodies_are_verified_as_bytes(hooks: Hooks) -> None:
    # Slack's SDK decodes the body as UTF-8 to sign it, so the oracle here is plain hmac.
    body = b"\xff\xfe\x00\x80"
    digest = hmac.new(SECRET.encode(), b"v0:%d:" % NOW + body, hashlib.sha256).hexdigest()
    headers = {"X-Slack-Signature": "v0=" + digest, "X-Slack-Request-Timestamp": str(NOW)}
    verifier = make_verifier(hooks, secret=SECRET)
    assert verifier.verify(request(body, headers)) is None
    assert_rejected(verifier.verify(request(body + b"\x00", headers)), "invalid_signature")


def test_any_secret_of_a_rotation_list_is_accepted(hooks: Hooks) -> None:
    verifier = make_verifier(hooks, secret=["old-secret", "new-secret"])
    for secret in ("old-secret", "new-secret"):
        assert verifier.verify(request(headers=sdk_headers(secret))) is None, secret
    assert_rejected(verifier.verify(request(headers=sdk_headers("unrelated"))), "invalid_signature")


def test_the_clock_defaults_to_the_real_time(hooks: Hooks) -> None:
    text = "sources:\n  slack:\n    verify: {type: slack, secret: s}\n"
    config = load(hooks, text).verifiers["slack"].config
    verifier = SlackVerifier(config)
    assert verifier.verify(request(headers=sdk_headers("s", timestamp=int(time.time())))) is None


# --- refusals ----------------------------------------------------------------------------------


def test_tampered_body_and_wrong_secret_are_invalid_signature(hooks: Hooks) -> None:
    verifier = make_verifier(hooks, secret=SECRET)
    assert_rejected(verifier.verify(request(BODY + b" ", sdk_headers(SECRET))), "invalid_signature")
    assert_rejected(verifier.verify(request(headers=sdk_headers("wrong"))), "invalid_signature")


@pytest.mark.parametrize("skew", [-301, 301, 3600, -86_400, NOW])
def test_stale_or_future_timestamps_are_out_of_tolerance(hooks: Hooks, skew: int) -> None:
    verifier = make_verifier(hooks, secret=SECRET)
    headers = sdk_headers(SECRET, timestamp=NOW - skew)
    assert_rejected(verifier.verify(request(headers=headers)), "timestamp_out_of_tolerance")


def test_tolerance_is_configurable(hooks: Hooks) -> None:
    verifier = make_verifier(hooks, secret=SECRET, tolerance="10s")
    assert verifier.verify(request(headers=sdk_headers(SECRET, timestamp=NOW - 10))) is None
    assert_rejected(
        verifier.verify(request(headers=sdk_headers(SECRET, timestamp=NOW - 11))),
        "timestamp_out_of_tolerance",
    )
    lenient = make_verifier(hooks, secret=SECRET, tolerance="1h")
    assert lenient.verify(request(headers=sdk_headers(SECRET, timestamp=NOW + 3000))) is None


def test_a_stale_request_with_a_bad_signature_is_invalid_signature(hooks: Hooks) -> None:
    # The signature is checked first: timestamp_out_of_tolerance means "signed by Slack, but stale".
    verifier = make_verifier(hooks, secret=SECRET)
    assert_rejected(
        verifier.verify(request(headers=sdk_headers("wrong", timestamp=NOW - 3600))), "invalid_signature"
    )


def test_missing_headers_are_missing_signature(hooks: Hooks) -> None:
    verifier = make_verifier(hooks, secret=SECRET)
    headers = sdk_headers(SECRET)
    assert_rejected(verifier.verify(request(headers={})), "missing_signature")
    for name in headers:
        assert_rejected(verifier.verify(request(headers={**headers, name: ""})), "missing_signature")
        without = {k: v for k, v in headers.items() if k != name}
        assert_rejected(verifier.verify(request(headers=without)), "missing_signature")


GOOD_HEX = SignatureVerifier(SECRET).generate_signature(timestamp=str(NOW), body=BODY)[3:]  # type: ignore[index]


@pytest.mark.parametrize(
    "value",
    [
        GOOD_HEX,  # no prefix
        "v1=" + GOOD_HEX,
        "V0=" + GOOD_HEX,
        "v0=" + GOOD_HEX + "\n",
        "v0=" + GOOD_HEX[:-2],
        "v0=" + GOOD_HEX + "00",
        "v0=",
        "v0=" + "zz" * 32,
        "v0=" + "ab " * 21 + "a",
        "v0=" + "a" * 100_000,
        "v0=" + "\xe9" * 64,
        "v0=" + GOOD_HEX + ",v0=" + GOOD_HEX,
        "\x00\x01garbage",
    ],
)
def test_malformed_signature_is_invalid_signature(hooks: Hooks, value: str) -> None:
    verifier = make_verifier(hooks, secret=SECRET)
    headers = {"X-Slack-Signature": value, "X-Slack-Request-Timestamp": str(NOW)}
    assert_rejected(verifier.verify(request(headers=headers)), "invalid_signature")


@pytest.mark.parametrize(
    "timestamp",
    [
        "abc",
        "1e9",
        "-5",
        " " + str(NOW),
        str(NOW) + ".5",
        "\u0661\u0667\u0660\u0660",  # Arabic-Indic digits, which int() would read
        "9" * 5000,  # int() refuses strings this long
        "9" * 16,
        "\xe9",
    ],
)
def test_malformed_timestamp_is_invalid_signature(hooks: Hooks, timestamp: str) -> None:
    verifier = make_verifier(hooks, secret=SECRET)
    headers = {"X-Slack-Signature": "v0=" + GOOD_HEX, "X-Slack-Request-Timestamp": timestamp}
    assert_rejected(verifier.verify(request(headers=headers)), "invalid_signature")


# --- defaults and the url_verification handshake -----------------------------------------------


def test_default_event_type_and_id_read_the_events_api_payload(hooks: Hooks) -> None:
    verifier = make_verifier(hooks, secret=SECRET)
    assert verifier.default_event_type == "body.event.type"
    assert verifier.default_event_id == "body.event_id"


def test_url_verification_is_answered_with_its_challenge(hooks: Hooks) -> None:
    verifier = make_verifier(hooks, secret=SECRET)
    # Slack's documented example of the request.
    body = (
        b'{"token":"Jhj5dZrVaK7ZwHHjRyZWjbDl",'
        b'"challenge":"3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P","type":"url_verification"}'
    )
    answer = verifier.handshake(request(body, sdk_headers(SECRET, body)))
    assert isinstance(answer, HandshakeResponse)
    assert answer.status == 200
    assert answer.content_type == "application/json"
    assert json.loads(answer.body) == {"challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"}


@pytest.mark.parametrize(
    "body",
    [
        BODY,
        DOCS_BODY,
        b"",
        b"\xff\xfe url_verification",
        b'{"type":"url_verification","challenge":"\xff"}',  # invalid UTF-8 inside a JSON string
        b'{"type":"url_verification"}',
        b'{"type":"url_verification","challenge":42}',
        b'["url_verification"]',
        b'{"type":"event_callback","challenge":"x","note":"url_verification"}',
        b"payload=%7B%22type%22%3A%22url_verification%22%7D",
        b'{"type":"url_verification","x":' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # too deep
    ],
)
def test_anything_else_is_not_a_handshake(hooks: Hooks, body: bytes) -> None:
    verifier = make_verifier(hooks, secret=SECRET)
    assert verifier.handshake(request(body)) is None


# --- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("block", "where", "word"),
    [
        (
            "type: slack\nsecret: s\ntolerance: 300\n",
            "x.yaml:6: $.sources.slack.verify.tolerance",
            "duration",
        ),
        (
            "type: slack\nsecret: s\ntolerance: 5 minutes\n",
            "x.yaml:6: $.sources.slack.verify.tolerance",
            "5 minutes",
        ),
        (
            "type: slack\nsecret: s\ntolerance: [5m]\n",
            "x.yaml:6: $.sources.slack.verify.tolerance",
            "expected",
        ),
        ("type: slack\nsecret: s\ntolerance: 0s\n", "x.yaml:3: $.sources.slack.verify", "more than 0"),
        ("type: slack\nsecret: s\nversion: v0\n", "x.yaml:6: $.sources.slack.verify.version", "unknown"),
        ("type: slack\ntolerance: 5m\n", "x.yaml:3: $.sources.slack.verify", "secret"),
        ('type: slack\nsecret: [a, ""]\n', "x.yaml:3: $.sources.slack.verify", "must not be empty"),
    ],
)
def test_bad_options_are_refused_with_file_line_and_path(
    hooks: Hooks, block: str, where: str, word: str
) -> None:
    assert_problem(load_error(hooks, nested("sources:\n  slack:\n    verify:\n", block, 6)), where, word)


# --- through the real gateway ------------------------------------------------------------------


def slack_config(nats_url: str, receiver_url: str) -> str:
    return base_config(
        nats_url,
        f"""
        sources:
          slack:
            verify: {{type: slack, secret: [{SECRET}, old-secret]}}
            response: {{status: 200, body: ""}}
          slack-interactive:
            verify: {{type: slack, secret: {SECRET}}}
            event_type: slack.interactive
            event_id: header.X-Slack-Signature
            response: {{status: 200, body: ""}}
        endpoints:
          bot:
            url: {receiver_url}/slack
            retry: {{schedule: [100ms]}}
        routes:
          - from: [slack, slack-interactive]
            types: [app_mention, slack.interactive]
            to: [bot]
        """,
    )


def signed_now(body: bytes, secret: str = SECRET, now: Callable[[], float] = time.time) -> dict[str, str]:
    return {**sdk_headers(secret, body, int(now())), "Content-Type": "application/json"}


async def test_signed_event_is_stored_once_per_event_id_and_forwarded_unchanged(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    other = BODY.replace(b"Ev01", b"Ev02")
    async with receiver() as rx, run_gateway(tmp_path, slack_config(nats_server.url, rx.url)) as gw:
        url = f"{gw.url}/webhooks/slack"
        first = await gw.http.post(url, content=BODY, headers=signed_now(BODY))
        # Slack's retry: the same event id, re-signed, with X-Slack-Retry-Num. Stored once.
        retry = await gw.http.post(url, content=BODY, headers={**signed_now(BODY), "X-Slack-Retry-Num": "1"})
        rotated = await gw.http.post(url, content=other, headers=signed_now(other, "old-secret"))
        got = await rx.wait_for(2)
        stored = await stored_events(nats_server.url)
    assert [r.status_code for r in (first, retry, rotated)] == [200, 200, 200]
    assert sorted(r.body for r in got) == sorted([BODY, other])
    event = next(r for r in got if r.body == BODY)
    assert event.headers["hookgate-event-id"] == event_id_for("slack", "Ev01")
    assert event.headers["x-slack-signature"].startswith("v0=")
    assert sorted((e.type, e.external_id) for e in stored) == [
        ("app_mention", "Ev01"),
        ("app_mention", "Ev02"),
    ]
    assert len(rx.requests) == 2


async def test_url_verification_is_answered_only_when_signed_and_never_stored(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    challenge = b'{"token":"t","challenge":"c-123","type":"url_verification"}'
    async with receiver() as rx, run_gateway(tmp_path, slack_config(nats_server.url, rx.url)) as gw:
        url = f"{gw.url}/webhooks/slack"
        unsigned = await gw.http.post(url, content=challenge, headers={"Content-Type": "application/json"})
        wrong = await gw.http.post(url, content=challenge, headers=signed_now(challenge, "wrong"))
        stale = await gw.http.post(
            url, content=challenge, headers=signed_now(challenge, now=lambda: time.time() - 600)
        )
        answered = await gw.http.post(url, content=challenge, headers=signed_now(challenge))
        # An event afterwards proves the pipeline was running while the challenge was not stored.
        event = await gw.http.post(url, content=BODY, headers=signed_now(BODY))
        (got,) = await rx.wait_for(1)
        stored = await stored_events(nats_server.url)
    assert_http_error(unsigned, 401, "missing_signature")
    assert_http_error(wrong, 401, "invalid_signature")
    assert_http_error(stale, 401, "timestamp_out_of_tolerance")
    assert answered.status_code == 200
    assert answered.headers["content-type"].startswith("application/json")
    assert answered.json() == {"challenge": "c-123"}
    assert event.status_code == 200
    assert got.body == BODY
    assert [e.external_id for e in stored] == ["Ev01"]


async def test_form_encoded_payloads_on_a_source_that_does_not_read_the_body(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    """Slash commands and interactivity are form-encoded: see the module docstring of the plugin."""
    form = DOCS_BODY
    headers = {**signed_now(form), "Content-Type": "application/x-www-form-urlencoded"}
    async with receiver() as rx, run_gateway(tmp_path, slack_config(nats_server.url, rx.url)) as gw:
        accepted = await gw.http.post(f"{gw.url}/webhooks/slack-interactive", content=form, headers=headers)
        (got,) = await rx.wait_for(1)
        # On the events source the signature passes too; the default body selectors find nothing
        # in a form post, so it is stored with the generic type rather than refused.
        events_source = await gw.http.post(f"{gw.url}/webhooks/slack", content=form, headers=headers)
        stored = await stored_events(nats_server.url)
    assert accepted.status_code == 200
    assert got.body == form
    assert got.headers["content-type"] == "application/x-www-form-urlencoded"
    assert [e.type for e in stored] == ["slack.interactive", "webhook"]
    assert 200 <= events_source.status_code < 300


async def test_a_signed_body_with_invalid_utf8_in_a_json_string_is_not_a_500(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    body = b'{"type":"event_callback","event_id":"Ev\xff","event":{"type":"app_mention"}}'
    timestamp = int(time.time())
    digest = hmac.new(SECRET.encode(), b"v0:%d:" % timestamp + body, hashlib.sha256).hexdigest()
    headers = {"X-Slack-Signature": "v0=" + digest, "X-Slack-Request-Timestamp": str(timestamp)}
    async with run_gateway(tmp_path, slack_config(nats_server.url, "http://127.0.0.1:9")) as gw:
        response = await gw.http.post(f"{gw.url}/webhooks/slack", content=body, headers=headers)
    assert response.status_code < 500
