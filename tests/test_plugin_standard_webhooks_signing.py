"""The `standard-webhooks` signer's v1a (ed25519) keys, key rotation with `expires`, and public keys.

v1 signatures are checked against the Standard Webhooks and Svix SDKs in
test_plugin_standard_webhooks.py. The SDKs cannot check v1a, so here the oracle is `cryptography`'s
ed25519 verification under the `whpk_` public key, computed independently of the plugin.
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
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from hookgate.config import ConfigError, json_schema
from hookgate.plugin_host.hooks import Hooks
from hookgate.types import OutgoingRequest
from hookgate_builtins import standard_webhooks
from hookgate_builtins.standard_webhooks import StandardWebhooksVerifier, StandardWebhooksVerifyConfig
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
from tests.plugin_support import standard_webhooks_sdks_accept as sdk_accepts
from tests.support import NatsServer, base_config, receiver, run_gateway


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


SECRET_NEW = "whsec_" + b64(os.urandom(32))
SECRET_OLD = "whsec_" + b64(os.urandom(32))
SEED = os.urandom(32)
PUBLIC = Ed25519PrivateKey.from_private_bytes(SEED).public_key().public_bytes_raw()
WHSK_SVIX = "whsk_" + b64(SEED + PUBLIC)  # seed then public key, as Svix issues them
WHSK_SEED = "whsk_" + b64(SEED)  # the bare seed
WHPK = "whpk_" + b64(PUBLIC)
OTHER_SEED = os.urandom(32)
WHSK_OTHER = "whsk_" + b64(OTHER_SEED)
WHPK_OTHER = "whpk_" + b64(Ed25519PrivateKey.from_private_bytes(OTHER_SEED).public_key().public_bytes_raw())

BODY = b'{"type":"invoice.paid","timestamp":"2024-05-01T12:00:00.000Z","data":{"who":"Zo\xc3\xab"}}'
EXPIRES = "2026-12-31T00:00:00Z"
EXPIRES_AT = datetime(2026, 12, 31, tzinfo=UTC).timestamp()


@pytest.fixture(scope="module")
def hooks() -> Hooks:
    return Hooks()


def outgoing(body: bytes = BODY, event_id: str = "evt_123", timestamp: int | None = None) -> OutgoingRequest:
    """A first attempt, timestamped now unless `timestamp` is given."""
    ts = int(time.time()) if timestamp is None else timestamp
    return outgoing_request(body, event_id=event_id, timestamp=ts)


def signatures(signer: Any, request: OutgoingRequest) -> list[str]:
    signer.sign(request)
    return only_header(request.headers, "webhook-signature").split(" ")


def ed25519_verifies(whpk: str, entry: str, request: OutgoingRequest) -> bool:
    """The receiver's check of one `v1a,<b64>` entry, with cryptography alone."""
    version, _, encoded = entry.partition(",")
    assert version == "v1a"
    signature = base64.b64decode(encoded, validate=True)
    assert len(signature) == 64
    key = Ed25519PublicKey.from_public_bytes(base64.b64decode(whpk.removeprefix("whpk_")))
    try:
        key.verify(signature, f"{request.event_id}.{request.timestamp}.".encode() + request.body)
    except InvalidSignature:
        return False
    return True


# --- v1a: ed25519 ------------------------------------------------------------------------------


def test_public_key_of_a_svix_style_key_and_of_a_bare_seed_is_the_whpk_of_the_seed() -> None:
    assert standard_webhooks.public_key_of(WHSK_SVIX) == WHPK
    assert standard_webhooks.public_key_of(WHSK_SEED) == WHPK
    # Unpadded base64 is accepted, as for whsec_ secrets.
    assert standard_webhooks.public_key_of(WHSK_SVIX.rstrip("=")) == WHPK


@pytest.mark.parametrize("bad", ["whsk_%%%", "whsk_" + b64(os.urandom(31)), WHPK, SECRET_NEW, b64(SEED)])
def test_public_key_of_refuses_what_is_not_a_private_key(bad: str) -> None:
    with pytest.raises(ValueError):
        standard_webhooks.public_key_of(bad)


