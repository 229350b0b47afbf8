"""`handshake: {type: twitter_crc}`: the Twitter/X Account Activity API challenge-response check.

    sources:
      twitter:
        handshake: {type: twitter_crc, consumer_secret: "${TWITTER_CONSUMER_SECRET}"}
        # and the events themselves, signed with the same secret:
        verify: {type: hmac, header: X-Twitter-Webhooks-Signature, encoding: base64,
                 prefix: "sha256=", secret: "${TWITTER_CONSUMER_SECRET}"}

Twitter sends `GET /webhooks/twitter?crc_token=<token>` when the webhook is registered and then
hourly; the answer is 200 `{"response_token": "sha256=<base64 HMAC-SHA256(consumer_secret, token)>"}`.
A GET without `crc_token` is not a handshake (the core answers 405); POSTs are never answered here.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from urllib.parse import parse_qsl

import msgspec

from hookgate.hookspecs import hookimpl
from hookgate.types import ComponentRegistry, HandshakeResponse, IngressRequest


class TwitterCrcConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    consumer_secret: str

    def __post_init__(self) -> None:
        if not self.consumer_secret:
            raise ValueError("must not be empty - at `$.consumer_secret`")


def query_value(query_string: bytes, name: str) -> bytes | None:
    """The first value of a query parameter, percent-decoded, as the raw bytes that were sent."""
    pairs = parse_qsl(query_string.decode("latin-1"), keep_blank_values=True, encoding="latin-1")
    wanted = name.encode()
    for key, value in pairs:
        if key.encode("latin-1") == wanted:
            return value.encode("latin-1")
    return None


def response_token(consumer_secret: str, crc_token: bytes) -> str:
    digest = hmac.new(consumer_secret.encode(), crc_token, hashlib.sha256).digest()
    return "sha256=" + base64.b64encode(digest).decode()


class TwitterCrc:
    def __init__(self, config: TwitterCrcConfig):
        self._secret = config.consumer_secret

    def answer(self, request: IngressRequest) -> HandshakeResponse | None:
        if request.method not in ("GET", "HEAD"):
            return None
        token = query_value(request.query_string, "crc_token")
        if not token:
            return None
        body = msgspec.json.encode({"response_token": response_token(self._secret, token)})
        return HandshakeResponse(status=200, body=body, content_type="application/json")


@hookimpl
def hookgate_register_components(registry: ComponentRegistry) -> None:
    registry.add_handshake("twitter_crc", TwitterCrcConfig, TwitterCrc)
