"""Standard Webhooks: the outgoing signer, and the ingress verifiers `standard-webhooks` and `svix`.

Outgoing, `signing: {scheme: standard-webhooks, ...}` puts one `<version>,<base64>` entry per key
into `webhook-signature`, space-separated. The signed content is `{webhook-id}.{webhook-timestamp}.
{body}`.

- `secret: whsec_...` signs with v1, HMAC-SHA256; the secret is `whsec_` followed by base64 key
  bytes, as Svix issues them (the prefix and base64 padding may be left out, as the SDKs allow).
- `private_key: whsk_...` signs with v1a, ed25519. The key is `whsk_` followed by base64 of the
  32-byte seed and the 32-byte public key, as Svix issues them, or of the 32-byte seed alone.
  Receivers verify with the public key, `whpk_` followed by base64 of its 32 bytes; print it with
  `public_key_of(private_key)` (the signer's `public_keys()` gives those of an endpoint).
- `secret` and `private_key` may each be a list, and both may be given: every key signs.
- Rotation with an end: `secrets` is a list of keys, each `{secret: whsec_...}` or
  `{private_key: whsk_...}`, with an optional `expires` (an RFC3339 time with its offset, such as
  "2026-12-31T00:00:00Z"). Each key signs until its `expires`, and from then on no longer does. At
  least one key must have no `expires` (the current one), so there is always a signature:

      signing:
        scheme: standard-webhooks
        secrets:
          - {secret: "${BILLING_WHSEC_NEW}"}
          - {secret: "${BILLING_WHSEC_OLD}", expires: "2026-12-31T00:00:00Z"}

  `secrets` replaces `secret` and `private_key`; the two forms do not mix.

Ingress, for any Standard Webhooks sender, and for Svix (which signs the same way under its own
header names):

    sources:
      acme:
        verify: {type: standard-webhooks, secret: "${ACME_WHSEC}", tolerance: 5m}
      clerk:
        verify: {type: svix, secret: "${CLERK_WEBHOOK_SECRET}"}
      keyed:
        verify: {type: standard-webhooks, public_key: "whpk_..."}   # v1a (ed25519) signatures

What is checked, on the raw body bytes before anything parses them:

- The three headers are present and not empty: `webhook-id`, `webhook-timestamp`,
  `webhook-signature` for `standard-webhooks`; `svix-id`, `svix-timestamp`, `svix-signature` for
  `svix`. Each type reads its own family only. (The svix libraries fall back to `webhook-*`, which
  white-labelled Svix accounts send; here such a sender is configured as `standard-webhooks`, whose
  default event id is then the right header. A request that carries the other family is refused
  with a message that says so.)
- The timestamp is unix seconds in ASCII digits. The signature header is a space-separated list
  of `<version>,<base64>` entries: `v1,` with a 32-byte HMAC-SHA256 and `v1a,` with a 64-byte
  ed25519 signature are checked; other versions and malformed entries are ignored, and at least one
  well-formed `v1`/`v1a` entry must be there. A header longer than 4096 characters or holding more
  than 16 entries is refused unread.
- One entry verifies over `{id}.{timestamp}.{body}`: a `v1` under one of the `secret`s (compared
  in constant time), or a `v1a` under one of the `public_key`s (`whpk_` + base64 of the 32-byte
  ed25519 key). `secret` and `public_key` may each be a list while rotating; at least one of the
  two options is required.
- Then the timestamp must be within `tolerance` of the clock either way (default 5m), or the
  refusal is `timestamp_out_of_tolerance`: signed, but replayed or from a skewed clock.

Refusals are 401 with code `missing_signature`, `invalid_signature` or
`timestamp_out_of_tolerance`. The event id defaults to the id header (`header.webhook-id`,
`header.svix-id`: the same on every retry of a message, so a retry is stored once), the event
type to `body.type`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from collections.abc import Callable
from datetime import datetime
from typing import Annotated

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from hookgate.hookspecs import hookimpl
from hookgate.plugin_kit import Duration, decode_prefixed_base64, matches_any, seconds, wire_bytes
from hookgate.types import ComponentRegistry, IngressRequest, OutgoingRequest, Rejection

SECRET_PREFIX = "whsec_"
PUBLIC_KEY_PREFIX = "whpk_"
PRIVATE_KEY_PREFIX = "whsk_"
# A real signature header holds one or a few signatures (more while rotating): anything much longer
# is not worth parsing, and each v1a entry costs an ed25519 verification over the whole body.
MAX_HEADER_LENGTH = 4096
MAX_SIGNATURES = 16

_TIMESTAMP = re.compile(r"[0-9]{1,15}")  # ASCII digits only (int() would take any Unicode digit)
_V1 = re.compile(r"[A-Za-z0-9+/]{43}=")  # base64 of a 32-byte HMAC-SHA256, as the SDKs send it
_V1A = re.compile(r"[A-Za-z0-9+/]{86}==")  # base64 of a 64-byte ed25519 signature


# --- outgoing: the signer ---------------------------------------------------------------------------


Secret = Annotated[str, msgspec.Meta(min_length=1, description="a signing secret, whsec_<base64>")]
PrivateKey = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        description="an ed25519 private key, whsk_<base64 of the 32-byte seed [+ the 32-byte public key]>",
    ),
]
Expires = Annotated[
    datetime,
    msgspec.Meta(tz=True, description='when this key stops signing: an RFC3339 time, "2026-12-31T00:00:00Z"'),
]


class StandardWebhooksKey(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One entry of `secrets`: a v1 `secret` or a v1a `private_key`, signing until `expires`."""

    secret: Secret | None = None
    private_key: PrivateKey | None = None
    # After this time the key no longer signs; without it, the key signs for good.
    expires: Expires | None = None

    def __post_init__(self) -> None:
        if (self.secret is None) == (self.private_key is None):
            raise ValueError(
                "give one of secret (whsec_..., a v1 signature) or private_key (whsk_..., a v1a signature)"
            )
        if self.secret is not None:
            _check_secret(self.secret, "secret")
        if self.private_key is not None:
            decode_private_key(self.private_key)


class StandardWebhooksConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # v1 (HMAC-SHA256): whsec_<base64>; a list signs with each.
    secret: str | list[str] | None = None
    # v1a (ed25519): whsk_<base64>; a list signs with each.
    private_key: str | list[str] | None = None
    # Rotation with an end: keys that each sign until their own `expires`.
    secrets: list[StandardWebhooksKey] | None = None

    def __post_init__(self) -> None:
        if self.secrets is not None:
            if self.secret is not None or self.private_key is not None:
                raise ValueError("give secrets (the list with expiry times) or secret/private_key, not both")
            if not self.secrets:
                raise ValueError("secrets: give at least one key")
            if all(key.expires is not None for key in self.secrets):
                raise ValueError(
                    "secrets: every key has expires, so signing would stop; leave expires off the current key"
                )
            return
        if self.secret is None and self.private_key is None:
            raise ValueError(
                "missing secret: give secret (whsec_..., v1 signatures), private_key (whsk_..., v1a "
                "signatures), or secrets (a list of either with expiry times, for rotation)"
            )
        if isinstance(self.secret, list) and not self.secret:
            raise ValueError("secret: give at least one secret")
        if isinstance(self.private_key, list) and not self.private_key:
            raise ValueError("private_key: give at least one key")
        for name, secret in _named(self.secret, "secret"):
            _check_secret(secret, name)
        for name, key in _named(self.private_key, "private_key"):
            decode_private_key(key, name)

    def signing_keys(self) -> list[StandardWebhooksKey]:
        """Every configured key, in the order their signatures are sent."""
        if self.secrets is not None:
            return list(self.secrets)
        return [StandardWebhooksKey(secret=s) for _, s in _named(self.secret, "secret")] + [
            StandardWebhooksKey(private_key=k) for _, k in _named(self.private_key, "private_key")
        ]


