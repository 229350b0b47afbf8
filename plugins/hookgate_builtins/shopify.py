"""`verify: {type: shopify}`: Shopify webhook signatures.

    sources:
      shopify:
        verify: {type: shopify, secret: "${SHOPIFY_API_SECRET}"}   # or a list while rotating

What is checked, on the raw body bytes:

- `X-Shopify-Hmac-Sha256` must be the standard base64 (44 characters, padded) of the HMAC-SHA256
  of the body under one of the secrets (the app's client secret), compared in constant time.
- Defaults: event type `header.X-Shopify-Topic` (e.g. `orders/create`), event id
  `header.X-Shopify-Webhook-Id` (Shopify keeps it when it retries, so a retry is stored once).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

import msgspec

from hookgate.hookspecs import hookimpl
from hookgate.plugin_kit import check_secrets, matches_any, secret_keys
from hookgate.types import ComponentRegistry, IngressRequest, Rejection

SIGNATURE_HEADER = "X-Shopify-Hmac-Sha256"
# 32 digest bytes in standard base64: 43 characters and one "=" of padding.
_BASE64_SHA256 = re.compile(r"[A-Za-z0-9+/]{43}=")


class ShopifyConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    secret: str | list[str]

    def __post_init__(self) -> None:
        check_secrets(self.secret)


class ShopifyVerifier:
    default_event_type: str | None = "header.X-Shopify-Topic"
    default_event_id: str | None = "header.X-Shopify-Webhook-Id"

    def __init__(self, config: ShopifyConfig):
        self._keys = secret_keys(config.secret)

    def verify(self, request: IngressRequest) -> Rejection | None:
        value = request.header(SIGNATURE_HEADER)
        if not value:
            return Rejection(status=401, code="missing_signature", message=f"missing {SIGNATURE_HEADER}")
        if not _BASE64_SHA256.fullmatch(value):
            return _invalid(f"{SIGNATURE_HEADER} is not a base64 SHA-256 digest")
        given = base64.b64decode(value, validate=True)
        expected = (hmac.new(key, request.body, hashlib.sha256).digest() for key in self._keys)
        return None if matches_any(expected, [given]) else _invalid("signature does not match")


def _invalid(message: str) -> Rejection:
    return Rejection(status=401, code="invalid_signature", message=message)


@hookimpl
def hookgate_register_components(registry: ComponentRegistry) -> None:
    registry.add_verifier("shopify", ShopifyConfig, ShopifyVerifier)
