"""`verify: {type: stripe}`: Stripe's `Stripe-Signature` webhook signatures.

    sources:
      stripe:
        verify: {type: stripe, secret: "${STRIPE_WEBHOOK_SECRET}", tolerance: 5m}

What is checked, on the raw body bytes before anything parses them:

- `Stripe-Signature: t=<unix seconds>,v1=<hex>[,v1=<hex>...]` is present and well formed. Other
  schemes (`v0=`, future ones) are ignored; at least one `v1=` must be there.
- One of the `v1` signatures equals HMAC-SHA256 of `"{t}.{body}"`, keyed with the endpoint secret
  exactly as Stripe shows it (the bytes of the whole `whsec_...` string; it is not base64-decoded).
  `secret` may be a list while rotating: any one of them matching passes.
- `t` is within `tolerance` of the clock, in the past or the future (default 5m): a replayed or
  badly clocked request is refused with `timestamp_out_of_tolerance`.

Refusals are 401 with code `missing_signature`, `invalid_signature` or
`timestamp_out_of_tolerance`. The event type and id default to the body's `type` and `id`
(`evt_...`), so Stripe's retries of one event are stored and routed once.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Callable
from typing import Annotated

import msgspec

from hookgate.hookspecs import hookimpl
from hookgate.plugin_kit import Duration, matches_any, seconds, secret_keys
from hookgate.types import ComponentRegistry, IngressRequest, Rejection

HEADER = "Stripe-Signature"
SCHEME = "v1"
# A real header holds a timestamp and a few signatures (more while a secret is being rolled);
# anything much longer is not worth parsing.
MAX_HEADER_LENGTH = 4096

Secret = Annotated[str, msgspec.Meta(min_length=1, description="a webhook endpoint secret, whsec_...")]

_TIMESTAMP = re.compile(r"[0-9]{1,15}")
_HEX_SHA256 = re.compile(r"[0-9a-f]{64}")  # as Stripe sends it, and its libraries compare it


class StripeConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    secret: Secret | Annotated[list[Secret], msgspec.Meta(min_length=1)]
    # How far `t` may be from the clock, either way.
    tolerance: Duration = "5m"

    def __post_init__(self) -> None:
        if seconds(self.tolerance) <= 0:
            raise ValueError("tolerance must be longer than 0s")


class StripeVerifier:
    default_event_type: str | None = "body.type"
    default_event_id: str | None = "body.id"

    def __init__(self, config: StripeConfig, now: Callable[[], float] = time.time):
        self._keys = secret_keys(config.secret)
        self.tolerance = seconds(config.tolerance)
        self._now = now

    def verify(self, request: IngressRequest) -> Rejection | None:
        value = (request.header(HEADER) or "").strip()
        if not value:
            return Rejection(status=401, code="missing_signature", message=f"missing {HEADER} header")
        if len(value) > MAX_HEADER_LENGTH:
            return _invalid(f"{HEADER} is too long")
        timestamp: int | None = None
        signatures: list[bytes] = []
        for item in value.split(","):
            name, _, given = item.partition("=")
            if name == "t" and timestamp is None:  # the first `t`, as Stripe's own libraries read it
                if not _TIMESTAMP.fullmatch(given):
                    return _invalid(f"{HEADER} has a malformed timestamp")
                timestamp = int(given)
            elif name == SCHEME and _HEX_SHA256.fullmatch(given):
                signatures.append(given.encode("ascii"))
        if timestamp is None:
            return _invalid(f"{HEADER} has no timestamp (t=)")
        if not signatures:
            return _invalid(f"{HEADER} has no well-formed {SCHEME} signature")
        signed = f"{timestamp}.".encode() + request.body
        if not self._matches(signed, signatures):
            return _invalid("no v1 signature matches the body")
        if abs(self._now() - timestamp) > self.tolerance:
            return Rejection(
                status=401,
                code="timestamp_out_of_tolerance",
                message=f"the {HEADER} timestamp is more than {self.tolerance:g}s from the current time",
            )
        return None

    def _matches(self, signed: bytes, signatures: list[bytes]) -> bool:
        expected = (hmac.new(key, signed, hashlib.sha256).hexdigest().encode("ascii") for key in self._keys)
        return matches_any(expected, signatures)


def _invalid(message: str) -> Rejection:
    return Rejection(status=401, code="invalid_signature", message=message)


@hookimpl
def hookgate_register_components(registry: ComponentRegistry) -> None:
    registry.add_verifier("stripe", StripeConfig, StripeVerifier)
