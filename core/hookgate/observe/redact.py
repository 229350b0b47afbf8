"""Redacting secrets before anything is shown (API, CLI) or recorded (attempt records, logs):
endpoint configs, and the headers of events and attempts.

Only names are looked at, never values, so a plugin's new component is covered as long as it
names its secrets the usual way (`secret`, `token`, `password`, `private_key`, ...), and a header
is hidden when its name says it carries a credential. Hiding a harmless header whose name merely
looks like one (x-idempotency-key) costs little; showing a credential costs a lot.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from hookgate.transport.fields import sendable_value
from hookgate.types import Headers

PLACEHOLDER = "***"

# Keys whose values are secrets, wherever they appear in a config (signing, auth, any component).
SECRET_KEYS = frozenset(
    {
        "secret",
        "secrets",
        "token",
        "password",
        "client_secret",
        "private_key",
        "key",
        "key_password",
        "consumer_secret",
        "verify_token",
    }
)
# Header names that carry credentials (authorization, x-api-key, x-auth-token, stripe-signature,
# x-shopify-hmac-sha256, cookie, ...).
SECRET_HEADER = re.compile(
    r"secret|token|passw|signature|hmac|key|auth|session|cookie|credential", re.IGNORECASE
)
# Keys holding URLs that may carry credentials in their user-info part.
URL_KEYS = frozenset({"url", "proxy", "token_url"})
# Prefixes that say which kind of key it is without saying anything about the key.
KNOWN_PREFIXES = ("whsec_", "whsk_", "whpk_")


@functools.lru_cache(maxsize=1024)  # called for every header of every attempt; names repeat
def is_secret_header(name: str) -> bool:
    return SECRET_HEADER.search(name) is not None


def redact_headers(headers: Headers) -> Headers:
    return [(k, PLACEHOLDER if is_secret_header(k) else v) for k, v in headers]


def redact(config: Any) -> Any:
    """A copy of a JSON-like config with every secret value replaced by a placeholder."""
    if isinstance(config, dict):
        out: dict[str, Any] = {}
        for key, value in config.items():
            if key in SECRET_KEYS:
                out[key] = _hide(value)
            elif key == "headers" and isinstance(value, dict):
                out[key] = {name: _hide(v) if is_secret_header(name) else v for name, v in value.items()}
            elif key in URL_KEYS and isinstance(value, str):
                out[key] = _without_password(value)
            else:
                out[key] = redact(value)
        return out
    if isinstance(config, list):
        return [redact(item) for item in config]
    return config


def placeholders(config: Any, path: str = "$") -> list[str]:
    """Paths of secret values that are redaction placeholders: a redacted view sent back as is."""
    found: list[str] = []
    if isinstance(config, dict):
        for key, value in config.items():
            child = f"{path}.{key}"
            if key in SECRET_KEYS or (key == "headers" and isinstance(value, dict)):
                found.extend(_placeholder_paths(value, child, headers=key == "headers"))
            elif key in URL_KEYS and isinstance(value, str):
                if f":{PLACEHOLDER}@" in value:  # a URL's password as `redact` shows it
                    found.append(child)
            else:
                found.extend(placeholders(value, child))
    elif isinstance(config, list):
        for i, item in enumerate(config):
            found.extend(placeholders(item, f"{path}[{i}]"))
    return found


def _placeholder_paths(value: Any, path: str, *, headers: bool = False) -> list[str]:
    if isinstance(value, str):
        return [path] if value.endswith(PLACEHOLDER) else []
    if isinstance(value, list):
        return [p for i, item in enumerate(value) for p in _placeholder_paths(item, f"{path}[{i}]")]
    if isinstance(value, dict):
        if headers:
            return [
                p
                for name, v in value.items()
                if is_secret_header(name)
                for p in _placeholder_paths(v, f"{path}.{name}")
            ]
        return placeholders(value, path)
    return []


def _hide(value: Any) -> Any:
    if isinstance(value, str):
        prefix = next((p for p in KNOWN_PREFIXES if value.startswith(p)), "")
        return prefix + PLACEHOLDER
    if isinstance(value, list):
        return [_hide(item) for item in value]
    if isinstance(value, dict):
        # A rotation entry such as {secret, expires}: keep what is not secret.
        return {k: _hide(v) if k in SECRET_KEYS else redact(v) for k, v in value.items()}
    if value is None or isinstance(value, bool):
        return value
    return PLACEHOLDER


# Shorter values are not hidden in free text: no credential is that short, and hiding them would
# garble the text ("HTTP 502" with a header value "5").
MIN_ECHO = 4


def redact_text(text: str, headers: Sequence[tuple[str, str]] = (), url: str | None = None) -> str:
    """Free text (an attempt's error) with every credential it might echo hidden, the way
    `redact_headers` and `redact` hide them: the values of credential headers, values that cannot
    be sent (those are what a protocol error quotes), and the password of `url`.
    """
    if url is not None and url in text:  # as quoted whole: hidden however short its password
        text = text.replace(url, _without_password(url))
    hidden: set[str] = set()
    for name, value in headers:
        if is_secret_header(name) or not sendable_value(value):
            hidden.update(_spellings(value))
    if url is not None:
        password = url_password(url)
        if password:
            hidden.update(_spellings(password))
            hidden.update(_spellings(unquote(password)))
    for value in sorted(hidden, key=len, reverse=True):  # longest first: a value may hold another
        if len(value) >= MIN_ECHO and value in text:
            text = text.replace(value, PLACEHOLDER)
    return text


def _spellings(value: str) -> list[str]:
    """A value as it may appear in a message: as is, and as str and bytes reprs quote it."""
    spellings = [value, repr(value)[1:-1]]
    with contextlib.suppress(UnicodeEncodeError):
        spellings.append(repr(value.encode("latin-1"))[2:-1])
    return spellings


def url_password(url: str) -> str | None:
    """The password in a URL's user-info, as written (percent-encoded), or None."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if "@" not in parts.netloc:
        return None
    userinfo = parts.netloc.rsplit("@", 1)[0]
    _, colon, password = userinfo.partition(":")
    return password if colon and password else None


def without_password(url: str) -> str:
    """A URL with the password of its user-info hidden, for display (`check`, the API)."""
    return _without_password(url)


def _without_password(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:
        return PLACEHOLDER
    if parts.password is None and "@" not in parts.netloc:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:{PLACEHOLDER}@{host}"))
