"""The `standard-webhooks` and `svix` ingress verifiers, with the providers' own SDKs as oracles.

Requests are signed with `standardwebhooks.webhooks.Webhook(secret).sign` and
`svix.webhooks.Webhook(secret).sign`, v1a (ed25519) signatures with `cryptography`, and the
SDKs' `verify` must agree with the verifiers on what is accepted and refused, except where a
difference is deliberate (listed and asserted below). The SDKs read the real clock, so agreement
checks sign with the current time; everything else injects a fixed clock into the verifier.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import standardwebhooks.webhooks
import svix.webhooks
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from hookgate.config import json_schema
from hookgate.plugin_host.hooks import Hooks
from hookgate.types import IngressRequest, Rejection
from tests.plugin_support import (
    ENDPOINT,
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

# The Standard Webhooks specification's published test vector (also in Svix's docs).
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TIMESTAMP = 1614265330
SPEC_BODY = b'{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="

SECRET = "whsec_" + base64.b64encode(b"hookgate-standard-webhooks-0123").decode()
OTHER = "whsec_" + base64.b64encode(os.urandom(32)).decode()
NOW = 1_700_000_000
MSG_ID = "msg_2bTNYpPm6kEnrLd3wh8EZUSsdSg"
BODY = (
    b'{"type": "invoice.paid",\n "timestamp": "2024-05-01T12:00:00.000Z",\n'
    b' "data": {"amount": 1200, "who": "Zo\xc3\xab"}}'
)

PRIVATE = Ed25519PrivateKey.generate()
OTHER_PRIVATE = Ed25519PrivateKey.generate()


def whpk(private: Ed25519PrivateKey) -> str:
    raw = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return "whpk_" + base64.b64encode(raw).decode()


PUBLIC = whpk(PRIVATE)
OTHER_PUBLIC = whpk(OTHER_PRIVATE)

FAMILIES = {"standard-webhooks": "webhook", "svix": "svix"}


@pytest.fixture(scope="module")
def hooks() -> Hooks:
    return Hooks()


def make_verifier(
    hooks: Hooks, type_: str = "standard-webhooks", now: float | None = NOW, **options: Any
) -> Any:
    """Load a source with `verify: {type: type_, **options}` and build its verifier as ingress does.

    Without options the secret is SECRET; `now` fixes the verifier's clock (None: the real one).
    """
    return load_verifier(hooks, "acme", {"type": type_, **(options or {"secret": SECRET})}, now=now)


def headers_for(
    signature: str | None,
    msg_id: str | None = MSG_ID,
    timestamp: int | str | None = NOW,
    family: str = "webhook",
) -> dict[str, str]:
    out = {"content-type": "application/json"}
    for name, value in (("id", msg_id), ("timestamp", timestamp), ("signature", signature)):
        if value is not None:
            out[f"{family}-{name}"] = str(value)
    return out


def request(headers: dict[str, str], body: bytes = BODY) -> IngressRequest:
    return ingress_request("acme", headers=headers, body=body)


def sdk_sign(secret: str = SECRET, msg_id: str = MSG_ID, timestamp: int = NOW, body: bytes = BODY) -> str:
    """What the Standard Webhooks SDK sends as `webhook-signature`."""
    sent_at = datetime.fromtimestamp(timestamp, UTC)
    return standardwebhooks.webhooks.Webhook(secret).sign(msg_id, sent_at, body.decode())


def svix_sign(secret: str = SECRET, msg_id: str = MSG_ID, timestamp: int = NOW, body: bytes = BODY) -> str:
    """What Svix's SDK sends as `svix-signature`."""
    return svix.webhooks.Webhook(secret).sign(msg_id, datetime.fromtimestamp(timestamp, UTC), body.decode())


