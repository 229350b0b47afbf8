"""The `stripe` verifier, with Stripe's own SDK as the oracle, and once through the real gateway.

Headers are built with `stripe.WebhookSignature.generate_signature_header` (what Stripe's libraries
offer for signing test payloads), and `stripe.Webhook.construct_event` must agree with the verifier
on what is accepted and refused. The SDK reads the real clock, so agreement checks sign with the
current time; the rest inject a fixed clock into the verifier.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from pathlib import Path
from typing import Any

import pytest
import stripe

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
    the_problem,
)
from tests.support import NatsServer, base_config, receiver, run_gateway, stream_messages

SECRET = "whsec_" + base64.b64encode(b"stripe-test-secret-0123456789").decode()
OTHER = "whsec_" + base64.b64encode(b"another-secret-abcdefghijklmn").decode()
NOW = 1_700_000_000
BODY = (
    b'{\n  "id": "evt_1NG8Du2eZvKYlo2CUI79vXWy",\n  "object": "event",\n  "type": "invoice.paid",\n'
    b'  "data": {"object": {"amount_paid": 1200, "customer_name": "Zo\xc3\xab"}}\n}'
)


@pytest.fixture(scope="module")
def hooks() -> Hooks:
    return Hooks()


def make_verifier(hooks: Hooks, now: float | None = NOW, **options: Any) -> Any:
    """The verifier of `verify: {type: stripe, secret: SECRET, **options}`.

    `now` fixes the verifier's clock; None leaves it on the real one.
    """
    return load_verifier(hooks, "stripe", {"type": "stripe", "secret": SECRET, **options}, now=now)


def request(signature: str | None, body: bytes = BODY) -> IngressRequest:
    headers = [("content-type", "application/json; charset=utf-8")]
    if signature is not None:
        headers.append(("stripe-signature", signature))
    return ingress_request("stripe", headers=headers, body=body)


def v1(body: bytes, timestamp: int, secret: str = SECRET) -> str:
    """The v1 signature, computed here with `hmac` independently of the SDK and the plugin."""
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def sdk_header(body: bytes = BODY, timestamp: int = NOW, secret: str = SECRET) -> str:
    return stripe.WebhookSignature.generate_signature_header(body.decode(), secret, timestamp=timestamp)


def sdk_accepts(body: bytes, header: str, secret: str = SECRET) -> bool:
    try:
        stripe.Webhook.construct_event(body, header, secret)
    except stripe.SignatureVerificationError:
        return False
    return True


def assert_rejected(result: Rejection | None, code: str) -> None:
    # Messages are logged and returned to the caller: no secret, no expected signature in them.
    signatures = [v1(BODY, t, secret) for secret in (SECRET, OTHER) for t in (NOW, int(time.time()))]
    assert_rejection(result, 401, code, never=[SECRET, OTHER, *signatures])


# --- accepted, and agreement with the SDK --------------------------------------------------------


def test_a_header_from_the_sdk_is_accepted(hooks: Hooks) -> None:
    verifier = make_verifier(hooks)
    header = sdk_header()
    assert header == f"t={NOW},v1={v1(BODY, NOW)}"
    assert verifier.verify(request(header)) is None


def test_the_secret_is_used_as_given_not_base64_decoded(hooks: Hooks) -> None:
    verifier = make_verifier(hooks)
    decoded_key = base64.b64decode(SECRET.removeprefix("whsec_"))
    wrong = hmac.new(decoded_key, f"{NOW}.".encode() + BODY, hashlib.sha256).hexdigest()
    assert_rejected(verifier.verify(request(f"t={NOW},v1={wrong}")), "invalid_signature")


def header_cases(now: int) -> dict[str, tuple[bytes, str]]:
    """(body, Stripe-Signature) pairs around a valid signature made at `now`."""
    good = v1(BODY, now)
    return {
        "valid": (BODY, f"t={now},v1={good}"),
        "valid with a v0 signature too": (BODY, f"t={now},v1={good},v0={'0' * 64}"),
        "second of two v1 matches": (BODY, f"t={now},v1={v1(BODY, now, OTHER)},v1={good}"),
        "first of two v1 matches": (BODY, f"t={now},v1={good},v1={'ab' * 32}"),
        "v1 before t": (BODY, f"v1={good},t={now}"),
        "two t, the first signed": (BODY, f"t={now},v1={good},t={now - 1}"),
        "two t, the second signed": (BODY, f"t={now - 1},v1={good},t={now}"),
        "tampered body": (BODY.replace(b"1200", b"9200"), f"t={now},v1={good}"),
        "a byte appended": (BODY + b" ", f"t={now},v1={good}"),
        "wrong secret": (BODY, f"t={now},v1={v1(BODY, now, OTHER)}"),
        "timestamp changed": (BODY, f"t={now - 1},v1={good}"),
        "only v0": (BODY, f"t={now},v0={good}"),
        "uppercase hex": (BODY, f"t={now},v1={good.upper()}"),
        "spaces after commas": (BODY, f"t={now}, v1={good}"),
        "truncated": (BODY, f"t={now},v1={good[:-2]}"),
        "no t": (BODY, f"v1={good}"),
        "no v1": (BODY, f"t={now}"),
    }


@pytest.mark.parametrize("case", list(header_cases(NOW)))
def test_the_verifier_agrees_with_stripe_construct_event(hooks: Hooks, case: str) -> None:
    now = int(time.time())
    body, header = header_cases(now)[case]
    verifier = make_verifier(hooks, now=None)
    ours = verifier.verify(request(header, body))
    theirs = sdk_accepts(body, header)
    assert (ours is None) == theirs, f"{case}: verifier said {ours!r}, stripe accepts: {theirs}"
    if ours is not None:
        assert_rejected(ours, "invalid_signature")


def test_every_v1_is_tried_and_other_schemes_are_ignored(hooks: Hooks) -> None:
    verifier = make_verifier(hooks)
    good = v1(BODY, NOW)
    header = f"t={NOW},v0={'f' * 64},v1={'0' * 64},v2=whatever,v1={good},v1={'1' * 64}"
    assert verifier.verify(request(header)) is None


# --- rotation ------------------------------------------------------------------------------------


def test_any_secret_of_a_rotation_list_is_accepted(hooks: Hooks) -> None:
    verifier = make_verifier(hooks, secret=[OTHER, SECRET])
    assert verifier.verify(request(sdk_header(secret=SECRET))) is None
    assert verifier.verify(request(sdk_header(secret=OTHER))) is None
    retired = "whsec_retired"
    assert_rejected(verifier.verify(request(sdk_header(secret=retired))), "invalid_signature")


def test_a_rolled_secret_header_with_two_signatures_passes_either_side(hooks: Hooks) -> None:
    # While an endpoint secret is rolled, Stripe signs with both: one v1 per secret.
    header = f"t={NOW},v1={v1(BODY, NOW, OTHER)},v1={v1(BODY, NOW, SECRET)}"
    assert make_verifier(hooks, secret=SECRET).verify(request(header)) is None
    assert make_verifier(hooks, secret=OTHER).verify(request(header)) is None
    assert_rejected(make_verifier(hooks, secret="whsec_x").verify(request(header)), "invalid_signature")


# --- timestamps ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("age", "accepted"),
    [(0, True), (300, True), (-300, True), (301, False), (-301, False), (86_400, False), (-86_400, False)],
)
def test_the_default_tolerance_is_five_minutes_either_way(hooks: Hooks, age: int, accepted: bool) -> None:
    verifier = make_verifier(hooks)
    result = verifier.verify(request(sdk_header(timestamp=NOW - age)))
    if accepted:
        assert result is None
    else:
        assert_rejected(result, "timestamp_out_of_tolerance")


def test_the_tolerance_is_configurable(hooks: Hooks) -> None:
    verifier = make_verifier(hooks, tolerance="10s")
    assert verifier.verify(request(sdk_header(timestamp=NOW - 10))) is None
    assert_rejected(verifier.verify(request(sdk_header(timestamp=NOW - 11))), "timestamp_out_of_tolerance")
    assert_rejected(verifier.verify(request(sdk_header(timestamp=NOW + 11))), "timestamp_out_of_tolerance")
    lenient = make_verifier(hooks, tolerance="1h")
    assert lenient.verify(request(sdk_header(timestamp=NOW - 3000))) is None


def test_a_stale_request_with_a_bad_signature_is_invalid_not_stale(hooks: Hooks) -> None:
    verifier = make_verifier(hooks)
    header = f"t={NOW - 3600},v1={v1(BODY, NOW - 3600, OTHER)}"
    assert_rejected(verifier.verify(request(header)), "invalid_signature")


def test_the_sdk_refuses_the_stale_request_too(hooks: Hooks) -> None:
    stale = int(time.time()) - 600
    header = sdk_header(timestamp=stale)
    assert not sdk_accepts(BODY, header)
    assert_rejected(make_verifier(hooks, now=None).verify(request(header)), "timestamp_out_of_tolerance")


# --- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, "", "   "])
def test_a_missing_or_empty_header_is_missing_signature(hooks: Hooks, value: str | None) -> None:
    assert_rejected(make_verifier(hooks).verify(request(value)), "missing_signature")


GOOD = v1(BODY, NOW)


@pytest.mark.parametrize(
    "value",
    [
        "garbage",
        ",,,,",
        "=",
        "t",
        "t=",
        f"v1={GOOD}",
        f"t={NOW}",
        f"t={NOW},v1=",
        f"t=,v1={GOOD}",
        f"t=abc,v1={GOOD}",
        f"t=-{NOW},v1={GOOD}",
        f"t={NOW}.5,v1={GOOD}",
        f"t={'9' * 5000},v1={GOOD}",
        f"t={NOW},v1={'zz' * 32}",
        f"t={NOW},v1=0x{GOOD[2:]}",
        f"t={NOW},v1= {GOOD}",
        f"t={NOW},v1={'é' * 64}",
        "t=" + "\u0661\u0667" + "\u0660" * 8 + f",v1={GOOD}",  # Arabic-Indic digits
        f"t={NOW},v1={GOOD[:-1]}é",
        "t=" + str(NOW) + ",v1=" + "a" * 100_000,
        f"t={NOW}," + ",".join(["v0=" + "0" * 64] * 2000) + f",v1={GOOD}",
        "\x00\x01\x02",
        "t=\udcff",
    ],
)
def test_a_malformed_header_is_invalid_signature_never_an_error(hooks: Hooks, value: str) -> None:
    assert_rejected(make_verifier(hooks).verify(request(value)), "invalid_signature")


def test_a_non_utf8_body_is_refused_or_verified_on_its_bytes_never_an_error(hooks: Hooks) -> None:
    verifier = make_verifier(hooks)
    body = b'{"id": "evt_x", "type": "\xff\xfe"}'
    assert_rejected(verifier.verify(request(sdk_header(), body)), "invalid_signature")
    assert_rejected(verifier.verify(request("garbage", body)), "invalid_signature")
    # Signed over its raw bytes, it verifies (the SDK could not even decode it).
    assert verifier.verify(request(f"t={NOW},v1={v1(body, NOW)}", body)) is None


def test_the_defaults_read_type_and_id_from_the_body(hooks: Hooks) -> None:
    verifier = make_verifier(hooks)
    assert verifier.default_event_type == "body.type"
    assert verifier.default_event_id == "body.id"


# --- config --------------------------------------------------------------------------------------


def config_error(hooks: Hooks, verify_block: str) -> str:
    return the_problem(load_error(hooks, nested("sources:\n  stripe:\n    verify:\n", verify_block, 6)))


@pytest.mark.parametrize(
    ("block", "where", "word"),
    [
        (
            "type: stripe\nsecret: whsec_a\ntolerance: 5 minutes\n",
            "x.yaml:6: $.sources.stripe.verify.tolerance",
            "duration",
        ),
        (
            "type: stripe\nsecret: whsec_a\ntolerance: 300\n",
            "x.yaml:6: $.sources.stripe.verify.tolerance",
            "duration",
        ),
        (
            "type: stripe\nsecret: whsec_a\ntolerence: 5m\n",
            "x.yaml:6: $.sources.stripe.verify.tolerence",
            "tolerance",
        ),
        ("type: stripe\nsecret: ''\n", "x.yaml:5: $.sources.stripe.verify.secret", "length"),
        ("type: stripe\nsecret: []\n", "x.yaml:5: $.sources.stripe.verify.secret", "length"),
        ("type: stripe\nsecret: [whsec_a, '']\n", "x.yaml:5: $.sources.stripe.verify.secret[1]", "length"),
        ("type: stripe\nsecret: {a: b}\n", "x.yaml:5: $.sources.stripe.verify.secret", "string"),
        ("type: stripe\n", "x.yaml:3: $.sources.stripe.verify", "secret"),
        ("type: stripe\nsecret: whsec_a\ntolerance: 0s\n", "x.yaml:3: $.sources.stripe.verify", "tolerance"),
    ],
)
def test_bad_options_are_refused_with_file_line_and_path(
    hooks: Hooks, block: str, where: str, word: str
) -> None:
    assert_problem(config_error(hooks, block), where, word)


def test_an_unset_secret_variable_is_named(hooks: Hooks) -> None:
    problem = config_error(hooks, 'type: stripe\nsecret: "${STRIPE_WEBHOOK_SECRET}"\n')
    assert problem.startswith("x.yaml:5: $.sources.stripe.verify.secret: ")
    assert "STRIPE_WEBHOOK_SECRET" in problem


# --- through the gateway -------------------------------------------------------------------------


def gateway_config(nats_url: str, receiver_url: str) -> str:
    return base_config(
        nats_url,
        f"""
        sources:
          stripe:
            verify: {{type: stripe, secret: "{SECRET}"}}
        endpoints:
          billing:
            url: {receiver_url}/stripe
            retry: {{schedule: [100ms]}}
        routes:
          - from: [stripe]
            types: ["invoice.*"]
            to: [billing]
        """,
    )


def event_body(event_id: str, type_: str = "invoice.paid") -> bytes:
    return (
        b'{"id": "' + event_id.encode() + b'", "object": "event", "type": "' + type_.encode() + b'",\n'
        b' "data": {"object": {"amount_paid": 1200, "note": "caf\xc3\xa9"}}}'
    )


async def test_through_the_gateway_signed_once_stored_once_and_forged_refused(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    first, second = event_body("evt_first"), event_body("evt_second", "invoice.created")
    async with receiver() as rx, run_gateway(tmp_path, gateway_config(nats_server.url, rx.url)) as gw:
        url = f"{gw.url}/webhooks/stripe"

        async def post(body: bytes, header: str) -> Any:
            return await gw.http.post(
                url, content=body, headers={"Stripe-Signature": header, "Content-Type": "application/json"}
            )

        forged = await post(first, f"t={int(time.time())},v1={v1(first, int(time.time()), OTHER)}")
        assert_http_error(forged, 401, "invalid_signature")
        assert await stream_messages(nats_server.url, "HOOKGATE_EVENTS") == []

        accepted = await post(first, sdk_header(first, int(time.time())))
        # Stripe retries the same event with a fresh signature: answered 2xx, not stored again.
        retried = await post(first, sdk_header(first, int(time.time()) - 1))
        other = await post(second, sdk_header(second, int(time.time())))
        assert [r.status_code for r in (accepted, retried, other)] == [202, 202, 202]
        assert accepted.json()["id"] == retried.json()["id"] != other.json()["id"]

        got = await rx.wait_for(2)
        stored = await stream_messages(nats_server.url, "HOOKGATE_EVENTS")
    assert len(stored) == 2
    assert sorted(r.body for r in got) == sorted([first, second])
    assert len(rx.requests) == 2
    for received in got:
        assert sdk_accepts(received.body, received.headers["stripe-signature"])
        assert received.headers["hookgate-source"] == "stripe"