@pytest.mark.parametrize("private_key", [WHSK_SVIX, WHSK_SEED], ids=["seed+public", "seed"])
@pytest.mark.parametrize("body", [BODY, b"{}", '{"emoji": "\U0001f600"}'.encode()])
def test_v1a_verifies_with_cryptography_under_the_whpk_key(
    hooks: Hooks, private_key: str, body: bytes
) -> None:
    signer = load_signer(hooks, f"scheme: standard-webhooks\nprivate_key: {private_key}\n")
    request = outgoing(body)
    (entry,) = signatures(signer, request)
    assert entry.startswith("v1a,")
    assert ed25519_verifies(WHPK, entry, request)
    assert not ed25519_verifies(WHPK_OTHER, entry, request)
    assert signer.public_keys() == [WHPK]


def test_v1a_does_not_verify_for_another_body_id_or_timestamp(hooks: Hooks) -> None:
    signer = load_signer(hooks, f"scheme: standard-webhooks\nprivate_key: {WHSK_SVIX}\n")
    request = outgoing(BODY, "evt_1", 1_700_000_000)
    (entry,) = signatures(signer, request)
    assert ed25519_verifies(WHPK, entry, request)
    for changed in (
        outgoing(BODY.replace(b"invoice", b"invoicE"), "evt_1", 1_700_000_000),
        outgoing(BODY, "evt_2", 1_700_000_000),
        outgoing(BODY, "evt_1", 1_700_000_001),
    ):
        assert not ed25519_verifies(WHPK, entry, changed)


def test_hookgates_own_verifier_accepts_v1a_with_the_printed_public_key(hooks: Hooks) -> None:
    signer = load_signer(hooks, f"scheme: standard-webhooks\nprivate_key: {WHSK_SEED}\n")
    request = outgoing()
    signer.sign(request)
    verifier = StandardWebhooksVerifier(StandardWebhooksVerifyConfig(public_key=signer.public_keys()))
    assert verifier.verify(as_ingress(request)) is None


def test_secret_and_private_key_together_give_a_v1_and_a_v1a_signature(hooks: Hooks) -> None:
    signer = load_signer(
        hooks, f"scheme: standard-webhooks\nsecret: {SECRET_NEW}\nprivate_key: [{WHSK_SVIX}, {WHSK_OTHER}]\n"
    )
    request = outgoing()
    v1, v1a, v1a_other = signatures(signer, request)
    assert v1.startswith("v1,")
    assert ed25519_verifies(WHPK, v1a, request)
    assert ed25519_verifies(WHPK_OTHER, v1a_other, request)
    # The SDKs, which know v1 only, pass over the v1a entries and accept the v1 one.
    assert sdk_accepts(SECRET_NEW, BODY, dict(request.headers))
    assert not sdk_accepts(SECRET_OLD, BODY, dict(request.headers))
    assert signer.public_keys() == [WHPK, WHPK_OTHER]


def test_a_secret_alone_has_no_public_keys(hooks: Hooks) -> None:
    assert load_signer(hooks, f"scheme: standard-webhooks\nsecret: {SECRET_NEW}\n").public_keys() == []


# --- rotation with expires ---------------------------------------------------------------------

ROTATING = f"""\
scheme: standard-webhooks
secrets:
  - {{secret: {SECRET_NEW}}}
  - {{secret: {SECRET_OLD}, expires: "{EXPIRES}"}}
"""


def test_a_rotated_pair_signs_twice_until_the_old_secret_expires(hooks: Hooks) -> None:
    clock = Clock(EXPIRES_AT - 1)
    signer = load_signer(hooks, ROTATING, clock)
    # The SDKs check the timestamp against the real clock, so the request is signed "now".
    request = outgoing()
    new, old = signatures(signer, request)
    headers = dict(request.headers)
    assert new.startswith("v1,") and old.startswith("v1,")
    for own, other, entry in ((SECRET_NEW, SECRET_OLD, new), (SECRET_OLD, SECRET_NEW, old)):
        alone = {**headers, "webhook-signature": entry}
        assert sdk_accepts(own, BODY, alone)
        assert not sdk_accepts(other, BODY, alone)

    clock.now = EXPIRES_AT  # the old secret's expires has come: it signs no more
    request = outgoing()
    (only,) = signatures(signer, request)
    assert only == new
    assert sdk_accepts(SECRET_NEW, BODY, dict(request.headers))
    assert not sdk_accepts(SECRET_OLD, BODY, dict(request.headers))