def v1(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """A v1 signature computed here with `hmac`, independently of the SDKs and the plugin."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def v1a(
    private: Ed25519PrivateKey = PRIVATE, msg_id: str = MSG_ID, timestamp: int = NOW, body: bytes = BODY
) -> str:
    """A v1a signature: ed25519 over `{id}.{timestamp}.{body}`, as the spec's libraries make it."""
    return "v1a," + base64.b64encode(private.sign(f"{msg_id}.{timestamp}.".encode() + body)).decode()


def sdk_accepts(type_: str, body: bytes, headers: dict[str, str], secret: str = SECRET) -> bool:
    """The SDK's verdict. Malformed signature entries make the SDK raise ValueError: a refusal."""
    webhook = (
        standardwebhooks.webhooks.Webhook(secret)
        if type_ == "standard-webhooks"
        else svix.webhooks.Webhook(secret)
    )
    try:
        webhook.verify(body, headers)
    except (standardwebhooks.webhooks.WebhookVerificationError, ValueError):
        return False
    return True


def assert_rejected(result: Rejection | None, code: str) -> None:
    # Messages are logged and returned to the caller: no secret, no expected signature in them.
    never = []
    for secret in (SECRET, OTHER, SPEC_SECRET):
        never += [secret, secret.removeprefix("whsec_")]
        never += [v1(secret, MSG_ID, t, BODY).removeprefix("v1,") for t in (NOW, int(time.time()))]
    assert_rejection(result, 401, code, never=never)


# --- accepted: the spec's vector and the SDKs' signatures -----------------------------------------


def test_the_sdk_reproduces_the_spec_test_vector() -> None:
    assert sdk_sign(SPEC_SECRET, SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY) == SPEC_SIGNATURE
    assert svix_sign(SPEC_SECRET, SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY) == SPEC_SIGNATURE
    assert v1(SPEC_SECRET, SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY) == SPEC_SIGNATURE


@pytest.mark.parametrize("type_", list(FAMILIES))
def test_the_spec_test_vector_verifies_with_a_fixed_clock(hooks: Hooks, type_: str) -> None:
    headers = headers_for(SPEC_SIGNATURE, SPEC_ID, SPEC_TIMESTAMP, FAMILIES[type_])
    for age in (0, 299, -299):
        verifier = make_verifier(hooks, type_, now=SPEC_TIMESTAMP + age, secret=SPEC_SECRET)
        assert verifier.verify(request(headers, SPEC_BODY)) is None
    # The secret without its prefix is the same key.
    verifier = make_verifier(hooks, type_, now=SPEC_TIMESTAMP, secret=SPEC_SECRET.removeprefix("whsec_"))
    assert verifier.verify(request(headers, SPEC_BODY)) is None
    # One byte of the body changed, or the real clock: refused.
    verifier = make_verifier(hooks, type_, now=SPEC_TIMESTAMP, secret=SPEC_SECRET)
    assert_rejected(verifier.verify(request(headers, b'{"test": 2432232315}')), "invalid_signature")
    verifier = make_verifier(hooks, type_, now=None, secret=SPEC_SECRET)
    assert_rejected(verifier.verify(request(headers, SPEC_BODY)), "timestamp_out_of_tolerance")


BODIES = [
    BODY,
    b"{}",
    b"",
    b'{"data": [1, 2, 3],\n "spaces" :  true}\n',
    '{"emoji": "\U0001f600", "ids": "msg_1.1614265330."}'.encode(),
]


@pytest.mark.parametrize("body", BODIES)
def test_a_request_signed_by_the_standardwebhooks_sdk_is_accepted(hooks: Hooks, body: bytes) -> None:
    verifier = make_verifier(hooks)
    signature = sdk_sign(body=body)
    assert signature == v1(SECRET, MSG_ID, NOW, body)
    assert verifier.verify(request(headers_for(signature), body)) is None


@pytest.mark.parametrize("body", BODIES)
def test_a_request_signed_by_the_svix_sdk_is_accepted(hooks: Hooks, body: bytes) -> None:
    verifier = make_verifier(hooks, "svix")
    signature = svix_sign(body=body)
    assert verifier.verify(request(headers_for(signature, family="svix"), body)) is None


def test_header_names_are_matched_case_insensitively(hooks: Hooks) -> None:
    headers = {"Webhook-Id": MSG_ID, "WEBHOOK-TIMESTAMP": str(NOW), "Webhook-Signature": sdk_sign()}
    assert make_verifier(hooks).verify(request(headers)) is None


# --- agreement with the SDKs ----------------------------------------------------------------------


def cases(now: int) -> dict[str, tuple[bytes, dict[str, Any]]]:
    """(body, header values) pairs around a valid SDK signature made at `now`."""
    good = sdk_sign(timestamp=now)
    b64 = good.removeprefix("v1,")
    wrong = sdk_sign(OTHER, timestamp=now)

    def h(signature: str | None = good, **kw: Any) -> dict[str, Any]:
        return {"signature": signature, "id": MSG_ID, "timestamp": now, **kw}

    return {
        "valid": (BODY, h()),
        "second of two matches (sender rotating)": (BODY, h(f"{wrong} {good}")),
        "first of two matches": (BODY, h(f"{good} {wrong}")),
        "with an unknown version": (BODY, h(f"v2,{b64} {good}")),
        "with a v1a the secret cannot check": (BODY, h(f"{v1a(timestamp=now)} {good}")),
        "tampered body": (BODY.replace(b"1200", b"9200"), h()),
        "a byte appended": (BODY + b" ", h()),
        "wrong secret": (BODY, h(wrong)),
        "another id": (BODY, h(id="msg_other")),
        "timestamp changed": (BODY, h(timestamp=now - 1)),
        "four minutes old": (BODY, h(sdk_sign(timestamp=now - 240), timestamp=now - 240)),
        "four minutes ahead": (BODY, h(sdk_sign(timestamp=now + 240), timestamp=now + 240)),
        "six minutes old": (BODY, h(sdk_sign(timestamp=now - 360), timestamp=now - 360)),
        "six minutes ahead": (BODY, h(sdk_sign(timestamp=now + 360), timestamp=now + 360)),
        "a day old": (BODY, h(sdk_sign(timestamp=now - 86_400), timestamp=now - 86_400)),
        "unknown version only": (BODY, h(f"v2,{b64}")),
        "v1a only": (BODY, h(v1a(timestamp=now))),
        "version in capitals": (BODY, h(f"V1,{b64}")),
        "truncated": (BODY, h(good[:-4])),
        "no signature": (BODY, h(None)),
        "empty signature": (BODY, h("")),
        "no id": (BODY, h(id=None)),
        "empty id": (BODY, h(id="")),
        "no timestamp": (BODY, h(timestamp=None)),
        "timestamp not a number": (BODY, h(timestamp="soon")),
        "zero signature": (BODY, h("v1," + base64.b64encode(bytes(32)).decode())),
        "the timestamp in milliseconds": (
            BODY,
            h(v1(SECRET, MSG_ID, now * 1000, BODY), timestamp=now * 1000),
        ),
    }


@pytest.mark.parametrize("type_", list(FAMILIES))
@pytest.mark.parametrize("case", list(cases(NOW)))
def test_the_verifiers_agree_with_the_sdks(hooks: Hooks, type_: str, case: str) -> None:
    now = int(time.time())
    body, values = cases(now)[case]
    headers = headers_for(values["signature"], values["id"], values["timestamp"], FAMILIES[type_])
    ours = make_verifier(hooks, type_, now=None).verify(request(headers, body))
    theirs = sdk_accepts(type_, body, headers)
    assert (ours is None) == theirs, f"{case}: verifier said {ours!r}, the {type_} SDK accepts: {theirs}"
    if ours is not None:
        assert ours.status == 401
        assert ours.code in ("missing_signature", "invalid_signature", "timestamp_out_of_tolerance")


# Where the verifiers are deliberately stricter than the SDKs (which accept these) or accept what
# the SDKs cannot check (v1a, which the Python SDKs skip); each difference is asserted both ways.


def lenient_sdk_cases(now: int) -> dict[str, tuple[dict[str, str], str]]:
    good = sdk_sign(timestamp=now)
    return {
        # float() takes these; the signature covers floor(timestamp), not the header as sent.
        "fractional timestamp": (headers_for(good, timestamp=f"{now}.9"), "invalid_signature"),
        "timestamp with a plus sign": (headers_for(good, timestamp=f"+{now}"), "invalid_signature"),
        "timestamp with spaces": (headers_for(good, timestamp=f" {now} "), "invalid_signature"),
        "timestamp in exponent form": (headers_for(good, timestamp=f"{now}e0"), "invalid_signature"),
        # b64decode without validation drops characters outside the alphabet, and padding it lacks.
        "junk after the base64": (headers_for(good + "!!", timestamp=now), "invalid_signature"),
        "a huge list with a match at the end": (
            headers_for(" ".join([sdk_sign(OTHER, timestamp=now)] * 100 + [good]), timestamp=now),
            "invalid_signature",
        ),
        "seventeen signatures, one matching": (
            headers_for(" ".join([sdk_sign(OTHER, timestamp=now)] * 16 + [good]), timestamp=now),
            "invalid_signature",
        ),
    }


@pytest.mark.parametrize("case", list(lenient_sdk_cases(NOW)))
def test_deliberately_stricter_than_the_sdk(hooks: Hooks, case: str) -> None:
    now = int(time.time())
    headers, code = lenient_sdk_cases(now)[case]
    assert sdk_accepts("standard-webhooks", BODY, headers), case
    assert_rejected(make_verifier(hooks, now=None).verify(request(headers)), code)


def test_deliberately_more_accepting_than_the_sdk(hooks: Hooks) -> None:
    now = int(time.time())
    good = sdk_sign(timestamp=now)
    # v1a: the Python SDKs skip it; with a public key configured it verifies here.
    signed_v1a = headers_for(v1a(timestamp=now), timestamp=now)
    assert not sdk_accepts("standard-webhooks", BODY, signed_v1a)
    assert (
        make_verifier(hooks, now=None, secret=SECRET, public_key=PUBLIC).verify(request(signed_v1a)) is None
    )
    # Two spaces between entries make the SDK raise; here empty entries are skipped.
    double_space = headers_for(f"{sdk_sign(OTHER, timestamp=now)}  {good}", timestamp=now)
    with pytest.raises(ValueError):
        standardwebhooks.webhooks.Webhook(SECRET).verify(BODY, double_space)
    assert make_verifier(hooks, now=None).verify(request(double_space)) is None


def test_svix_accepts_only_its_own_header_names(hooks: Hooks) -> None:
    """The svix SDK falls back to `webhook-*` headers (white-labelled Svix); the `svix` type does not.

    Such a sender is a plain Standard Webhooks sender: `type: standard-webhooks` verifies it and
    reads its `webhook-id` as the event id. The refusal says so.
    """
    now = int(time.time())
    assert sdk_accepts("svix", BODY, headers_for(svix_sign(timestamp=now), timestamp=now, family="webhook"))
    signature = svix_sign()
    unbranded = headers_for(signature, family="webhook")
    result = make_verifier(hooks, "svix").verify(request(unbranded))
    assert_rejected(result, "missing_signature")
    assert result is not None
    assert "svix-id, svix-timestamp, svix-signature" in result.message
    assert "standard-webhooks" in result.message
    assert make_verifier(hooks, "standard-webhooks").verify(request(unbranded)) is None
    # And the other way round.
    branded = headers_for(signature, family="svix")
    result = make_verifier(hooks, "standard-webhooks").verify(request(branded))
    assert_rejected(result, "missing_signature")
    assert result is not None
    assert "type svix" in result.message
    # Both families present (a sender that sends both): each type reads its own.
    both = {**branded, **headers_for(signature, family="webhook")}
    assert make_verifier(hooks, "svix").verify(request(both)) is None
    assert make_verifier(hooks, "standard-webhooks").verify(request(both)) is None


# --- v1a: ed25519 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("type_", list(FAMILIES))
def test_a_v1a_signature_verifies_with_the_public_key(hooks: Hooks, type_: str) -> None:
    family = FAMILIES[type_]
    verifier = make_verifier(hooks, type_, public_key=PUBLIC)
    assert verifier.verify(request(headers_for(v1a(), family=family))) is None
    # Without the prefix, the same key.
    bare = make_verifier(hooks, type_, public_key=PUBLIC.removeprefix("whpk_"))
    assert bare.verify(request(headers_for(v1a(), family=family))) is None


@pytest.mark.parametrize(
    ("signature", "body", "msg_id", "timestamp"),
    [
        pytest.param(v1a(OTHER_PRIVATE), BODY, MSG_ID, NOW, id="another key"),
        pytest.param(v1a(), BODY + b" ", MSG_ID, NOW, id="tampered body"),
        pytest.param(v1a(), BODY, "msg_other", NOW, id="another id"),
        pytest.param(v1a(), BODY, MSG_ID, NOW + 1, id="another timestamp"),
        pytest.param("v1a," + base64.b64encode(bytes(64)).decode(), BODY, MSG_ID, NOW, id="zero signature"),
        pytest.param("v1" + v1a().removeprefix("v1a"), BODY, MSG_ID, NOW, id="labelled v1"),
    ],
)
def test_a_v1a_signature_from_another_key_or_for_other_content_is_refused(
    hooks: Hooks, signature: str, body: bytes, msg_id: str, timestamp: int
) -> None:
    verifier = make_verifier(hooks, public_key=PUBLIC)
    assert_rejected(
        verifier.verify(request(headers_for(signature, msg_id, timestamp), body)), "invalid_signature"
    )


def test_public_keys_rotate_like_secrets(hooks: Hooks) -> None:
    verifier = make_verifier(hooks, public_key=[OTHER_PUBLIC, PUBLIC])
    assert verifier.verify(request(headers_for(v1a(PRIVATE)))) is None
    assert verifier.verify(request(headers_for(v1a(OTHER_PRIVATE)))) is None
    retired = Ed25519PrivateKey.generate()
    assert_rejected(verifier.verify(request(headers_for(v1a(retired)))), "invalid_signature")
    # A sender mid-rotation sends one signature per key: either side verifies it.
    both = headers_for(f"{v1a(retired)} {v1a(PRIVATE)}")
    assert make_verifier(hooks, public_key=PUBLIC).verify(request(both)) is None


def test_secret_and_public_key_together_accept_either_kind(hooks: Hooks) -> None:
    verifier = make_verifier(hooks, secret=SECRET, public_key=PUBLIC)
    assert verifier.verify(request(headers_for(sdk_sign()))) is None
    assert verifier.verify(request(headers_for(v1a()))) is None
    assert verifier.verify(request(headers_for(f"{v1a(OTHER_PRIVATE)} {sdk_sign()}"))) is None
    assert verifier.verify(request(headers_for(f"{sdk_sign(OTHER)} {v1a()}"))) is None
    refused = verifier.verify(request(headers_for(f"{sdk_sign(OTHER)} {v1a(OTHER_PRIVATE)}")))
    assert_rejected(refused, "invalid_signature")


def test_a_signature_kind_nothing_is_configured_for_is_refused_and_named(hooks: Hooks) -> None:
    only_v1a = make_verifier(hooks, secret=SECRET).verify(request(headers_for(v1a())))
    assert_rejected(only_v1a, "invalid_signature")
    assert only_v1a is not None and "public_key" in only_v1a.message
    only_v1 = make_verifier(hooks, public_key=PUBLIC).verify(request(headers_for(sdk_sign())))
    assert_rejected(only_v1, "invalid_signature")
    assert only_v1 is not None and "secret" in only_v1.message


# --- rotation of secrets --------------------------------------------------------------------------


@pytest.mark.parametrize("type_", list(FAMILIES))
def test_any_secret_of_a_rotation_list_is_accepted(hooks: Hooks, type_: str) -> None:
    family = FAMILIES[type_]
    verifier = make_verifier(hooks, type_, secret=[OTHER, SECRET])
    assert verifier.verify(request(headers_for(sdk_sign(SECRET), family=family))) is None
    assert verifier.verify(request(headers_for(sdk_sign(OTHER), family=family))) is None
    retired = "whsec_" + base64.b64encode(os.urandom(24)).decode()
    assert_rejected(
        verifier.verify(request(headers_for(sdk_sign(retired), family=family))), "invalid_signature"
    )


def test_a_rotating_senders_header_passes_with_either_secret(hooks: Hooks) -> None:
    header = f"{sdk_sign(OTHER)} {sdk_sign(SECRET)}"
    assert make_verifier(hooks, secret=SECRET).verify(request(headers_for(header))) is None
    assert make_verifier(hooks, secret=OTHER).verify(request(headers_for(header))) is None
    assert_rejected(
        make_verifier(hooks, secret=SPEC_SECRET).verify(request(headers_for(header))), "invalid_signature"
    )


# --- timestamps -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("age", "accepted"),
    [(0, True), (300, True), (-300, True), (301, False), (-301, False), (86_400, False), (-86_400, False)],
)
@pytest.mark.parametrize("type_", list(FAMILIES))
def test_the_default_tolerance_is_five_minutes_either_way(
    hooks: Hooks, type_: str, age: int, accepted: bool
) -> None:
    ts = NOW - age
    result = make_verifier(hooks, type_).verify(
        request(headers_for(sdk_sign(timestamp=ts), timestamp=ts, family=FAMILIES[type_]))
    )
    if accepted:
        assert result is None
    else:
        assert_rejected(result, "timestamp_out_of_tolerance")
        assert result is not None
        assert ("old" if age > 0 else "future") in result.message


