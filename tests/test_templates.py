"""Signed-content templates, shared by the hmac verifier and signer."""

from __future__ import annotations

import pytest

from hookgate.plugin_kit.templates import parse_template


def test_parts_are_literals_placeholders_and_headers() -> None:
    parts = parse_template("v0:{timestamp}:{header.X-Id}:{{{body}}}", ("body", "timestamp"), headers=True)
    assert parts == [b"v0:", ("timestamp",), b":", ("header", "X-Id"), b":{", ("body",), b"}"]


@pytest.mark.parametrize(
    ("template", "names", "headers", "words"),
    [
        ("{timestamp}", ("body", "timestamp"), False, ["must hold {body}"]),
        ("{body}.{nonce}", ("body", "timestamp", "id"), False, ["{nonce}", "{body}, {timestamp} or {id}"]),
        ("{body}.{header.X-Id}", ("body",), False, ["{header.X-Id}", "use {body} (and"]),
        ("{body}.{header.bad name}", ("body",), True, ["{header.bad name}", "{body} or {header.<Name>}"]),
        ("{body}}", ("body",), False, ["stray '}' at character 7"]),
    ],
)
def test_bad_templates_say_what_is_wrong(
    template: str, names: tuple[str, ...], headers: bool, words: list[str]
) -> None:
    with pytest.raises(ValueError) as raised:
        parse_template(template, names, headers=headers)
    for word in words:
        assert word in str(raised.value)
