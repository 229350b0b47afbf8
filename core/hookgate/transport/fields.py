"""What an HTTP/1.1 header may hold, in one place: ingress refuses what could never be forwarded,
the dispatcher drops it from events stored before that (or published over NATS), and the
transport never writes it.
"""

from __future__ import annotations

import re

TOKEN = re.compile(r"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")  # a header name or method (RFC 9110 token)
# A header value: anything but control characters, which covers CR, LF and NUL (injection). Leading
# and trailing whitespace is legal on the wire (it is OWS), and obs-text (0x80-0xff) is tolerated.
FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")


def sendable_value(value: str) -> bool:
    """Whether the transport can write this header value (ISO-8859-1, no control characters)."""
    if value.isascii() and value.isprintable():  # nearly always; both are cheap C checks
        return True
    try:
        raw = value.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return FIELD_VALUE.fullmatch(raw) is not None


def sendable(name: str, value: str) -> bool:
    """Whether a header can be written as it is: a token for a name, and a sendable value."""
    return TOKEN.fullmatch(name) is not None and sendable_value(value)
