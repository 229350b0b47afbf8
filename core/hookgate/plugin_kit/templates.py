"""Signed-content templates (`signed_content: "{timestamp}.{body}"`), for plugins that sign or verify
more than the body: the `hmac` verifier and the `hmac` signer use the same syntax.

- `{name}` stands for a value the plugin supplies (`{body}`, `{timestamp}`, `{id}`, ...).
- `{header.<Name>}` stands for a request header, where the plugin allows it.
- `{{` and `}}` are literal braces; any other text is copied as is.

A header value goes into signed content as the bytes it had on the wire (`wire_bytes`).
"""

from __future__ import annotations

import re

# An HTTP header name (an RFC 9110 token).
HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_PART = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]|[^{}]+")

# A parsed template: literal bytes, (name,) for a placeholder, or ("header", Name).
Part = bytes | tuple[str, ...]


def parse_template(template: str, names: tuple[str, ...], *, headers: bool = False) -> list[Part]:
    """The parts of a template with the placeholders `names` (and `{header.<Name>}` if `headers`).

    Raises ValueError naming what is wrong: an unknown placeholder, a stray brace, or no `{body}`
    (a signature that does not cover the body would let anyone replace it).
    """
    parts: list[Part] = []
    for match in _PART.finditer(template):
        text, placeholder = match.group(0), match.group(1)
        part: Part
        if text in ("{{", "}}"):
            part = text[0].encode()
        elif placeholder is not None:
            if placeholder in names:
                part = (placeholder,)
            elif headers and placeholder.startswith("header.") and HEADER_NAME.fullmatch(placeholder[7:]):
                part = ("header", placeholder[7:])
            else:
                raise ValueError(
                    f"signed_content: unknown placeholder {{{placeholder}}}; use {_allowed(names, headers)} "
                    "(and {{ or }} for a literal brace)"
                )
        elif text in ("{", "}"):
            raise ValueError(
                f"signed_content: a stray {text!r} at character {match.start() + 1}; "
                "write {{ or }} for a literal brace"
            )
        else:
            part = text.encode()
        if isinstance(part, bytes) and parts and isinstance(parts[-1], bytes):
            parts[-1] += part
        else:
            parts.append(part)
    if ("body",) not in parts:
        raise ValueError(
            "signed_content must hold {body}: a signature that does not cover the body lets anyone replace it"
        )
    return parts


def _allowed(names: tuple[str, ...], headers: bool) -> str:
    shown = [f"{{{name}}}" for name in names] + (["{header.<Name>}"] if headers else [])
    return ", ".join(shown[:-1]) + " or " + shown[-1] if len(shown) > 1 else shown[0]


def wire_bytes(value: str) -> bytes:
    """A header value as its bytes on the wire (the ASGI layer decodes them as latin-1)."""
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:  # not from the wire: built in code, so take it as text
        return value.encode("utf-8", "surrogatepass")
