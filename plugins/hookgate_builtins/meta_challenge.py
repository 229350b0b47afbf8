"""`handshake: {type: meta}`: Meta's (Facebook, Instagram, WhatsApp) webhook verification request.

    sources:
      whatsapp:
        handshake: {type: meta, verify_token: "${META_VERIFY_TOKEN}"}
        # and the events themselves, signed with the app secret:
        verify: {type: hmac, header: X-Hub-Signature-256, prefix: "sha256=", secret: "${META_APP_SECRET}"}

Meta sends `GET /webhooks/whatsapp?hub.mode=subscribe&hub.verify_token=<T>&hub.challenge=<C>` when
the webhook is set up. When `T` is the configured `verify_token` (compared in constant time) the
answer is 200 with exactly `C` as the text/plain body; otherwise 403 `{"error": "forbidden"}`. A GET
without `hub.mode` is not a handshake (the core answers 405); POSTs are never answered here.
"""

from __future__ import annotations

import hashlib
from urllib.parse import parse_qsl

import msgspec

from hookgate.hookspecs import hookimpl
from hookgate.plugin_kit import constant_time_equal
from hookgate.types import ComponentRegistry, HandshakeResponse, IngressRequest


class MetaChallengeConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    verify_token: str

    def __post_init__(self) -> None:
        if not self.verify_token:
            raise ValueError("must not be empty - at `$.verify_token`")


def query_params(query_string: bytes) -> dict[bytes, bytes]:
    """Query parameters (the first value of each), percent-decoded, as the raw bytes that were sent."""
    pairs = parse_qsl(query_string.decode("latin-1"), keep_blank_values=True, encoding="latin-1")
    params: dict[bytes, bytes] = {}
    for key, value in pairs:
        params.setdefault(key.encode("latin-1"), value.encode("latin-1"))
    return params


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


class MetaChallenge:
    def __init__(self, config: MetaChallengeConfig):
        self._token = _digest(config.verify_token.encode())

    def answer(self, request: IngressRequest) -> HandshakeResponse | None:
        if request.method not in ("GET", "HEAD"):
            return None
        params = query_params(request.query_string)
        mode = params.get(b"hub.mode")
        if mode is None:
            return None
        token = params.get(b"hub.verify_token", b"")
        # Compared first and always, so every refusal below takes the same time.
        token_ok = constant_time_equal(_digest(token), self._token)
        if mode != b"subscribe":
            return _forbidden("hub.mode must be subscribe")
        if not token_ok:
            return _forbidden("hub.verify_token does not match")
        challenge = params.get(b"hub.challenge")
        if not challenge:
            return _forbidden("hub.challenge is missing")
        return HandshakeResponse(status=200, body=challenge, content_type="text/plain")


def _forbidden(message: str) -> HandshakeResponse:
    body = msgspec.json.encode({"error": "forbidden", "message": message})
    return HandshakeResponse(status=403, body=body, content_type="application/json")


@hookimpl
def hookgate_register_components(registry: ComponentRegistry) -> None:
    registry.add_handshake("meta", MetaChallengeConfig, MetaChallenge)