def test_the_tolerance_is_configurable(hooks: Hooks) -> None:
    strict = make_verifier(hooks, secret=SECRET, tolerance="10s")
    for ts, code in (
        (NOW - 10, None),
        (NOW - 11, "timestamp_out_of_tolerance"),
        (NOW + 11, "timestamp_out_of_tolerance"),
    ):
        result = strict.verify(request(headers_for(sdk_sign(timestamp=ts), timestamp=ts)))
        if code is None:
            assert result is None
        else:
            assert_rejected(result, code)
    lenient = make_verifier(hooks, secret=SECRET, tolerance="1h")
    assert lenient.verify(request(headers_for(sdk_sign(timestamp=NOW - 3000), timestamp=NOW - 3000))) is None


def test_a_stale_request_with_a_bad_signature_is_invalid_not_stale(hooks: Hooks) -> None:
    ts = NOW - 3600
    result = make_verifier(hooks).verify(request(headers_for(sdk_sign(OTHER, timestamp=ts), timestamp=ts)))
    assert_rejected(result, "invalid_signature")


def test_a_stale_v1a_request_is_out_of_tolerance(hooks: Hooks) -> None:
    ts = NOW - 3600
    result = make_verifier(hooks, public_key=PUBLIC).verify(
        request(headers_for(v1a(timestamp=ts), timestamp=ts))
    )
    assert_rejected(result, "timestamp_out_of_tolerance")


