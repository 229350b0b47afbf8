"""Redaction of credentials before anything is shown (API, CLI) or recorded (attempt records).

Header names are matched, not values: a value is never inspected, so a secret that does not look
like one is still hidden when it travels under a credential's name.
"""

from __future__ import annotations

import re

from hookgate.types import Headers

REDACTED = "[redacted]"

# Whole names that carry credentials, and words that mark one inside a longer name (x-api-key,
# x-auth-token, stripe-signature, x-shopify-hmac-sha256, ...). Hiding a harmless header whose name
# merely looks like one (x-idempotency-key) costs little; showing a credential costs a lot.
_SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie"})
_SECRET_WORDS = re.compile(r"(secret|token|passw|signature|hmac|key|auth|session|credential)")


def is_secret_header(name: str) -> bool:
    lowered = name.lower()
    return lowered in _SECRET_HEADERS or _SECRET_WORDS.search(lowered) is not None


def redact_headers(headers: Headers) -> Headers:
    return [(k, REDACTED if is_secret_header(k) else v) for k, v in headers]
