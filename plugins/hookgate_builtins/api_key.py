"""`auth: [{type: api_key}]`: a shared key in a header or a query parameter.

    sources:
      acme:
        auth:
          - type: api_key
            header: X-Api-Key              # or  query: api_key  (exactly one of the two)
            key: ["${ACME_KEY}", "${ACME_KEY_OLD}"]   # one key, or a list while rotating

The key is compared in constant time (digests of equal length), every configured key is tried, and
the key is never logged or echoed. A missing, repeated or wrong key is refused with 403. Prefer
`header:`: query strings end up in access logs along the way. The key header is dropped from the
event before it is stored, so it reaches no endpoint (`forward_credential: true` keeps it); the
query string is never stored.
"""

from __future__ import annotations

import hashlib
from typing import Annotated
from urllib.parse import parse_qsl

import msgspec

from hookgate.hookspecs import hookimpl
from hookgate.plugin_kit import matches_any
from hookgate.types import ComponentRegistry, IngressRequest, Rejection

_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _at(path: str, message: str) -> ValueError:
    """A ValueError the config loader reports at `<rule path><path>` (msgspec's own suffix)."""
    return ValueError(f"{message} - at `${path}`")


class ApiKeyConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    key: str | list[str]
    header: str | None = None
    query: str | None = None
    forward_credential: Annotated[
        bool,
        msgspec.Meta(description="also send the key header on to endpoints; by default it is dropped"),
    ] = False

    def __post_init__(self) -> None:
        if (self.header is None) == (self.query is None):
            raise ValueError("set exactly one of header or query")
        if self.query is not None and self.forward_credential:
            raise _at(".forward_credential", "a query parameter is never forwarded; only a header key can be")
        if self.header is not None and not (self.header and set(self.header) <= _TOKEN_CHARS):
            raise _at(".header", "expected a header name like X-Api-Key")
        if self.query is not None and not self.query:
            raise _at(".query", "must not be empty")
        if isinstance(self.key, str):
            if not self.key:
                # An empty key (say, from an unset `${VAR:-}`) would let in anyone who sends none.
                raise _at(".key", "must not be empty")
            return
        if not self.key:
            raise _at(".key", "give at least one key")
        for i, key in enumerate(self.key):
            if not key:
                raise _at(f".key[{i}]", "must not be empty")


def _digest(value: bytes) -> bytes:
    # Comparing digests keeps the comparison constant-time whatever the length of what was sent.
    return hashlib.sha256(value).digest()


def query_values(query_string: bytes, name: str) -> list[bytes]:
    """Every value of a query parameter, percent-decoded, as the raw bytes that were sent."""
    # latin-1 maps bytes to code points one to one, so nothing is lost or can fail on the way.
    pairs = parse_qsl(query_string.decode("latin-1"), keep_blank_values=True, encoding="latin-1")
    wanted = name.encode()
    return [value.encode("latin-1") for key, value in pairs if key.encode("latin-1") == wanted]


class ApiKeyRule:
    def __init__(self, config: ApiKeyConfig):
        self.header = config.header
        self.query = config.query
        # The key header is dropped from the stored event (a query string is never stored).
        forwarded = config.header is None or config.forward_credential
        self.credential_headers = () if forwarded else (config.header,)
        keys = [config.key] if isinstance(config.key, str) else config.key
        self._digests = [_digest(k.encode()) for k in keys]

    def check(self, request: IngressRequest) -> Rejection | None:
        if self.header is not None:
            where = f"the {self.header} header"
            values = [v for k, v in request.headers if k.lower() == self.header.lower()]
            try:
                given = [v.encode("latin-1") for v in values]  # headers arrive latin-1 decoded
            except UnicodeEncodeError:
                return _forbidden("invalid API key")
        else:
            assert self.query is not None
            where = f"the {self.query} query parameter"
            given = query_values(request.query_string, self.query)
        if not given or not given[0]:
            return _forbidden(f"missing API key ({where})")
        if len(given) > 1:
            return _forbidden(f"{where} is given more than once")
        sent = _digest(given[0])
        # No early exit: every key costs the same.
        return None if matches_any(self._digests, [sent]) else _forbidden("invalid API key")


def _forbidden(message: str) -> Rejection:
    return Rejection(status=403, code="forbidden", message=message)


@hookimpl
def hookgate_register_components(registry: ComponentRegistry) -> None:
    registry.add_access_rule("api_key", ApiKeyConfig, ApiKeyRule)