def test_leading_zeros_in_the_timestamp_are_signed_as_the_integer(hooks: Hooks) -> None:
    # The SDKs sign str(int(timestamp)); a header "01700000000" is the same moment and signature.
    headers = headers_for(sdk_sign(), timestamp="0" + str(NOW))
    assert make_verifier(hooks).verify(request(headers)) is None


# --- refusals: missing and malformed headers ------------------------------------------------------


@pytest.mark.parametrize("type_", list(FAMILIES))
@pytest.mark.parametrize(
    ("drop", "named"),
    [
        ({"signature": None}, ["signature"]),
        ({"signature": ""}, ["signature"]),
        ({"id": None}, ["id"]),
        ({"id": ""}, ["id"]),
        ({"timestamp": None}, ["timestamp"]),
        ({"timestamp": ""}, ["timestamp"]),
        ({"id": None, "timestamp": None, "signature": None}, ["id", "timestamp", "signature"]),
    ],
)
def test_a_missing_or_empty_header_is_missing_signature(
    hooks: Hooks, type_: str, drop: dict[str, str | None], named: list[str]
) -> None:
    family = FAMILIES[type_]
    values: dict[str, Any] = {"signature": sdk_sign(), "msg_id": MSG_ID, "timestamp": NOW}
    values.update({("msg_id" if k == "id" else k): v for k, v in drop.items()})
    result = make_verifier(hooks, type_).verify(request(headers_for(family=family, **values)))
    assert_rejected(result, "missing_signature")
    assert result is not None
    for name in named:
        assert f"{family}-{name}" in result.message


