"""`signing: {scheme: hmac}`: an HMAC of the request in one header, for receivers that check
GitHub-, Shopify- or Acme-style signatures rather than Standard Webhooks.

    signing: {scheme: hmac, header: X-Hub-Signature-256, algorithm: sha256, encoding: hex,
              prefix: "sha256=", secret: "${BILLING_SECRET}"}

The header's value is `prefix` followed by the HMAC (`sha1`, `sha256` or `sha512`; default
`sha256`) in `hex` (default) or `base64`. The secret is used as written (its UTF-8 bytes), as
GitHub and Shopify use theirs. It mirrors the `hmac` verifier, so hookgate can check what hookgate
signed.

By default the HMAC covers the body bytes as sent. `signed_content` is a template of what is signed
instead, for receivers that bind the signature to a time or an id:

    signing: {scheme: hmac, header: X-Signature, secret: "${SECRET}",
              signed_content: "{timestamp}.{body}"}

- `{body}`: the body bytes. Every template must hold it: a signature that does not cover the body
  would let anyone replace it.
- `{timestamp}`: the value of the `webhook-timestamp` header of the same request (unix seconds),
  which every delivery carries.
- `{id}`: the value of `webhook-id`, the event id (the same on every retry).
- `{{` and `}}` stand for literal braces; any other text is copied as is. An unknown placeholder or
  a stray brace is a config error.

Rotation. Receivers of this kind of header take one signature, so the signer sends one: it signs
with the first secret of `secrets` whose `expires` has not passed. List the secrets oldest first;
every one but the last carries the time it stops being used (an RFC3339 time with its offset, such
as "2026-12-31T00:00:00Z"), and the last, the current secret, has none:

    signing:
      scheme: hmac
      header: X-Hub-Signature-256
      prefix: "sha256="
      secrets:
        - {secret: "${OLD_SECRET}", expires: "2026-12-31T00:00:00Z"}
        - {secret: "${NEW_SECRET}"}

Give the receiver the new secret before that time (hookgate's own `hmac` verifier takes a list),
and drop the old one after it. A list in which some secret could never be used (one listed after a
secret without `expires`, or after one that expires later) is a config error. `secrets` replaces
`secret`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Literal

import msgspec

from hookgate.hookspecs import hookimpl
from hookgate.plugin_kit import HEADER_NAME, parse_template
from hookgate.types import ComponentRegistry, OutgoingRequest

_PLACEHOLDERS = ("body", "timestamp", "id")
# Headers that frame the request or that every delivery carries already: a signer must not replace them.
_RESERVED_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "content-type",
        "transfer-encoding",
        "connection",
        "webhook-id",
        "webhook-timestamp",
        "hookgate-delivery-id",
        "hookgate-attempt",
    }
)

Secret = Annotated[str, msgspec.Meta(description="an HMAC key, used as written (its UTF-8 bytes)")]
Expires = Annotated[
    datetime,
    msgspec.Meta(
        tz=True, description='when this secret stops being used: an RFC3339 time, "2026-12-31T00:00:00Z"'
    ),
]


class HmacSignerSecret(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One entry of `secrets`: used until `expires`, or for good without it."""

    secret: Secret
    expires: Expires | None = None

    def __post_init__(self) -> None:
        if not self.secret:
            # An empty key (say, from an unset `${VAR:-}`) would let anyone compute a valid signature.
            raise ValueError("secret must not be empty")


class HmacSignerConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # The header that carries the signature, e.g. X-Hub-Signature-256.
    header: str
    # The key. For rotation, give `secrets` instead.
    secret: Secret | None = None
    # Rotation: secrets oldest first, each but the last with the time it stops being used.
    secrets: list[HmacSignerSecret] | None = None
    algorithm: Literal["sha1", "sha256", "sha512"] = "sha256"
    encoding: Literal["hex", "base64"] = "hex"
    # Text put before the signature, e.g. "sha256=".
    prefix: str = ""
    # What is signed: {body}, {timestamp} (webhook-timestamp), {id} (webhook-id) and literal text.
    signed_content: str = "{body}"

    def __post_init__(self) -> None:
        if not HEADER_NAME.fullmatch(self.header):
            raise ValueError(f"header {self.header!r} is not a header name")
        if self.header.lower() in _RESERVED_HEADERS:
            raise ValueError(f"header {self.header!r} is set by hookgate itself: pick another header")
        if self.secrets is None:
            if self.secret is None:
                raise ValueError("missing secret: give secret, or secrets (a list with expiry times)")
            if not self.secret:
                raise ValueError("secret must not be empty")
        else:
            if self.secret is not None:
                raise ValueError("give secret or secrets (the list with expiry times), not both")
            _check_rotation(self.secrets)
        parse_template(self.signed_content, _PLACEHOLDERS)

    def rotation(self) -> list[HmacSignerSecret]:
        """The secrets in the order they are used."""
        if self.secrets is not None:
            return list(self.secrets)
        assert self.secret is not None
        return [HmacSignerSecret(secret=self.secret)]


def _check_rotation(secrets: list[HmacSignerSecret]) -> None:
    if not secrets:
        raise ValueError("secrets: give at least one secret")
    *retiring, current = secrets
    previous: datetime | None = None
    for i, entry in enumerate(retiring):
        if entry.expires is None:
            raise ValueError(
                f"secrets[{i}] has no expires, so the secrets after it would never be used: list the "
                "secrets oldest first, each but the last with the time it stops being used"
            )
        if previous is not None and entry.expires <= previous:
            raise ValueError(
                f"secrets[{i}] expires no later than secrets[{i - 1}], so it would never be used: list "
                "the secrets oldest first, by their expires"
            )
        previous = entry.expires
    if current.expires is not None:
        raise ValueError(
            f"secrets[{len(secrets) - 1}], the last, must have no expires: it is the secret used once "
            "the others expired (list the secrets oldest first)"
        )


class HmacSigner:
    """Sets `header` to `prefix` + the HMAC of the signed content, under the current secret."""

    def __init__(self, config: HmacSignerConfig, *, now: Callable[[], float] = time.time):
        self.header = config.header
        self.prefix = config.prefix
        self.encoding = config.encoding
        self.digest = getattr(hashlib, config.algorithm)
        self._secrets = [
            (entry.secret.encode(), entry.expires.timestamp() if entry.expires is not None else None)
            for entry in config.rotation()
        ]
        self._parts = parse_template(config.signed_content, _PLACEHOLDERS)
        self.now = now

    def current_secret(self) -> bytes:
        """The first secret that has not expired (the last one never expires)."""
        now = self.now()
        for key, expires in self._secrets:
            if expires is None or now < expires:
                return key
        raise AssertionError("the last secret has no expires")  # guaranteed by the config

    def public_keys(self) -> list[str]:
        """None: an HMAC is checked with the shared secret itself, which is not printed."""
        return []

    def sign(self, request: OutgoingRequest) -> None:
        content = b"".join(self._content(request))
        mac = hmac.new(self.current_secret(), content, self.digest).digest()
        encoded = mac.hex() if self.encoding == "hex" else base64.b64encode(mac).decode()
        request.set_header(self.header, self.prefix + encoded)

    def _content(self, request: OutgoingRequest) -> list[bytes]:
        pieces: list[bytes] = []
        for part in self._parts:
            if isinstance(part, bytes):
                pieces.append(part)
            elif part[0] == "body":
                pieces.append(request.body)
            elif part[0] == "timestamp":
                pieces.append(str(request.timestamp).encode())
            else:
                pieces.append(request.event_id.encode())
        return pieces


@hookimpl
def hookgate_register_components(registry: ComponentRegistry) -> None:
    registry.add_signer("hmac", HmacSignerConfig, HmacSigner)
