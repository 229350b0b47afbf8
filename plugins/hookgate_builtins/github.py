"""`verify: {type: github}`: GitHub webhook signatures, and GitHub's `ping` answered without storing it.

    sources:
      github:
        verify: {type: github, secret: "${GITHUB_WEBHOOK_SECRET}"}
        # options: legacy_sha1: false, route_ping: false; secret may be a list while rotating

What is checked, on the raw body bytes:

- `X-Hub-Signature-256: sha256=<64 hex digits>` must be the HMAC-SHA256 of the body under one of
  the secrets (constant-time comparison).
- The legacy `X-Hub-Signature: sha1=<40 hex digits>` is used only with `legacy_sha1: true`, and only
  when the request has no `X-Hub-Signature-256` (a request that has both is held to SHA-256).
- Defaults: event type `header.X-GitHub-Event`, event id `header.X-GitHub-Delivery` (GitHub keeps
  the delivery id when it redelivers, so a redelivery is stored once).
- After the signature verified, a `ping` (sent when a webhook is created) is answered 200
  `{"ok":true,"event":"ping"}` and neither stored nor routed, unless `route_ping: true`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from hookgate.hookspecs import hookimpl
from hookgate.plugin_kit import check_secrets, matches_any, secret_keys
from hookgate.types import ComponentRegistry, HandshakeResponse, IngressRequest, Rejection

SHA256_HEADER = "X-Hub-Signature-256"
SHA1_HEADER = "X-Hub-Signature"
EVENT_HEADER = "X-GitHub-Event"
PING_ANSWER = b'{"ok":true,"event":"ping"}'


class GitHubConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    secret: str | list[str]
    legacy_sha1: bool = False  # also accept the SHA-1 `X-Hub-Signature` when no SHA-256 one is sent
    route_ping: bool = False  # store and route `ping` events instead of answering them here

    def __post_init__(self) -> None:
        check_secrets(self.secret)


@dataclass(frozen=True)
class _Scheme:
    header: str
    prefix: str
    pattern: re.Pattern[str]
    digest: Callable[..., Any]


_SHA256 = _Scheme(SHA256_HEADER, "sha256=", re.compile(r"[0-9a-fA-F]{64}"), hashlib.sha256)
_SHA1 = _Scheme(SHA1_HEADER, "sha1=", re.compile(r"[0-9a-fA-F]{40}"), hashlib.sha1)


class GitHubVerifier:
    default_event_type: str | None = f"header.{EVENT_HEADER}"
    default_event_id: str | None = "header.X-GitHub-Delivery"

    def __init__(self, config: GitHubConfig):
        self._keys = secret_keys(config.secret)
        self.legacy_sha1 = config.legacy_sha1
        self.route_ping = config.route_ping

    def verify(self, request: IngressRequest) -> Rejection | None:
        scheme, value = _SHA256, request.header(SHA256_HEADER)
        if not value and self.legacy_sha1:
            scheme, value = _SHA1, request.header(SHA1_HEADER)
        if not value:
            also = f" (or {SHA1_HEADER})" if self.legacy_sha1 else ""
            return Rejection(status=401, code="missing_signature", message=f"missing {SHA256_HEADER}{also}")
        if not value.startswith(scheme.prefix):
            return _invalid(f"{scheme.header} does not start with {scheme.prefix!r}")
        hex_digest = value[len(scheme.prefix) :]
        if not scheme.pattern.fullmatch(hex_digest):
            return _invalid(f"{scheme.header} is not a {scheme.prefix[:-1]} hex digest")
        given = bytes.fromhex(hex_digest)
        expected = (hmac.new(key, request.body, scheme.digest).digest() for key in self._keys)
        return None if matches_any(expected, [given]) else _invalid("signature does not match")

    def handshake(self, request: IngressRequest) -> HandshakeResponse | None:
        """Answer `ping` here (called only after the signature verified), unless it is to be routed."""
        if self.route_ping or request.header(EVENT_HEADER) != "ping":
            return None
        return HandshakeResponse(status=200, body=PING_ANSWER, content_type="application/json")


def _invalid(message: str) -> Rejection:
    return Rejection(status=401, code="invalid_signature", message=message)


@hookimpl
def hookgate_register_components(registry: ComponentRegistry) -> None:
    registry.add_verifier("github", GitHubConfig, GitHubVerifier)