GOOD = sdk_sign()
GOOD_B64 = GOOD.removeprefix("v1,")


@pytest.mark.parametrize(
    "signature",
    [
        " ",
        "   ",
        "garbage",
        "v1",
        "v1,",
        ",",
        ",,,",
        f",{GOOD_B64}",
        f"v1 {GOOD_B64}",
        f"v1;{GOOD_B64}",
        f"v1={GOOD_B64}",
        f"v1,{GOOD_B64},extra",
        f"v1,,{GOOD_B64}",
        f"v1,{GOOD_B64.rstrip('=')}",
        f"v1,{GOOD_B64}=",
        f"v1,{GOOD_B64[:-2]}é=",
        f"v1,{GOOD_B64.replace('+', '-').replace('/', '_')}"
        if ("+" in GOOD_B64 or "/" in GOOD_B64)
        else "v1,-_-_",
        f"v1, {GOOD_B64}",
        f"v1,{GOOD_B64}\tv1,{GOOD_B64}",
        f"v2,{GOOD_B64}",
        f"v1a,{GOOD_B64}",
        f"v1b,{GOOD_B64} v0,{GOOD_B64} whsec,{GOOD_B64}",
        "v1," + base64.b64encode(os.urandom(64)).decode(),
        "v1a," + base64.b64encode(os.urandom(32)).decode(),
        "v1," + "A" * 100_000,
        " ".join([f"v2,{GOOD_B64}"] * 200),
        " ".join(["v1," + base64.b64encode(os.urandom(32)).decode()] * 17),
        "\x00\x01\x02",
        "v1,\udcff" + GOOD_B64[1:],
        "v1,\uff21\uff22\uff23" + GOOD_B64[3:],  # fullwidth letters
        "é" * 5000,
    ],
)
@pytest.mark.parametrize("type_", list(FAMILIES))
def test_a_malformed_signature_list_is_invalid_signature_never_an_error(
    hooks: Hooks, type_: str, signature: str
) -> None:
    verifier = make_verifier(hooks, type_, secret=SECRET, public_key=PUBLIC)
    assert_rejected(
        verifier.verify(request(headers_for(signature, family=FAMILIES[type_]))), "invalid_signature"
    )