def decode_secret(secret: str, name: str = "secret") -> bytes:
    key = decode_prefixed_base64(secret, SECRET_PREFIX, name)
    if len(key) < 16:
        raise ValueError(f"{name} is too short: use at least 16 random bytes (24 or more recommended)")
    return key


def _check_secret(secret: str, name: str) -> None:
    if secret.startswith(PRIVATE_KEY_PREFIX):
        raise ValueError(f"{name} holds an ed25519 private key (whsk_...): give it as private_key")
    if secret.startswith(PUBLIC_KEY_PREFIX):
        raise ValueError(f"{name} holds a public key (whpk_...): a signer needs a secret (whsec_...)")
    decode_secret(secret, name)


def decode_private_key(key: str, name: str = "private_key") -> Ed25519PrivateKey:
    """An ed25519 private key from `whsk_` + base64 of the seed, or of the seed and the public key."""
    if key.startswith(SECRET_PREFIX):
        raise ValueError(f"{name} holds an HMAC secret (whsec_...): give it as secret")
    if key.startswith(PUBLIC_KEY_PREFIX):
        raise ValueError(
            f"{name} holds a public key (whpk_...): signing needs the private key (whsk_...); the "
            "public key is for receivers"
        )
    if not key.startswith(PRIVATE_KEY_PREFIX):
        raise ValueError(f"{name} must be 'whsk_' followed by base64")
    raw = decode_prefixed_base64(key, PRIVATE_KEY_PREFIX, name)
    if len(raw) not in (32, 64):
        raise ValueError(
            f"{name} must hold a 32-byte ed25519 seed, or 64 bytes (the seed, then the public key), "
            f"not {len(raw)} bytes"
        )
    private = Ed25519PrivateKey.from_private_bytes(raw[:32])
    if len(raw) == 64 and private.public_key().public_bytes_raw() != raw[32:]:
        raise ValueError(f"{name}: its last 32 bytes are not the public key of its seed (the first 32)")
    return private


def public_key_of(private_key: str) -> str:
    """The `whpk_` public key that receivers verify v1a signatures with, from a `whsk_` private key.

    Raises ValueError if `private_key` is not a valid `whsk_` key.
    """
    public = decode_private_key(private_key).public_key().public_bytes_raw()
    return PUBLIC_KEY_PREFIX + base64.b64encode(public).decode()


class StandardWebhooksSigner:
    """Signs with every key of its config that has not expired by `now()` (unix seconds)."""

    def __init__(self, config: StandardWebhooksConfig, *, now: Callable[[], float] = time.time):
        self.now = now
        self._keys: list[tuple[bytes | Ed25519PrivateKey, float | None]] = []
        self._public_keys: list[tuple[str, float | None]] = []
        for key in config.signing_keys():
            expires = key.expires.timestamp() if key.expires is not None else None
            if key.secret is not None:
                self._keys.append((decode_secret(key.secret), expires))
            elif key.private_key is not None:
                self._keys.append((decode_private_key(key.private_key), expires))
                self._public_keys.append((public_key_of(key.private_key), expires))

    def public_keys(self) -> list[str]:
        """The `whpk_` keys receivers need now: those of the private keys that have not expired."""
        now = self.now()
        return [key for key, expires in self._public_keys if expires is None or now < expires]

    def signature(self, msg_id: str, timestamp: int, body: bytes) -> str:
        content = f"{msg_id}.{timestamp}.".encode() + body
        now = self.now()
        entries = []
        for key, expires in self._keys:
            if expires is not None and now >= expires:
                continue
            if isinstance(key, bytes):
                entries.append(
                    "v1," + base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode()
                )
            else:
                entries.append("v1a," + base64.b64encode(key.sign(content)).decode())
        return " ".join(entries)

    def sign(self, request: OutgoingRequest) -> None:
        request.set_header(
            "webhook-signature", self.signature(request.event_id, request.timestamp, request.body)
        )


