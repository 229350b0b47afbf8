"""`verify: {type: hmac}`: a generic HMAC signature check for providers without a preset.

    verify: {type: hmac, header: X-Acme-Signature, algorithm: sha256, encoding: hex,
             prefix: "sha256=", secret: "${ACME_SECRET}"}

The signature is the HMAC of the raw body bytes; `secret` may be a list while rotating.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from typing import Literal

import msgspec

from hookgate.hookspecs import hookimpl
from hookgate.types import ComponentRegistry, IngressRequest, Rejection


class HmacConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    header: str
    secret: str | list[str]
    algorithm: Literal["sha1", "sha256", "sha512"] = "sha256"
    encoding: Literal["hex", "base64"] = "hex"
    prefix: str = ""

    def __post_init__(self) -> None:
        if not self.header:
            raise ValueError("header must not be empty")
        secrets = [self.secret] if isinstance(self.secret, str) else self.secret
        if not secrets:
            raise ValueError("secret: give at least one secret")
        if not all(secrets):
            # An empty key (say, from an unset `${VAR:-}`) would let anyone compute a valid signature.
            raise ValueError("secret must not be empty")


class HmacVerifier:
    default_event_type: str | None = None
    default_event_id: str | None = None

    def __init__(self, config: HmacConfig):
        self.header = config.header
        self.prefix = config.prefix
        self.encoding = config.encoding
        self.digest = getattr(hashlib, config.algorithm)
        secrets = [config.secret] if isinstance(config.secret, str) else config.secret
        self._keys = [s.encode() for s in secrets]

    def verify(self, request: IngressRequest) -> Rejection | None:
        value = request.header(self.header)
        if not value:
            return Rejection(status=401, code="missing_signature", message=f"missing {self.header} header")
        if self.prefix:
            if not value.startswith(self.prefix):
                return _invalid(f"{self.header} does not start with {self.prefix!r}")
            value = value[len(self.prefix) :]
        try:
            given = bytes.fromhex(value) if self.encoding == "hex" else base64.b64decode(value, validate=True)
        except (ValueError, binascii.Error):
            return _invalid(f"{self.header} is not valid {self.encoding}")
        for key in self._keys:
            expected = hmac.new(key, request.body, self.digest).digest()
            if hmac.compare_digest(expected, given):
                return None
        return _invalid("signature does not match")


def _invalid(message: str) -> Rejection:
    return Rejection(status=401, code="invalid_signature", message=message)


@hookimpl
def hookgate_register_components(registry: ComponentRegistry) -> None:
    registry.add_verifier("hmac", HmacConfig, HmacVerifier)