def test_rotation_between_ed25519_keys_and_the_public_keys_a_receiver_needs(hooks: Hooks) -> None:
    clock = Clock(EXPIRES_AT - 3600)
    signer = load_signer(
        hooks,
        f"""\
        scheme: standard-webhooks
        secrets:
          - {{private_key: {WHSK_OTHER}}}
          - {{private_key: {WHSK_SVIX}, expires: {EXPIRES}}}   # unquoted: YAML reads a timestamp
          - {{secret: {SECRET_OLD}, expires: "2026-12-31T02:00:00+02:00"}}   # = 00:00Z
        """,
        clock,
    )
    request = outgoing(timestamp=1_700_000_000)
    new, old, hmac_old = signatures(signer, request)
    assert ed25519_verifies(WHPK_OTHER, new, request)
    assert ed25519_verifies(WHPK, old, request)
    assert not ed25519_verifies(WHPK, new, request)
    assert hmac_old.startswith("v1,")
    assert signer.public_keys() == [WHPK_OTHER, WHPK]

    clock.now = EXPIRES_AT + 1
    request = outgoing(timestamp=1_700_000_000)
    (entry,) = signatures(signer, request)
    assert entry == new  # ed25519 signatures are deterministic
    assert signer.public_keys() == [WHPK_OTHER]


def test_the_simple_list_form_still_signs_with_every_secret(hooks: Hooks) -> None:
    signer = load_signer(
        hooks, f"scheme: standard-webhooks\nsecret: [{SECRET_NEW}, {SECRET_OLD}]\n", Clock(0)
    )
    request = outgoing()
    assert len(signatures(signer, request)) == 2
    assert sdk_accepts(SECRET_NEW, BODY, dict(request.headers))
    assert sdk_accepts(SECRET_OLD, BODY, dict(request.headers))


def test_the_signer_reads_the_real_clock_by_default(hooks: Hooks) -> None:
    past = f"""\
        scheme: standard-webhooks
        secrets:
          - {{secret: {SECRET_NEW}}}
          - {{secret: {SECRET_OLD}, expires: "2001-01-01T00:00:00Z"}}
        """
    assert len(signatures(load_signer(hooks, past), outgoing())) == 1
    future = past.replace("2001-01-01", "2999-01-01")
    assert len(signatures(load_signer(hooks, future), outgoing())) == 2


def test_the_json_schema_describes_the_key_list(hooks: Hooks) -> None:
    defs = json_schema(hooks.registry)["$defs"]
    props = defs["StandardWebhooksConfig"]["properties"]
    assert {"secret", "private_key", "secrets", "scheme"} <= set(props)
    expires = defs["StandardWebhooksKey"]["properties"]["expires"]["anyOf"][0]
    assert expires["type"] == "string" and expires["format"] == "date-time"


# --- config errors -------------------------------------------------------------------------------


def config_error(hooks: Hooks, signing_block: str) -> ConfigError:
    return load_error(hooks, nested(ENDPOINT + "    signing:\n", signing_block, 6))


SIGNING = "x.yaml:4: $.endpoints.billing.signing"
SCHEME = "scheme: standard-webhooks\n"


def second_key(entry: str) -> str:
    """A `secrets` list: the current secret, then `entry` (on line 8)."""
    return SCHEME + f"secrets:\n  - {{secret: {SECRET_NEW}}}\n  - {entry}\n"


