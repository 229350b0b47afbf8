"""`signing: {scheme: standard-webhooks}`: Standard Webhooks v1 (HMAC-SHA256) signatures.

The signed content is `{webhook-id}.{webhook-timestamp}.{body}`; secrets are `whsec_` followed by
base64 key bytes (as Svix issues them). With several secrets (rotation), `webhook-signature` holds
one space-separated signature per secret.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

import msgspec

from hookgate.hookspecs import hookimpl
from hookgate.types import ComponentRegistry, OutgoingRequest

SECRET_PREFIX = "whsec_"


class StandardWebhooksConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    secret: str | list[str]

    def __post_init__(self) -> None:
        if isinstance(self.secret, str):
            decode_secret(self.secret)
            return
        if not self.secret:
            raise ValueError("secret: give at least one secret")
        for i, secret in enumerate(self.secret):
            decode_secret(secret, f"secret[{i}]")


def decode_secret(secret: str, name: str = "secret") -> bytes:
    encoded = secret.removeprefix(SECRET_PREFIX)
    # Unpadded base64 is accepted, as the Standard Webhooks and Svix libraries accept it.
    encoded += "=" * (-len(encoded) % 4)
    try:
        key = base64.b64decode(encoded, validate=True)
    except (ValueError, binascii.Error):
        raise ValueError(f"{name} must be 'whsec_' followed by base64") from None
    if len(key) < 16:
        raise ValueError(f"{name} is too short: use at least 16 random bytes (24 or more recommended)")
    return key


class StandardWebhooksSigner:
    def __init__(self, config: StandardWebhooksConfig):
        secrets = [config.secret] if isinstance(config.secret, str) else config.secret
        self._keys = [decode_secret(s) for s in secrets]

    def signature(self, msg_id: str, timestamp: int, body: bytes) -> str:
        content = f"{msg_id}.{timestamp}.".encode() + body
        return " ".join(
            "v1," + base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode()
            for key in self._keys
        )

    def sign(self, request: OutgoingRequest) -> None:
        request.set_header(
            "webhook-signature", self.signature(request.event_id, request.timestamp, request.body)
        )


@hookimpl
def hookgate_register_components(registry: ComponentRegistry) -> None:
    registry.add_signer("standard-webhooks", StandardWebhooksConfig, StandardWebhooksSigner)