# --- ingress: the verifiers -------------------------------------------------------------------------

PublicKey = Annotated[
    str, msgspec.Meta(min_length=1, description="an ed25519 public key, whpk_<base64 of 32 bytes>")
]


class StandardWebhooksVerifyConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """`verify: {type: standard-webhooks}`: webhook-id, webhook-timestamp and webhook-signature."""

    # v1 (HMAC-SHA256) signatures verify under one of these.
    secret: Secret | Annotated[list[Secret], msgspec.Meta(min_length=1)] | None = None
    # v1a (ed25519) signatures verify under one of these.
    public_key: PublicKey | Annotated[list[PublicKey], msgspec.Meta(min_length=1)] | None = None
    # How far the timestamp may be from the clock, either way.
    tolerance: Duration = "5m"

    def __post_init__(self) -> None:
        if self.secret is None and self.public_key is None:
            raise ValueError(
                "give a secret (whsec_..., for v1 signatures) or a public_key (whpk_..., for v1a "
                "signatures), or both"
            )
        for name, secret in _named(self.secret, "secret"):
            if secret.startswith(PUBLIC_KEY_PREFIX):
                raise ValueError(f"{name} holds a public key (whpk_...): give it as public_key")
            decode_secret(secret, name)
        for name, key in _named(self.public_key, "public_key"):
            decode_public_key(key, name)
        if seconds(self.tolerance) <= 0:
            raise ValueError("tolerance must be longer than 0s")


class SvixVerifyConfig(StandardWebhooksVerifyConfig, forbid_unknown_fields=True, kw_only=True):
    """`verify: {type: svix}`: svix-id, svix-timestamp and svix-signature.

    The options are those of `standard-webhooks`; a type of their own gives each verifier its own
    JSON Schema entry.
    """


def _named(value: str | list[str] | None, name: str) -> list[tuple[str, str]]:
    if value is None:
        return []
    if isinstance(value, str):
        return [(name, value)]
    return [(f"{name}[{i}]", item) for i, item in enumerate(value)]


def decode_public_key(key: str, name: str = "public_key") -> Ed25519PublicKey:
    if key.startswith(SECRET_PREFIX):
        raise ValueError(f"{name} holds a secret (whsec_...): give it as secret")
    raw = decode_prefixed_base64(key, PUBLIC_KEY_PREFIX, name)
    if len(raw) != 32:
        raise ValueError(f"{name} must hold a 32-byte ed25519 public key, not {len(raw)} bytes")
    return Ed25519PublicKey.from_public_bytes(raw)