@pytest.mark.parametrize(
    ("block", "where", "words"),
    [
        (
            SCHEME + 'private_key: "whsk_not base64!"\n',
            SIGNING,
            ("private_key must be 'whsk_' followed by base64",),
        ),
        (SCHEME + f"private_key: {b64(SEED)}\n", SIGNING, ("'whsk_'",)),
        (SCHEME + f"private_key: whsk_{b64(os.urandom(31))}\n", SIGNING, ("32-byte", "not 31 bytes")),
        (SCHEME + f"private_key: whsk_{b64(os.urandom(33))}\n", SIGNING, ("not 33 bytes",)),
        (SCHEME + f"private_key: whsk_{b64(SEED + PUBLIC + b'x')}\n", SIGNING, ("not 65 bytes",)),
        (SCHEME + f"private_key: whsk_{b64(SEED + os.urandom(32))}\n", SIGNING, ("not the public key",)),
        (SCHEME + f"private_key: {WHPK}\n", SIGNING, ("public key", "whsk_")),
        (SCHEME + f"private_key: {SECRET_NEW}\n", SIGNING, ("give it as secret",)),
        (SCHEME + f"secret: {WHSK_SEED}\n", SIGNING, ("give it as private_key",)),
        (SCHEME + f"private_key: [{WHSK_SEED}, whsk_AAAA]\n", SIGNING, ("private_key[1]", "not 3 bytes")),
        (SCHEME + "private_key: []\n", SIGNING, ("at least one key",)),
        (SCHEME + "secrets: []\n", SIGNING, ("at least one key",)),
        (
            SCHEME + f"secret: {SECRET_NEW}\nsecrets: [{{secret: {SECRET_OLD}}}]\n",
            SIGNING,
            ("not both",),
        ),
        (
            SCHEME + f'secrets:\n  - {{secret: {SECRET_NEW}, expires: "{EXPIRES}"}}\n',
            SIGNING,
            ("every key has expires",),
        ),
        (
            second_key(f"{{secret: {SECRET_OLD}, expires: tomorrow}}"),
            "x.yaml:8: $.endpoints.billing.signing.secrets[1].expires",
            ("rfc3339", "tomorrow"),
        ),
        (
            second_key(f"{{secret: {SECRET_OLD}, expires: 2026-12-31T00:00:00}}"),
            "x.yaml:8: $.endpoints.billing.signing.secrets[1].expires",
            ("timezone",),
        ),
        (
            second_key(f"{{secret: {SECRET_OLD}, expires: 2026-12-31}}"),
            "x.yaml:8: $.endpoints.billing.signing.secrets[1].expires",
            ("datetime",),
        ),
        (
            second_key(f"{{secret: {SECRET_OLD}, expire: {EXPIRES}}}"),
            "x.yaml:8: $.endpoints.billing.signing.secrets[1].expire",
            ("unknown", "expires"),
        ),
        (
            SCHEME + f"secrets:\n  - {{secret: {SECRET_NEW}, private_key: {WHSK_SEED}}}\n",
            "x.yaml:7: $.endpoints.billing.signing.secrets[0]",
            ("one of secret", "private_key"),
        ),
        (
            SCHEME + f"secrets:\n  - {{secret: {SECRET_NEW}}}\n  -\n    expires: {EXPIRES}\n",
            "x.yaml:9: $.endpoints.billing.signing.secrets[1]",
            ("one of secret",),
        ),
        (
            second_key(f"{{private_key: whsk_{b64(os.urandom(48))}}}"),
            "x.yaml:8: $.endpoints.billing.signing.secrets[1]",
            ("not 48 bytes",),
        ),
        (SCHEME, SIGNING, ("missing", "secret", "private_key", "secrets")),
    ],
)
def test_bad_keys_and_expiry_times_are_refused_with_file_line_and_path(
    hooks: Hooks, block: str, where: str, words: tuple[str, ...]
) -> None:
    assert_problem(config_error(hooks, block), where, *words)


# --- end to end --------------------------------------------------------------------------------


async def test_v1a_signed_delivery_through_the_gateway_verifies_with_the_public_key(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    async with receiver() as rx:
        text = base_config(
            nats_server.url,
            f"""
            endpoints:
              billing:
                url: {rx.url}/billing
                signing: {{scheme: standard-webhooks, private_key: "{WHSK_SVIX}"}}
            routes:
              - from: [internal]
                to: [billing]
            """,
        )
        async with run_gateway(tmp_path, text) as gw:
            response = await gw.publish("order.created", {"order": 7})
            await rx.wait_for(1)
    (got,) = rx.requests
    assert response.status_code == 202
    assert got.headers["webhook-id"] == response.json()["id"]
    entry = got.headers["webhook-signature"]
    assert entry.startswith("v1a,") and " " not in entry
    request = outgoing(got.body, got.headers["webhook-id"], int(got.headers["webhook-timestamp"]))
    assert ed25519_verifies(standard_webhooks.public_key_of(WHSK_SVIX), entry, request)
    assert ed25519_verifies(WHPK, entry, request)
    assert json.loads(got.body)["data"] == {"order": 7}
