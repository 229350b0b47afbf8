"""`signing: {scheme: hmac}`: one HMAC header, checked the way GitHub-, Shopify- and Acme-style
receivers check it (Python's hmac as the oracle), and by hookgate's own `hmac` verifier.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from datetime import UTC, datetime
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from hookgate.config import ConfigError, json_schema
from hookgate.plugin_host.hooks import Hooks
from hookgate.types import OutgoingRequest
from hookgate_builtins import hmac_signer
from hookgate_builtins.hmac import HmacConfig, HmacVerifier
from tests.plugin_support import (
    ENDPOINT,
    Clock,
    as_ingress,
    assert_problem,
    load_error,
    load_signer,
    nested,
    only_header,
    outgoing_request,
)
from tests.support import NatsServer, base_config, receiver, run_gateway

# Registered explicitly until pyproject lists the module as an entry point; then it loads as one
# (registering it a second time would be refused).
PLUGINS: tuple[object, ...] = (
    () if any(ep.value == hmac_signer.__name__ for ep in entry_points(group="hookgate")) else (hmac_signer,)
)

SECRET = "It's a Secret to Everybody"
OLD = "old-secret-3f9a"
NEW = "new-secret-77c1"
BODY = b'{"type":"push","timestamp":"2024-05-01T12:00:00.000Z","data":{"who":"Zo\xc3\xab"}}'
EXPIRES = "2026-12-31T00:00:00Z"
EXPIRES_AT = datetime(2026, 12, 31, tzinfo=UTC).timestamp()


@pytest.fixture(scope="module")
def hooks() -> Hooks:
    return Hooks(PLUGINS)


def outgoing(
    body: bytes = BODY, event_id: str = "evt_123", timestamp: int = 1_700_000_000
) -> OutgoingRequest:
    return outgoing_request(body, event_id=event_id, timestamp=timestamp)


def header(request: OutgoingRequest, name: str) -> str:
    return only_header(request.headers, name)


def github_receiver_accepts(secret: str, body: bytes, signature_header: str) -> bool:
    """GitHub's documented check of X-Hub-Signature-256."""
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, signature_header)


GITHUB = f"""\
scheme: hmac
header: X-Hub-Signature-256
algorithm: sha256
encoding: hex
prefix: "sha256="
secret: "{SECRET}"
"""


# --- signatures ------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [BODY, b"", b"Hello, World!", '{"emoji": "\U0001f600"}'.encode()])
def test_github_style_signature_is_what_a_github_receiver_expects(hooks: Hooks, body: bytes) -> None:
    signer = load_signer(hooks, GITHUB)
    request = outgoing(body)
    signer.sign(request)
    value = header(request, "x-hub-signature-256")
    assert github_receiver_accepts(SECRET, body, value)
    assert not github_receiver_accepts("another secret", body, value)
    assert not github_receiver_accepts(SECRET, body + b" ", value)