class StandardWebhooksVerifier:
    """Verifies `webhook-*` headers; `SvixVerifier` reads the same scheme under `svix-*` names."""

    default_event_type: str | None = "body.type"
    default_event_id: str | None = "header.webhook-id"
    prefix = "webhook"
    # The other family's prefix and verifier type, named in the refusal of a request that uses it.
    other = ("svix", "svix")

    def __init__(self, config: StandardWebhooksVerifyConfig, *, now: Callable[[], float] = time.time):
        self._keys = [decode_secret(s) for _, s in _named(config.secret, "secret")]
        self._public_keys = [decode_public_key(k) for _, k in _named(config.public_key, "public_key")]
        self.tolerance = seconds(config.tolerance)
        self.now = now
        self.headers = (f"{self.prefix}-id", f"{self.prefix}-timestamp", f"{self.prefix}-signature")

    def verify(self, request: IngressRequest) -> Rejection | None:
        msg_id, timestamp, signature = (request.header(name) for name in self.headers)
        if not msg_id or not timestamp or not signature:
            return self._missing(request, (msg_id, timestamp, signature))
        _, timestamp_header, signature_header = self.headers
        if len(signature) > MAX_HEADER_LENGTH:
            return _invalid(f"{signature_header} is too long")
        if not _TIMESTAMP.fullmatch(timestamp):
            return _invalid(f"{timestamp_header} is not a unix timestamp in seconds")
        entries = [entry for entry in signature.split(" ") if entry]
        if len(entries) > MAX_SIGNATURES:
            return _invalid(f"{signature_header} holds more than {MAX_SIGNATURES} signatures")
        v1: list[bytes] = []
        v1a: list[bytes] = []
        for entry in entries:
            version, _, encoded = entry.partition(",")
            if version == "v1" and _V1.fullmatch(encoded):
                v1.append(base64.b64decode(encoded))
            elif version == "v1a" and _V1A.fullmatch(encoded):
                v1a.append(base64.b64decode(encoded))
        if not v1 and not v1a:
            return _invalid(f"{signature_header} has no well-formed v1 or v1a signature")
        if not (v1 and self._keys) and not (v1a and self._public_keys):
            version, option = ("v1", "secret") if v1 else ("v1a", "public_key")
            return _invalid(f"{signature_header} holds {version} signatures only; no {option} is configured")
        # The SDKs sign the timestamp as an integer: "0123" is signed as "123".
        signed = wire_bytes(msg_id) + b"." + str(int(timestamp)).encode() + b"."
        if not self._hmac_matches(signed, request.body, v1) and not self._ed25519_matches(
            signed, request.body, v1a
        ):
            return _invalid("no signature matches the body")
        skew = self.now() - int(timestamp)
        if abs(skew) > self.tolerance:
            when = "old" if skew > 0 else "in the future"
            return Rejection(
                status=401,
                code="timestamp_out_of_tolerance",
                message=(
                    f"{timestamp_header} is {abs(skew):.0f}s {when}, beyond the {self.tolerance:g}s tolerance"
                ),
            )
        return None

    def _missing(self, request: IngressRequest, values: tuple[str | None, ...]) -> Rejection:
        missing = [name for name, value in zip(self.headers, values, strict=True) if not value]
        message = f"missing {', '.join(missing)} header" + ("s" if len(missing) > 1 else "")
        other_prefix, other_type = self.other
        if request.header(f"{other_prefix}-signature"):
            message += f"; the request carries {other_prefix}-* headers: verify it with type {other_type}"
        return Rejection(status=401, code="missing_signature", message=message)

    def _hmac_matches(self, signed: bytes, body: bytes, given: list[bytes]) -> bool:
        return matches_any((_hmac_sha256(key, signed, body) for key in self._keys), given)

    def _ed25519_matches(self, signed: bytes, body: bytes, given: list[bytes]) -> bool:
        if not given or not self._public_keys:
            return False
        content = signed + body
        for key in self._public_keys:
            for signature in given:
                try:
                    key.verify(signature, content)
                except InvalidSignature:
                    continue
                return True
        return False


class SvixVerifier(StandardWebhooksVerifier):
    default_event_id: str | None = "header.svix-id"
    prefix = "svix"
    other = ("webhook", "standard-webhooks")


def _hmac_sha256(key: bytes, signed: bytes, body: bytes) -> bytes:
    mac = hmac.new(key, signed, hashlib.sha256)
    mac.update(body)  # not `signed + body`: no copy of a large body per key
    return mac.digest()


def _invalid(message: str) -> Rejection:
    return Rejection(status=401, code="invalid_signature", message=message)


@hookimpl
def hookgate_register_components(registry: ComponentRegistry) -> None:
    registry.add_signer("standard-webhooks", StandardWebhooksConfig, StandardWebhooksSigner)
    registry.add_verifier("standard-webhooks", StandardWebhooksVerifyConfig, StandardWebhooksVerifier)
    registry.add_verifier("svix", SvixVerifyConfig, SvixVerifier)