@pytest.mark.parametrize(
    "timestamp",
    [
        "soon",
        "-1700000000",
        "1700000000.0",
        "1.7e9",
        "+1700000000",
        " 1700000000",
        "1700000000 ",
        "0x6553f100",
        "\u0661\u0667" + "\u0660" * 8,
        "9" * 16,
        "1_700_000_000",
        "\udcff",
    ],
)
def test_a_malformed_timestamp_is_invalid_signature_never_an_error(hooks: Hooks, timestamp: str) -> None:
    verifier = make_verifier(hooks, secret=SECRET, public_key=PUBLIC)
    assert_rejected(verifier.verify(request(headers_for(GOOD, timestamp=timestamp))), "invalid_signature")


@pytest.mark.parametrize("msg_id", ["msg with spaces", "msg.with.dots", "é-ünïcode", "\udcff", "x" * 10_000])
def test_any_id_is_signed_as_sent_and_never_an_error(hooks: Hooks, msg_id: str) -> None:
    verifier = make_verifier(hooks)
    assert_rejected(verifier.verify(request(headers_for(GOOD, msg_id=msg_id))), "invalid_signature")
    if msg_id.isascii():
        assert verifier.verify(request(headers_for(sdk_sign(msg_id=msg_id), msg_id=msg_id))) is None


def test_a_non_utf8_id_from_the_wire_is_signed_as_its_bytes(hooks: Hooks) -> None:
    # The ASGI layer decodes header bytes as latin-1: the signature covers the bytes that were sent.
    raw_id = "msg_é".encode()
    wire_id = raw_id.decode("latin-1")
    key = base64.b64decode(SECRET.removeprefix("whsec_"))
    digest = hmac.new(key, raw_id + f".{NOW}.".encode() + BODY, hashlib.sha256).digest()
    signature = "v1," + base64.b64encode(digest).decode()
    assert make_verifier(hooks).verify(request(headers_for(signature, msg_id=wire_id))) is None


def test_a_non_utf8_body_is_verified_on_its_bytes_never_an_error(hooks: Hooks) -> None:
    body = b'{"type": "\xff\xfe"}'
    verifier = make_verifier(hooks, secret=SECRET, public_key=PUBLIC)
    assert verifier.verify(request(headers_for(v1(SECRET, MSG_ID, NOW, body)), body)) is None
    assert verifier.verify(request(headers_for(v1a(body=body)), body)) is None
    assert_rejected(verifier.verify(request(headers_for(GOOD), body)), "invalid_signature")