def test_githubs_published_example_vector(hooks: Hooks) -> None:
    # From GitHub's "Validating webhook deliveries": secret and payload, and the signature they give.
    signer = load_signer(hooks, GITHUB)
    request = outgoing(b"Hello, World!")
    signer.sign(request)
    assert header(request, "X-Hub-Signature-256") == (
        "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    )


def test_hookgates_own_hmac_verifier_accepts_what_the_signer_sends(hooks: Hooks) -> None:
    signer = load_signer(hooks, GITHUB)
    request = outgoing()
    signer.sign(request)
    verifier = HmacVerifier(HmacConfig(header="X-Hub-Signature-256", prefix="sha256=", secret=SECRET))
    assert verifier.verify(as_ingress(request)) is None


@pytest.mark.parametrize("algorithm", ["sha1", "sha256", "sha512"])
def test_base64_variant_shopify_style(hooks: Hooks, algorithm: str) -> None:
    signer = load_signer(
        hooks,
        f"scheme: hmac\nheader: X-Shopify-Hmac-Sha256\nencoding: base64\nalgorithm: {algorithm}\n"
        f"secret: {SECRET!r}\n",
    )
    request = outgoing()
    signer.sign(request)
    expected = base64.b64encode(hmac.new(SECRET.encode(), BODY, algorithm).digest()).decode()
    assert header(request, "X-Shopify-Hmac-Sha256") == expected


def test_a_template_with_the_timestamp_signs_the_webhook_timestamp_value(hooks: Hooks) -> None:
    signer = load_signer(
        hooks,
        f"""\
        scheme: hmac
        header: X-Acme-Signature
        prefix: "v0="
        secret: {SECRET!r}
        signed_content: "v0:{{timestamp}}:{{body}}"
        """,
    )
    now = int(time.time())
    request = outgoing(timestamp=now)
    signer.sign(request)
    signed = f"v0:{header(request, 'webhook-timestamp')}:".encode() + BODY
    expected = "v0=" + hmac.new(SECRET.encode(), signed, hashlib.sha256).hexdigest()
    assert header(request, "X-Acme-Signature") == expected
    # hookgate's verifier, reading the timestamp from webhook-timestamp, agrees (within tolerance).
    verifier = HmacVerifier(
        HmacConfig(
            header="X-Acme-Signature",
            prefix="v0=",
            secret=SECRET,
            signed_content="v0:{timestamp}:{body}",
            timestamp_header="webhook-timestamp",
        )
    )
    assert verifier.verify(as_ingress(request)) is None
    # Another timestamp gives another signature.
    later = outgoing(timestamp=now + 1)
    signer.sign(later)
    assert header(later, "X-Acme-Signature") != expected


def test_a_template_with_the_id_and_literal_braces(hooks: Hooks) -> None:
    signer = load_signer(
        hooks,
        f"""\
        scheme: hmac
        header: X-Sig
        secret: {SECRET!r}
        signed_content: "{{{{{{id}}.{{timestamp}}}}}}{{body}}"
        """,
    )
    request = outgoing(event_id="evt_42", timestamp=1_700_000_123)
    signer.sign(request)
    signed = b"{evt_42.1700000123}" + BODY
    assert header(request, "X-Sig") == hmac.new(SECRET.encode(), signed, hashlib.sha256).hexdigest()


def test_sign_replaces_a_header_of_the_same_name(hooks: Hooks) -> None:
    signer = load_signer(hooks, GITHUB)
    request = outgoing()
    request.headers.append(("x-hub-signature-256", "sha256=forged"))
    signer.sign(request)
    assert github_receiver_accepts(SECRET, BODY, header(request, "X-Hub-Signature-256"))


def test_an_hmac_signer_has_no_public_keys(hooks: Hooks) -> None:
    assert load_signer(hooks, GITHUB).public_keys() == []


# --- rotation --------------------------------------------------------------------------------

ROTATING = f"""\
scheme: hmac
header: X-Hub-Signature-256
prefix: "sha256="
secrets:
  - {{secret: {OLD}, expires: "{EXPIRES}"}}
  - {{secret: {NEW}}}
"""


def test_rotation_signs_with_the_old_secret_until_it_expires_then_with_the_new_one(hooks: Hooks) -> None:
    clock = Clock(EXPIRES_AT - 1)
    signer = load_signer(hooks, ROTATING, clock)
    request = outgoing()
    signer.sign(request)
    value = header(request, "X-Hub-Signature-256")  # one value: such receivers take one
    assert "," not in value and " " not in value
    assert github_receiver_accepts(OLD, BODY, value)
    assert not github_receiver_accepts(NEW, BODY, value)

    clock.now = EXPIRES_AT
    request = outgoing()
    signer.sign(request)
    value = header(request, "X-Hub-Signature-256")
    assert github_receiver_accepts(NEW, BODY, value)
    assert not github_receiver_accepts(OLD, BODY, value)


def test_three_secrets_are_used_in_turn(hooks: Hooks) -> None:
    clock = Clock(0)
    signer = load_signer(
        hooks,
        """\
        scheme: hmac
        header: X-Sig
        secrets:
          - {secret: a, expires: 2026-01-01T00:00:00Z}
          - {secret: b, expires: "2026-06-01T02:00:00+02:00"}
          - {secret: c}
        """,
        clock,
    )
    for now, secret in (
        (datetime(2025, 12, 31, 23, 59, tzinfo=UTC), "a"),
        (datetime(2026, 1, 1, tzinfo=UTC), "b"),
        (datetime(2026, 5, 31, 23, 59, tzinfo=UTC), "b"),
        (datetime(2026, 6, 1, tzinfo=UTC), "c"),
        (datetime(2099, 1, 1, tzinfo=UTC), "c"),
    ):
        clock.now = now.timestamp()
        request = outgoing()
        signer.sign(request)
        assert header(request, "X-Sig") == hmac.new(secret.encode(), BODY, hashlib.sha256).hexdigest(), now


def test_schema_entry_of_its_own_next_to_the_hmac_verifiers(hooks: Hooks) -> None:
    defs = json_schema(hooks.registry)["$defs"]
    assert defs["HmacSignerConfig"]["properties"]["scheme"] == {"const": "hmac"}
    assert defs["HmacConfig"]["properties"]["type"] == {"const": "hmac"}  # the verifier, untouched
    assert "HmacSignerSecret" in defs


# --- config errors -------------------------------------------------------------------------------


def config_error(hooks: Hooks, signing_block: str) -> ConfigError:
    return load_error(hooks, nested(ENDPOINT + "    signing:\n", signing_block, 6))


SIGNING = "x.yaml:4: $.endpoints.billing.signing"
HEAD = "scheme: hmac\nheader: X-Sig\n"


@pytest.mark.parametrize(
    ("block", "where", "words"),
    [
        ("scheme: hmac\nsecret: s\n", SIGNING, ("missing", "header")),
        ("scheme: hmac\nheader: 'X Sig'\nsecret: s\n", SIGNING, ("not a header name",)),
        ("scheme: hmac\nheader: Content-Type\nsecret: s\n", SIGNING, ("set by hookgate",)),
        ("scheme: hmac\nheader: webhook-id\nsecret: s\n", SIGNING, ("set by hookgate",)),
        (HEAD, SIGNING, ("missing secret",)),
        (HEAD + "secret: ''\n", SIGNING, ("must not be empty",)),
        (HEAD + "secret: s\nsecrets: [{secret: t}]\n", SIGNING, ("not both",)),
        (HEAD + "secret: [a, b]\n", "x.yaml:7: $.endpoints.billing.signing.secret", ("string",)),
        (HEAD + "secrets: []\n", SIGNING, ("at least one secret",)),
        (HEAD + f"secrets:\n  - {{secret: a, expires: {EXPIRES}}}\n", SIGNING, ("the last", "no expires")),
        (
            HEAD + f"secrets:\n  - {{secret: new}}\n  - {{secret: old, expires: {EXPIRES}}}\n",
            SIGNING,
            ("secrets[0] has no expires", "oldest first"),
        ),
        (
            HEAD
            + "secrets:\n  - {secret: a, expires: 2027-01-01T00:00:00Z}\n"
            + "  - {secret: b, expires: 2026-01-01T00:00:00Z}\n  - {secret: c}\n",
            SIGNING,
            ("secrets[1] expires no later than secrets[0]",),
        ),
        (
            HEAD + "secrets:\n  - {secret: a, expires: next week}\n  - {secret: b}\n",
            "x.yaml:8: $.endpoints.billing.signing.secrets[0].expires",
            ("rfc3339",),
        ),
        (
            HEAD + "secrets:\n  - {secret: a, expires: 2026-12-31T00:00:00}\n  - {secret: b}\n",
            "x.yaml:8: $.endpoints.billing.signing.secrets[0].expires",
            ("timezone",),
        ),
        (
            HEAD + "secrets:\n  - {secret: a, expires: 2026-12-31}\n  - {secret: b}\n",
            "x.yaml:8: $.endpoints.billing.signing.secrets[0].expires",
            ("datetime",),
        ),
        (
            HEAD + "secrets:\n  - {secret: a}\n  - {secret: '', expires: 2026-12-31T00:00:00Z}\n",
            "x.yaml:9: $.endpoints.billing.signing.secrets[1]",
            ("must not be empty",),
        ),
        (
            HEAD + "secrets:\n  - {secret: a, expire: 2026-12-31T00:00:00Z}\n",
            "x.yaml:8: $.endpoints.billing.signing.secrets[0].expire",
            ("unknown", "expires"),
        ),
        (HEAD + "secret: s\nsigned_content: '{timestamp}'\n", SIGNING, ("must hold {body}",)),
        (HEAD + "secret: s\nsigned_content: '{header.X}.{body}'\n", SIGNING, ("unknown placeholder",)),
        (HEAD + "secret: s\nsigned_content: '{body}}'\n", SIGNING, ("stray",)),
        (
            HEAD + "secret: s\nalgorithm: md5\n",
            "x.yaml:8: $.endpoints.billing.signing.algorithm",
            ("sha256",),
        ),
        (HEAD + "secret: s\nencoding: base32\n", "x.yaml:8: $.endpoints.billing.signing.encoding", ("hex",)),
        (
            HEAD + "secret: s\ntolerance: 5m\n",
            "x.yaml:8: $.endpoints.billing.signing.tolerance",
            ("unknown",),
        ),
    ],
)
def test_bad_options_are_refused_with_file_line_and_path(
    hooks: Hooks, block: str, where: str, words: tuple[str, ...]
) -> None:
    assert_problem(config_error(hooks, block), where, *words)


# --- end to end --------------------------------------------------------------------------------


async def test_hmac_signed_delivery_through_the_gateway(tmp_path: Path, nats_server: NatsServer) -> None:
    async with receiver() as rx:
        text = base_config(
            nats_server.url,
            f"""
            endpoints:
              billing:
                url: {rx.url}/billing
                signing:
                  scheme: hmac
                  header: X-Hub-Signature-256
                  prefix: "sha256="
                  secret: "{SECRET}"
                  signed_content: "{{timestamp}}.{{body}}"
            routes:
              - from: [internal]
                to: [billing]
            """,
        )
        async with run_gateway(tmp_path, text, plugins=PLUGINS) as gw:
            response = await gw.publish("order.created", {"order": 7})
            await rx.wait_for(1)
    (got,) = rx.requests
    assert response.status_code == 202
    assert got.headers["webhook-id"] == response.json()["id"]
    assert "webhook-signature" not in got.headers  # only the configured scheme signs
    signed = got.headers["webhook-timestamp"].encode() + b"." + got.body
    expected = "sha256=" + hmac.new(SECRET.encode(), signed, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(got.headers["x-hub-signature-256"], expected)
    assert json.loads(got.body)["data"] == {"order": 7}
