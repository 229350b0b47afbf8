"""Sealing documents that hold secrets before they are stored in NATS (AES-256-GCM).

API endpoints are stored in JetStream KV with their secrets (signing keys, auth credentials, URL
and proxy passwords, secret headers). The whole document is sealed, so no plugin's secret field
can be missed: the stored value is `{"revision": n, "sealed": {"alg", "kid", "nonce", "data"}}`.
The endpoint's name is the associated data, so a sealed document copied to another key does not
open.

Keys are 32 random bytes in base64 (`openssl rand -base64 32`). The first key seals, and every key
opens: to rotate, put the new key first and keep the old one after it until every document was
sealed again (the gateway does that at startup). A key is named in the stored value by its id, the
first 8 hex digits of its SHA-256, never by the key itself.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import secrets
from collections.abc import Iterable
from typing import Any

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

ALGORITHM = "A256GCM"
KEY_BYTES = 32
KEY_HINT = "32 random bytes in base64, e.g. from `openssl rand -base64 32`"


class SealError(Exception):
    """A sealed document that cannot be opened. The text continues "its stored document ...", and
    says which key it needs by its id, never a key."""


def parse_key(text: str) -> bytes:
    """A key as the config writes it: base64 (standard or URL-safe) of 32 bytes; raises ValueError."""
    cleaned = text.strip().replace("-", "+").replace("_", "/")
    try:
        raw = base64.b64decode(cleaned + "=" * (-len(cleaned) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"expected {KEY_HINT}") from None
    if len(raw) != KEY_BYTES:
        raise ValueError(f"expected {KEY_HINT}; this one decodes to {len(raw)} bytes")
    return raw


def new_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def encode_key(key: bytes) -> str:
    return base64.b64encode(key).decode()


def key_id(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:8]


class Sealer:
    """The keys a gateway seals and opens documents with; the first one seals."""

    def __init__(self, keys: Iterable[bytes]):
        unique: dict[str, bytes] = {}
        for key in keys:
            unique.setdefault(key_id(key), key)
        self._keys = unique

    @property
    def can_seal(self) -> bool:
        return bool(self._keys)

    @property
    def current_kid(self) -> str | None:
        return next(iter(self._keys), None)

    def seal(self, document: Any, name: str) -> dict[str, str]:
        kid = self.current_kid
        assert kid is not None, "sealing needs a key"
        nonce = secrets.token_bytes(12)
        data = AESGCM(self._keys[kid]).encrypt(nonce, msgspec.json.encode(document), name.encode())
        return {
            "alg": ALGORITHM,
            "kid": kid,
            "nonce": base64.b64encode(nonce).decode(),
            "data": base64.b64encode(data).decode(),
        }

    def open(self, sealed: Any, name: str) -> Any:
        """The document in `sealed`; raises SealError saying what is wrong."""
        if not isinstance(sealed, dict) or sealed.get("alg") != ALGORITHM:
            raise SealError(f"is sealed in a way this version does not know ({ALGORITHM} expected)")
        kid = sealed.get("kid")
        key = self._keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            if not self._keys:
                raise SealError(
                    f"is sealed with key {kid}, and this gateway has no key: set broker.secrets_keys"
                )
            raise SealError(
                f"is sealed with key {kid}, which is not among broker.secrets_keys "
                f"(they are {', '.join(self._keys)}): add that key after the current one"
            )
        try:
            nonce = base64.b64decode(sealed["nonce"], validate=True)
            data = base64.b64decode(sealed["data"], validate=True)
            plain = AESGCM(key).decrypt(nonce, data, name.encode())
        except (KeyError, TypeError, ValueError, binascii.Error, InvalidTag):
            raise SealError(
                f"does not open with key {kid}: it was altered, or stored under another name"
            ) from None
        try:
            return msgspec.json.decode(plain)
        except msgspec.DecodeError:
            raise SealError("holds sealed content that is not JSON") from None