def test_the_defaults_read_the_type_from_the_body_and_the_id_from_the_id_header(hooks: Hooks) -> None:
    verifier = make_verifier(hooks)
    assert (verifier.default_event_type, verifier.default_event_id) == ("body.type", "header.webhook-id")
    svix_verifier = make_verifier(hooks, "svix")
    assert (svix_verifier.default_event_type, svix_verifier.default_event_id) == (
        "body.type",
        "header.svix-id",
    )


# --- config ---------------------------------------------------------------------------------------


def config_error(hooks: Hooks, verify_block: str, env: dict[str, str] | None = None) -> str:
    return the_problem(load_error(hooks, nested("sources:\n  acme:\n    verify:\n", verify_block, 6), env))


VERIFY = "x.yaml:3: $.sources.acme.verify"


@pytest.mark.parametrize("type_", list(FAMILIES))
@pytest.mark.parametrize(
    ("block", "where", "words"),
    [
        ("", VERIFY, ("secret", "public_key")),
        ("secret: 'whsec_not base64!'\n", VERIFY, ("secret must be 'whsec_' followed by base64",)),
        ("secret: whsec_c2hvcnQ=\n", VERIFY, ("secret is too short",)),
        (f"secret: [{SECRET}, whsec_%%%%]\n", VERIFY, ("secret[1] must be 'whsec_' followed by base64",)),
        (f"secret: [{SECRET}, '']\n", "x.yaml:5: $.sources.acme.verify.secret[1]", ("length",)),
        ("secret: []\n", "x.yaml:5: $.sources.acme.verify.secret", ("length",)),
        ("secret: ''\n", "x.yaml:5: $.sources.acme.verify.secret", ("length",)),
        ("secret: {a: b}\n", "x.yaml:5: $.sources.acme.verify.secret", ("string",)),
        (f"secret: {PUBLIC}\n", VERIFY, ("secret holds a public key", "public_key")),
        (f"public_key: {SECRET}\n", VERIFY, ("public_key holds a secret",)),
        ("public_key: 'whpk_not base64!'\n", VERIFY, ("public_key must be 'whpk_' followed by base64",)),
        ("public_key: whpk_c2hvcnQ=\n", VERIFY, ("32-byte", "5 bytes")),
        (f"public_key: [{PUBLIC}, whpk_AAAA]\n", VERIFY, ("public_key[1]", "32-byte")),
        ("public_key: []\n", "x.yaml:5: $.sources.acme.verify.public_key", ("length",)),
        (
            f"secret: {SECRET}\ntolerance: 5 minutes\n",
            "x.yaml:6: $.sources.acme.verify.tolerance",
            ("duration",),
        ),
        (f"secret: {SECRET}\ntolerance: 0s\n", VERIFY, ("tolerance",)),
        (f"secret: {SECRET}\ntolerence: 5m\n", "x.yaml:6: $.sources.acme.verify.tolerence", ("tolerance",)),
        (f"secret: {SECRET}\nheader: X-Sig\n", "x.yaml:6: $.sources.acme.verify.header", ("unknown",)),
    ],
)
def test_bad_options_are_refused_with_file_line_and_path(
    hooks: Hooks, type_: str, block: str, where: str, words: tuple[str, ...]
) -> None:
    assert_problem(config_error(hooks, f"type: {type_}\n{block}"), where, *words)


def test_an_unset_secret_variable_is_named(hooks: Hooks) -> None:
    problem = config_error(hooks, 'type: svix\nsecret: "${CLERK_WEBHOOK_SECRET}"\n')
    assert problem.startswith("x.yaml:5: $.sources.acme.verify.secret: ")
    assert "CLERK_WEBHOOK_SECRET" in problem


def test_each_verifier_has_its_own_json_schema_entry(hooks: Hooks) -> None:
    defs = json_schema(hooks.registry)["$defs"]
    verify = defs["SourceConfig"]["properties"]["verify"]["anyOf"]
    refs = [v["$ref"].split("/")[-1] for v in verify if "$ref" in v]
    assert len(refs) == len(set(refs))
    for name, struct in (("standard-webhooks", "StandardWebhooksVerifyConfig"), ("svix", "SvixVerifyConfig")):
        assert struct in refs
        assert defs[struct]["properties"]["type"] == {"const": name}
        assert {"secret", "public_key", "tolerance"} <= set(defs[struct]["properties"])
        assert "type" in defs[struct]["required"]
    # The outgoing signer's options stay apart.
    assert defs["StandardWebhooksConfig"]["properties"]["scheme"] == {"const": "standard-webhooks"}


def test_the_signer_keeps_its_own_options(hooks: Hooks) -> None:
    # The verifier's public_key and tolerance are not options of the outgoing signer.
    text = ENDPOINT + f"    signing: {{scheme: standard-webhooks, secret: {SECRET}, public_key: {PUBLIC}}}\n"
    assert "public_key" in str(load_error(hooks, text).problems[0])


