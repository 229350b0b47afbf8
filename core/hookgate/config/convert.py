"""Converting plain values into the config Structs, diagnosing every problem msgspec finds."""

from __future__ import annotations

import difflib
import re
from typing import Any, Literal, get_args, get_origin

import msgspec

from hookgate.config.introspect import (
    accepts_none,
    annotates,
    bare_type,
    struct_fields,
    struct_of,
    unoptional,
)
from hookgate.config.paths import child
from hookgate.config.problems import show
from hookgate.config.schema import Prefix
from hookgate.config.source import Loader
from hookgate.plugin_kit.units import Duration, Size

_MSGSPEC_PATH = re.compile(r" - at `(\$[^`]*)`$")
_TYPE_WORDS = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "object": "a mapping",
    "array": "a list",
    "null": "null",
}
_NO_VALUE = object()
# Annotated strings whose pattern means nothing to a reader: say what is expected instead.
_EXPECTED: list[tuple[Any, str]] = [
    (Duration, 'a duration like "5m"'),
    (Size, 'a size like "64KiB"'),
    (Prefix, 'dot-separated names like "hookgate" (letters, digits, "-" and "_")'),
]


def drop_nulls(value: Any, type_: Any) -> Any:
    """Treat an empty YAML value (null) as "use the default" where the field cannot be null.

    `server:` with nothing under it, or `retry:` with only comments, then mean the defaults, and
    a null source or endpoint (`github:`) is one with every option at its default.
    """
    struct = struct_of(type_)
    bare = bare_type(type_)
    if struct is not None and isinstance(value, dict):
        fields = struct_fields(struct)
        for key in list(value):
            f = fields.get(key)
            if f is None:
                continue
            if value[key] is None and not f.required and not accepts_none(f.type):
                del value[key]
            else:
                value[key] = drop_nulls(value[key], f.type)
    elif get_origin(bare) is dict and isinstance(value, dict):
        item_type = get_args(bare)[1]
        for key, item in value.items():
            if item is None and struct_of(item_type) is not None and not accepts_none(item_type):
                value[key] = {}
            else:
                value[key] = drop_nulls(item, item_type)
    elif get_origin(bare) is list and isinstance(value, list):
        value[:] = [drop_nulls(item, get_args(bare)[0]) for item in value]
    return value


class Converter:
    """Converts values into config types, reporting every problem to the loader that read them."""

    def __init__(self, loader: Loader):
        self.loader = loader
        # Required keys already suggested for a typo, by path: "missing" would say it twice.
        self.suggested: dict[str, set[str]] = {}

    def convert(self, value: Any, type_: Any, path: str) -> Any:
        """The value converted to `type_`, or None after reporting every problem found in it."""
        try:
            return msgspec.convert(value, type_, strict=False)
        except msgspec.ValidationError as exc:
            if not self._diagnose(value, type_, path) and not self.loader.lacks_variable(path):
                self._report(str(exc), path, type_, value)
            return None

    def _check(self, value: Any, type_: Any, path: str) -> int:
        """How many problems `value` has as a `type_` (each one reported)."""
        try:
            msgspec.convert(value, type_, strict=False)
        except msgspec.ValidationError as exc:
            found = self._diagnose(value, type_, path)
            if not found and not self.loader.lacks_variable(path):
                self._report(str(exc), path, type_, value)
            return found or 1
        return 0

    def _diagnose(self, value: Any, type_: Any, path: str) -> int:
        """Report the problems inside a rejected struct, list or mapping, item by item."""
        struct = struct_of(type_)
        bare = bare_type(type_)
        if struct is not None and isinstance(value, dict):
            fields = struct_fields(struct)
            found = self.unknown_keys(value, struct, path)
            for key, item in value.items():
                if key in fields:
                    found += self._check(item, fields[key].type, child(path, key))
            for name, f in fields.items():
                if f.required and name not in value:
                    if name not in self.suggested.get(path, ()):
                        self.loader.problem(path, f"missing required key {show(name)}", missing=name)
                    found += 1
            return found
        if get_origin(bare) is list and isinstance(value, list):
            item_type = get_args(bare)[0]
            return sum(self._check(item, item_type, f"{path}[{i}]") for i, item in enumerate(value))
        if get_origin(bare) is dict and isinstance(value, dict):
            item_type = get_args(bare)[1]
            return sum(self._check(item, item_type, child(path, str(k))) for k, item in value.items())
        return 0

    def unknown_keys(self, value: dict[str, Any], struct: type[msgspec.Struct], path: str) -> int:
        """Report keys the struct does not have, with a suggestion for likely typos."""
        fields = struct_fields(struct)
        unset = [name for name in fields if name not in value]
        found = 0
        for key in value:
            if key not in fields:
                close = difflib.get_close_matches(key, unset, n=1)
                if close:
                    self.suggested.setdefault(path, set()).add(close[0])
                    hint = f'did you mean "{close[0]}"?'
                else:
                    hint = f"expected one of: {', '.join(fields)}"
                self.loader.problem(child(path, key), f"unknown key; {hint}")
                found += 1
        return found

    def _report(self, message: str, path: str, type_: Any, value: Any) -> None:
        at = _MSGSPEC_PATH.search(message)
        if at:
            message = message[: at.start()]
            if at.group(1) != "$":  # the problem is deeper than the value we know
                path, type_, value = path + at.group(1)[1:], None, _NO_VALUE
        expected = unoptional(type_)
        got = "" if value is _NO_VALUE else f", got {show(value)}"
        for known, description in _EXPECTED:
            if annotates(expected, known):
                self.loader.problem(path, f"expected {description}{got}")
                return
        if get_origin(expected) is Literal:
            options = ", ".join(show(o) for o in get_args(expected))
            self.loader.problem(path, f"expected one of {options}{got}")
            return
        # msgspec's own words, with its type names spelled out: "expected an integer >= 1, got 0".
        text = re.sub(
            r"`([^`]+)`",
            lambda m: " or ".join(_TYPE_WORDS.get(t, t) for t in m.group(1).split(" | ")),
            message,
        )
        text = text[:1].lower() + text[1:]
        if got and not isinstance(value, dict | list):
            text = re.sub(r", got .*$", "", text) + got
        self.loader.problem(path, text)
