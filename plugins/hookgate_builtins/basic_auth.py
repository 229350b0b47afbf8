"""`auth: [{type: basic}]`: HTTP Basic credentials in the Authorization header (RFC 7617).

    sources:
      acme:
        auth:
          - type: basic
            username: acme
            password: ["${ACME_PASSWORD}", "${ACME_PASSWORD_OLD}"]   # one password, or a list while rotating

Credentials are UTF-8 and compared in constant time (digests of equal length, the username and
every password always compared). A missing or malformed header (another scheme, not base64, no
colon, not UTF-8) or wrong credentials are refused with 403; nothing sent is logged or echoed. The
Authorization header is dropped from the event before it is stored, so it reaches no endpoint
(`forward_credential: true` keeps it).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import Annotated

import msgspec

from hookgate.hookspecs import hookimpl
from hookgate.plugin_kit import constant_time_equal, matches_any
from hookgate.types import ComponentRegistry, IngressRequest, Rejection


def _at(path: str, message: str) -> ValueError:
    """A ValueError the config loader reports at `<rule path><path>` (msgspec's own suffix)."""
    return ValueError(f"{message} - at `${path}`")


class BasicAuthConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    username: str
    password: str | list[str]
    forward_credential: Annotated[
        bool,
        msgspec.Meta(
            description="also send the Authorization header on to endpoints; by default it is dropped"
        ),
    ] = False

    def __post_init__(self) -> None:
        if not self.username:
            raise _at(".username", "must not be empty")
        if ":" in self.username:
            raise _at(".username", "must not contain ':' (Basic credentials are user:password)")
        if isinstance(self.password, str):
            if not self.password:
                raise _at(".password", "must not be empty")
            return
        if not self.password:
            raise _at(".password", "give at least one password")
        for i, password in enumerate(self.password):
            if not password:
                raise _at(f".password[{i}]", "must not be empty")


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


def parse_basic(header: str | None) -> tuple[bytes, bytes] | None:
    """(username, password) as UTF-8 bytes from an Authorization value, or None if it is not Basic."""
    if not header:
        return None
    scheme, _, credentials = header.strip().partition(" ")
    credentials = credentials.strip()
    if scheme.lower() != "basic" or not credentials:
        return None
    try:
        decoded = base64.b64decode(credentials.encode("ascii"), validate=True)
        decoded.decode("utf-8")
    except (UnicodeError, binascii.Error, ValueError):
        return None
    username, colon, password = decoded.partition(b":")
    if not colon:
        return None
    return username, password


class BasicAuthRule:
    def __init__(self, config: BasicAuthConfig):
        self.credential_headers = () if config.forward_credential else ("authorization",)
        passwords = [config.password] if isinstance(config.password, str) else config.password
        self._username = _digest(config.username.encode())
        self._passwords = [_digest(p.encode()) for p in passwords]

    def check(self, request: IngressRequest) -> Rejection | None:
        header = request.header("authorization")
        if not header:
            return _forbidden("missing Basic credentials (Authorization header)")
        credentials = parse_basic(header)
        if credentials is None:
            return _forbidden("malformed Basic credentials in the Authorization header")
        username, password = credentials
        sent = _digest(password)
        ok = constant_time_equal(_digest(username), self._username)
        password_ok = matches_any(self._passwords, [sent])  # no early exit: every password costs the same
        return None if ok & password_ok else _forbidden("invalid username or password")


def _forbidden(message: str) -> Rejection:
    return Rejection(status=403, code="forbidden", message=message)


@hookimpl
def hookgate_register_components(registry: ComponentRegistry) -> None:
    registry.add_access_rule("basic", BasicAuthConfig, BasicAuthRule)