# --- through the gateway --------------------------------------------------------------------------


def event_body(type_: str, n: int) -> bytes:
    return (
        b'{"type": "' + type_.encode() + b'", "timestamp": "2024-05-01T12:00:00.000Z",\n'
        b' "data": {"n": ' + str(n).encode() + b', "note": "caf\xc3\xa9"}}'
    )


def gateway_config(nats_url: str, receiver_url: str) -> str:
    return base_config(
        nats_url,
        f"""
        sources:
          acme:
            verify: {{type: standard-webhooks, secret: "{SECRET}"}}
          clerk:
            verify: {{type: svix, secret: "{OTHER}"}}
        endpoints:
          billing:
            url: {receiver_url}/hooks
            retry: {{schedule: [100ms]}}
        routes:
          - from: [acme, clerk]
            types: ["invoice.*", "user.*"]
            to: [billing]
        """,
    )


async def test_standard_webhooks_through_the_gateway(tmp_path: Path, nats_server: NatsServer) -> None:
    first, second = event_body("invoice.paid", 1), event_body("invoice.created", 2)
    async with receiver() as rx, run_gateway(tmp_path, gateway_config(nats_server.url, rx.url)) as gw:

        async def post(body: bytes, headers: dict[str, str]) -> Any:
            return await gw.http.post(f"{gw.url}/webhooks/acme", content=body, headers=headers)

        def signed(body: bytes, msg_id: str, secret: str = SECRET, age: int = 0) -> dict[str, str]:
            ts = int(time.time()) - age
            return headers_for(sdk_sign(secret, msg_id, ts, body), msg_id, ts)

        forged = await post(first, signed(first, "msg_first", OTHER))
        stale = await post(first, signed(first, "msg_first", age=3600))
        unsigned = await post(first, {"content-type": "application/json"})
        assert_http_error(forged, 401, "invalid_signature")
        assert_http_error(stale, 401, "timestamp_out_of_tolerance")
        assert_http_error(unsigned, 401, "missing_signature")
        assert await stream_messages(nats_server.url, "HOOKGATE_EVENTS") == []

        accepted = await post(first, signed(first, "msg_first"))
        # The sender retries the same message (same webhook-id, new timestamp and signature).
        retried = await post(first, signed(first, "msg_first", age=1))
        other = await post(second, signed(second, "msg_second"))
        assert [r.status_code for r in (accepted, retried, other)] == [202, 202, 202]
        assert accepted.json()["id"] == retried.json()["id"] != other.json()["id"]

        got = await rx.wait_for(2)
        stored = await stream_messages(nats_server.url, "HOOKGATE_EVENTS")
    assert len(stored) == 2
    assert len(rx.requests) == 2
    assert sorted(r.body for r in got) == sorted([first, second])
    by_body = {r.body: r for r in got}
    assert by_body[first].headers["hookgate-source"] == "acme"
    assert by_body[first].headers["hookgate-event-id"] == accepted.json()["id"]
    assert by_body[first].headers["content-type"] == "application/json"


async def test_svix_through_the_gateway(tmp_path: Path, nats_server: NatsServer) -> None:
    body = event_body("user.created", 3)
    async with receiver() as rx, run_gateway(tmp_path, gateway_config(nats_server.url, rx.url)) as gw:

        async def post(headers: dict[str, str]) -> Any:
            return await gw.http.post(f"{gw.url}/webhooks/clerk", content=body, headers=headers)

        ts = int(time.time())
        branded = headers_for(svix_sign(OTHER, "msg_svix_1", ts, body), "msg_svix_1", ts, family="svix")
        unbranded = headers_for(svix_sign(OTHER, "msg_svix_1", ts, body), "msg_svix_1", ts, family="webhook")
        wrong = headers_for(svix_sign(SECRET, "msg_svix_1", ts, body), "msg_svix_1", ts, family="svix")
        assert_http_error(await post(unbranded), 401, "missing_signature")
        assert_http_error(await post(wrong), 401, "invalid_signature")
        assert await stream_messages(nats_server.url, "HOOKGATE_EVENTS") == []

        accepted = await post(branded)
        again = await post(branded)  # an exact replay within the tolerance: answered, not stored again
        assert [accepted.status_code, again.status_code] == [202, 202]
        assert accepted.json()["id"] == again.json()["id"]
        (got,) = await rx.wait_for(1)
        stored = await stream_messages(nats_server.url, "HOOKGATE_EVENTS")
    assert len(stored) == 1
    assert got.body == body
    assert got.headers["hookgate-source"] == "clerk"
    # The svix-* headers are forwarded with the original bytes: the service can verify them itself.
    svix_headers = {k: v for k, v in got.headers.items() if k.startswith("svix-")}
    svix.webhooks.Webhook(OTHER).verify(got.body, svix_headers)
