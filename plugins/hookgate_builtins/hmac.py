"""`verify: {type: hmac}`: a generic HMAC signature check for providers without a preset.

    verify: {type: hmac, header: X-Acme-Signature, algorithm: sha256, encoding: hex,
             prefix: "sha256=", secret: "${ACME_SECRET}"}

By default the signature is the HMAC of the raw body bytes. `secret` may be a list while rotating:
any one of them matching passes.

Providers that sign more than the body are described with a template of the signed content:

    verify: {type: hmac, header: X-Sig, secret: "${SECRET}", signed_content: "{timestamp}.{body}",
             timestamp_header: X-Timestamp, tolerance: 5m}

- `{body}`: the raw body bytes. Every template must hold it: a signature that does not cover the
  body would let anyone replace it.
- `{timestamp}`: the value of `timestamp_header`, exactly as sent. It must be unix seconds (ASCII
  digits) within `tolerance` of the clock, either way (default 5m), checked after the signature
  (`timestamp_out_of_tolerance` thus means "signed, but replayed or from a skewed clock").
  `timestamp_header` requires `{timestamp}` in the template (an unsigned timestamp proves nothing),
  and `tolerance` requires `timestamp_header`.
- `{header.<Name>}`: the value of any request header, exactly as sent (a missing one is refused
  with `missing_signature`).
- `{{` and `}}` stand for literal braces; any other text is copied as is. An unknown placeholder or
  a stray brace is a config error.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import time
from collections.abc import Callable
from typing import Literal

import msgspec

from hookgate.hookspecs import hookimpl
from hookgate.plugin_kit import (
    HEADER_NAME,
    Duration,
    check_secrets,
    matches_any,
    parse_template,
    seconds,
    secret_keys,
    wire_bytes,
)
from hookgate.types import ComponentRegistry, IngressRequest, Rejection

DEFAULT_TOLERANCE = "5m"

_TIMESTAMP = re.compile(r"[0-9]{1,15}")  # ASCII digits only (int() would take any Unicode digit)
_PLACEHOLDERS = ("body", "timestamp")


class HmacConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    header: str
    secret: str | list[str]
    algorithm: Literal["sha1", "sha256", "sha512"] = "sha256"
    encoding: Literal["hex", "base64"] = "hex"
    prefix: str = ""
    # What is signed: {body}, {timestamp}, {header.<Name>} and literal text.
    signed_content: str = "{body}"
    # The header holding the unix timestamp that {timestamp} stands for.
    timestamp_header: str | None = None
    # How far that timestamp may be from the clock, either way (default 5m).
    tolerance: Duration | None = None

    def __post_init__(self) -> None:
        if not self.header:
            raise ValueError("header must not be empty")
        check_secrets(self.secret)
        parts = parse_template(self.signed_content, _PLACEHOLDERS, headers=True)
        signs_timestamp = ("timestamp",) in parts
        if self.timestamp_header is None:
            if signs_timestamp:
                raise ValueError("signed_content uses {timestamp}: set timestamp_header too")
            if self.tolerance is not None:
                raise ValueError("tolerance applies to timestamp_header, which is not set")
        else:
            if not HEADER_NAME.fullmatch(self.timestamp_header):
                raise ValueError(f"timestamp_header {self.timestamp_header!r} is not a header name")
            if not signs_timestamp:
                raise ValueError(
                    "timestamp_header is set but signed_content does not hold {timestamp}: "
                    "an unsigned timestamp proves nothing"
                )
        if self.tolerance is not None and seconds(self.tolerance) <= 0:
            raise ValueError("tolerance must be longer than 0s")


class HmacVerifier:
    default_event_type: str | None = None
    default_event_id: str | None = None

    def __init__(self, config: HmacConfig, *, now: Callable[[], float] = time.time):
        self.header = config.header
        self.prefix = config.prefix
        self.encoding = config.encoding
        self.digest = getattr(hashlib, config.algorithm)
        self._keys = secret_keys(config.secret)
        self._parts = parse_template(config.signed_content, _PLACEHOLDERS, headers=True)
        self._body_only = self._parts == [("body",)]
        self.timestamp_header = config.timestamp_header
        self.tolerance = seconds(config.tolerance or DEFAULT_TOLERANCE)
        self.now = now

    def verify(self, request: IngressRequest) -> Rejection | None:
        value = request.header(self.header)
        if not value:
            return _missing(f"missing {self.header} header")
        timestamp: str | None = None
        if self.timestamp_header is not None:
            timestamp = request.header(self.timestamp_header)
            if not timestamp:
                return _missing(f"missing {self.timestamp_header} header")
            if not _TIMESTAMP.fullmatch(timestamp):
                return _invalid(f"{self.timestamp_header} is not a unix timestamp in seconds")
        if self.prefix:
            if not value.startswith(self.prefix):
                return _invalid(f"{self.header} does not start with {self.prefix!r}")
            value = value[len(self.prefix) :]
        try:
            given = bytes.fromhex(value) if self.encoding == "hex" else base64.b64decode(value, validate=True)
        except (ValueError, binascii.Error):
            return _invalid(f"{self.header} is not valid {self.encoding}")
        if self._body_only:
            content = request.body
        else:
            pieces = self._content(request, timestamp)
            if isinstance(pieces, Rejection):
                return pieces
            content = b"".join(pieces)
        if not matches_any((hmac.new(key, content, self.digest).digest() for key in self._keys), [given]):
            return _invalid("signature does not match")
        if timestamp is not None:
            skew = self.now() - int(timestamp)
            if abs(skew) > self.tolerance:
                when = "old" if skew > 0 else "in the future"
                return Rejection(
                    status=401,
                    code="timestamp_out_of_tolerance",
                    message=(
                        f"{self.timestamp_header} is {abs(skew):.0f}s {when}, "
                        f"beyond the {self.tolerance:g}s tolerance"
                    ),
                )
        return None

    def _content(self, request: IngressRequest, timestamp: str | None) -> list[bytes] | Rejection:
        pieces: list[bytes] = []
        for part in self._parts:
            if isinstance(part, bytes):
                pieces.append(part)
            elif part[0] == "body":
                pieces.append(request.body)
            elif part[0] == "timestamp":
                assert timestamp is not None  # the config requires timestamp_header with {timestamp}
                pieces.append(timestamp.encode("ascii"))
            else:
                header = request.header(part[1])
                if header is None:
                    return _missing(f"missing {part[1]} header (part of the signed content)")
                pieces.append(wire_bytes(header))
        return pieces


def _missing(message: str) -> Rejection:
    return Rejection(status=401, code="missing_signature", message=message)


def _invalid(message: str) -> Rejection:
    return Rejection(status=401, code="invalid_signature", message=message)


@hookimpl
def hookgate_register_components(registry: ComponentRegistry) -> None:
    registry.add_verifier("hmac", HmacConfig, HmacVerifier)
