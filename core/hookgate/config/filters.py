"""Route filters: Mongo-style conditions on an event's body and headers.

A filter is a mapping of field paths to conditions, compiled once when the config loads and then
matched against every event the route sees::

    >>> from hookgate.types import Event
    >>> f = compile_filter({"data.object.amount": {"$gte": 1000}, "headers.x-env": "prod"})
    >>> event = Event(id="e1", source="stripe", type="charge.succeeded", received_at=0.0,
    ...               body=b'{"data": {"object": {"amount": 1500}}}', headers=[("X-Env", "prod")])
    >>> f.matches(event)
    True
    >>> compile_filter({"items.sku": {"$in": ["A", "B"]}}).matches(
    ...     Event(id="e2", source="internal", type="order", received_at=0.0,
    ...           body=b'{"items": [{"sku": "C"}, {"sku": "A"}]}'))
    True
    >>> try:
    ...     compile_filter({"amount": {"$foo": 1}, "$gt": 5}, "$.routes[0].filter")
    ... except FilterError as exc:
    ...     print([e.path for e in exc.errors])
    ['$.routes[0].filter.amount["$foo"]', '$.routes[0].filter["$gt"]']

Paths
    - `headers.<name>` is a request header (name matched case-insensitively; a repeated header
      matches if any of its values does). Header values are strings.
    - Anything else is a dot path into the body. JSON bodies are read as JSON; form-encoded bodies
      as their fields (first value of each), and a string field holding JSON (Slack's `payload`)
      can be reached into, as the ingress selectors do. An unreadable body has no fields.
    - Like Mongo, a segment that meets a list looks into every element (`items.sku`), a numeric
      segment indexes into it (`items.0.sku`), and a condition on a list value also holds if it
      holds for one of its elements (`{"tags": "urgent"}` matches `["urgent", "late"]`).

Operators
    Field level: `$eq $ne $gt $gte $lt $lte $in $nin $exists $regex` (+ `$options`: `imsx`) and
    `$not` (wrapping an operator document). A field's plain value means `$eq`. Top level: several
    keys mean all of them, `$and`/`$or` take non-empty lists of filter documents, `$not` one.

Semantics
    - Values compare by JSON type: `1 == 1.0`, but `true` is not `1`. Objects compare without
      regard to key order.
    - `$gt/$gte/$lt/$lte` hold only between two numbers or two strings; other pairs never match.
    - `$regex` applies to strings only (Python `re`, search semantics).
    - Missing fields: `$ne`, `$nin`, `$not` and `$exists: false` hold; `{"f": null}` (and `$in`
      with null) holds for a missing field as well as a null one, as in Mongo.

Errors name their place in the config with the config loader's path notation: keys that are not
plain words are written `["..."]`, list items `[i]`, e.g. `$.routes[0].filter["data.amount"]["$gte"]`.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Callable
from typing import Any

import msgspec

from hookgate.types import Event

__all__ = ["Filter", "FilterError", "ParsedBody", "compile_filter"]

_MISSING: Any = object()  # no value: a missing field, an unreadable body
_UNPARSED: Any = object()
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")
_REGEX_FLAGS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE}
_FIELD_OPERATORS = ("$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$exists", "$regex", "$not")
_TOP_OPERATORS = ("$and", "$or", "$not")
_HEADERS = "headers."


class FilterError(ValueError):
    """A problem in a filter spec at `path`. The one raised carries all of them in `errors`."""

    def __init__(self, path: str, message: str, errors: list[FilterError] | None = None):
        self.path = path
        self.message = message
        self.errors: list[FilterError] = errors or [self]
        super().__init__("\n".join(f"{e.path}: {e.message}" for e in self.errors))


class ParsedBody:
    """An event body, parsed on first use and at most once; share one across the filters of an event."""

    __slots__ = ("_content_type", "_inner", "_raw", "_value")

    def __init__(self, raw: bytes, content_type: str | None = None):
        self._raw = raw
        self._content_type = content_type
        self._value: Any = _UNPARSED
        self._inner: dict[int, Any] = {}  # string fields holding JSON, decoded, by id of the string

    @classmethod
    def of(cls, event: Event) -> ParsedBody:
        return cls(event.body, event.content_type)

    @classmethod
    def decoded(cls, value: Any) -> ParsedBody:
        """A body that is already decoded (dicts, lists, strings, numbers, bools, None)."""
        body = cls(b"")
        body._value = value
        return body

    @property
    def value(self) -> Any:
        """The decoded body; the "no value" marker (`is_missing`) when it is neither JSON nor a
        readable form."""
        if self._value is _UNPARSED:
            self._value = _decode(self._raw, self._content_type)
        return self._value

    def inner_json(self, text: str) -> Any:
        """A string field's JSON content, decoded once per string (or the "no value" marker)."""
        key = id(text)
        if key not in self._inner:
            try:
                self._inner[key] = msgspec.json.decode(text)
            except (msgspec.DecodeError, ValueError, RecursionError):
                self._inner[key] = _MISSING
        return self._inner[key]


def is_missing(value: Any) -> bool:
    """Whether a value read from a `ParsedBody` is the "no value" marker (unreadable, absent)."""
    return value is _MISSING


def is_form(content_type: str | None) -> bool:
    return (content_type or "").split(";")[0].strip().lower() == "application/x-www-form-urlencoded"


def _decode(raw: bytes, content_type: str | None) -> Any:
    if is_form(content_type):
        try:
            fields = urllib.parse.parse_qs(raw.decode("utf-8"), keep_blank_values=True)
        except ValueError:  # UnicodeDecodeError included
            return _MISSING
        return {k: v[0] for k, v in fields.items()}
    try:
        return msgspec.json.decode(raw)
    # ValueError: invalid UTF-8 inside a JSON string; RecursionError: nesting too deep for msgspec.
    except (msgspec.DecodeError, ValueError, RecursionError):
        return _MISSING


class _Subject:
    """What a filter looks at: the event's headers and its (lazily) parsed body."""

    __slots__ = ("body", "headers")

    def __init__(self, event: Event, body: ParsedBody):
        self.headers = event.headers
        self.body = body


_Match = Callable[[_Subject], bool]  # a filter document
_Resolve = Callable[[_Subject], list[Any]]  # the values found at a field path (none: missing)
_Test = Callable[[list[Any]], bool]  # a condition on the values at a field path


class Filter:
    """A compiled filter. `matches` never raises, whatever the event's body holds."""

    __slots__ = ("_match", "spec")

    def __init__(self, spec: Any, match: _Match):
        self.spec = spec
        self._match = match

    def matches(self, event: Event, body: ParsedBody | None = None) -> bool:
        """Whether the event passes; pass `body` (`ParsedBody.of(event)`) to share the parse."""
        return self._match(_Subject(event, body if body is not None else ParsedBody.of(event)))

    def __repr__(self) -> str:
        return f"Filter({self.spec!r})"


def compile_filter(spec: Any, path: str = "$.routes[0].filter") -> Filter:
    """Validate and compile a filter spec; raise `FilterError` listing every problem with its path."""
    compiler = _Compiler()
    match = compiler.document(spec, path)
    if compiler.errors:
        first = compiler.errors[0]
        raise FilterError(first.path, first.message, compiler.errors)
    assert match is not None
    return Filter(spec, match)


# --- compiling ------------------------------------------------------------------------------------


def _child(path: str, key: str) -> str:
    # The config loader's notation: plain keys as `.key`, any other (dots, `$`) as `["..."]`.
    return f"{path}.{key}" if _PLAIN_KEY.fullmatch(key) else f"{path}[{json.dumps(key)}]"


def _show(value: Any) -> str:
    if value is None or isinstance(value, bool | str):
        return json.dumps(value)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "a list"
    return "a mapping" if isinstance(value, dict) else f"a {type(value).__name__}"


def _is_operators(value: Any) -> bool:
    return isinstance(value, dict) and any(isinstance(k, str) and k.startswith("$") for k in value)


class _Compiler:
    def __init__(self) -> None:
        self.errors: list[FilterError] = []

    def error(self, path: str, message: str) -> None:
        self.errors.append(FilterError(path, message))

    def document(self, spec: Any, path: str) -> _Match | None:
        """A filter document: field paths to conditions, and `$and/$or/$not`; all must hold."""
        if not isinstance(spec, dict):
            self.error(path, f"expected a mapping of field paths to conditions, got {_show(spec)}")
            return None
        parts: list[_Match] = []
        for key, value in spec.items():
            if not isinstance(key, str):
                self.error(path, f"field paths are strings, got {_show(key)}")
                continue
            where = _child(path, key)
            if key.startswith("$"):
                part = self.top_operator(key, value, where)
            else:
                part = self.field(key, value, where)
            if part is not None:
                parts.append(part)
        return _all_of(parts)

    def top_operator(self, op: str, value: Any, path: str) -> _Match | None:
        if op == "$not":
            inner = self.document(value, path)
            return None if inner is None else (lambda s: not inner(s))
        if op not in ("$and", "$or"):
            hint = "a field-level operator: write it under a field" if op in _FIELD_OPERATORS else "unknown"
            self.error(path, f"operator {json.dumps(op)} is {hint}; the top level takes $and, $or, $not")
            return None
        if not isinstance(value, list) or not value:
            self.error(path, f"{op} expects a non-empty list of filter documents, got {_show(value)}")
            return None
        items = [self.document(item, f"{path}[{i}]") for i, item in enumerate(value)]
        if any(item is None for item in items):
            return None
        matches: list[_Match] = [m for m in items if m is not None]
        return _all_of(matches) if op == "$and" else (lambda s: any(m(s) for m in matches))

    def field(self, key: str, condition: Any, path: str) -> _Match | None:
        resolve = self.resolver(key, path)
        if _is_operators(condition):
            test = self.operators(condition, path)
        else:
            test = self.operator("$eq", condition, path, None, path)
        if resolve is None or test is None:
            return None
        return lambda s: test(resolve(s))

    def resolver(self, key: str, path: str) -> _Resolve | None:
        if key.startswith(_HEADERS) or key == "headers":
            name = key[len(_HEADERS) :].lower()
            if not name:
                self.error(path, 'expected "headers.<name>", e.g. "headers.x-github-event"')
                return None
            return lambda s: [v for k, v in s.headers if k.lower() == name]
        segments = key.split(".")
        if not all(segments):
            self.error(path, f"field path {json.dumps(key)} has an empty segment")
            return None
        steps = tuple((seg, int(seg) if seg.isascii() and seg.isdigit() else None) for seg in segments)

        def resolve(s: _Subject) -> list[Any]:
            found: list[Any] = []
            root = s.body.value
            if root is not _MISSING:
                _walk(root, steps, 0, s.body, found)
            return found

        return resolve

    def operators(self, spec: dict[Any, Any], path: str) -> _Test | None:
        """An operator document (`{"$gte": 1, "$lt": 9}`): all of its operators must hold."""
        tests: list[_Test] = []
        ok = True
        plain = [k for k in spec if not (isinstance(k, str) and k.startswith("$"))]
        if plain:
            self.error(
                _child(path, str(plain[0])),
                'a condition mixes operators and plain keys; to match an object literally use {"$eq": {...}}',
            )
            return None
        if "$options" in spec and "$regex" not in spec:
            self.error(_child(path, "$options"), "$options needs $regex beside it")
            ok = False
        for op, operand in spec.items():
            if op == "$options":
                continue
            where = _child(path, op)
            test = self.operator(op, operand, where, spec.get("$options"), _child(path, "$options"))
            if test is None:
                ok = False
            else:
                tests.append(test)
        if not ok:
            return None
        return tests[0] if len(tests) == 1 else (lambda values: all(t(values) for t in tests))

    def operator(self, op: str, operand: Any, path: str, options: Any, options_path: str) -> _Test | None:
        if op in ("$eq", "$ne"):
            if not self.operand(operand, path):
                return None
            return _eq_test(operand) if op == "$eq" else _negate(_eq_test(operand))
        if op in _COMPARE:
            if isinstance(operand, bool) or not isinstance(operand, int | float | str):
                self.error(path, f"{op} expects a number or a string, got {_show(operand)}")
                return None
            return _any_value(_compare(_COMPARE[op], operand))
        if op in ("$in", "$nin"):
            if not isinstance(operand, list):
                self.error(path, f"{op} expects a list, got {_show(operand)}")
                return None
            if not all([self.operand(item, f"{path}[{i}]") for i, item in enumerate(operand)]):
                return None
            test = _in_test(operand)
            return test if op == "$in" else _negate(test)
        if op == "$exists":
            if not isinstance(operand, bool):
                self.error(path, f"$exists expects true or false, got {_show(operand)}")
                return None
            return lambda values: bool(values) == operand
        if op == "$regex":
            return self.regex(operand, path, options, options_path)
        if op == "$not":
            if not _is_operators(operand):
                self.error(path, f'$not expects an operator document like {{"$gt": 5}}, got {_show(operand)}')
                return None
            inner = self.operators(operand, path)
            return None if inner is None else _negate(inner)
        if op in _TOP_OPERATORS:
            self.error(path, f"{op} takes filter documents and belongs at the top level, not under a field")
        else:
            self.error(
                path, f"unknown operator {json.dumps(op)}; expected one of {', '.join(_FIELD_OPERATORS)}"
            )
        return None

    def regex(self, pattern: Any, path: str, options: Any, options_path: str) -> _Test | None:
        flags = 0
        if options is not None:
            if not isinstance(options, str):
                self.error(
                    options_path, f'$options expects a string of letters from "imsx", got {_show(options)}'
                )
                return None
            for letter in options:
                if letter not in _REGEX_FLAGS:
                    self.error(
                        options_path,
                        f'unknown regex option {json.dumps(letter)}; expected letters from "imsx"',
                    )
                    return None
                flags |= _REGEX_FLAGS[letter]
        if not isinstance(pattern, str):
            self.error(path, f"$regex expects a string pattern, got {_show(pattern)}")
            return None
        try:
            search = re.compile(pattern, flags).search
        except re.error as exc:
            self.error(path, f"invalid regular expression: {exc}")
            return None
        return _any_value(lambda v: isinstance(v, str) and search(v) is not None)

    def operand(self, value: Any, path: str) -> bool:
        """Whether a value to compare with is plain JSON (YAML may also give dates and such)."""
        if value is None or isinstance(value, bool | int | float | str):
            return True
        if isinstance(value, list):
            return all([self.operand(item, f"{path}[{i}]") for i, item in enumerate(value)])
        if isinstance(value, dict):
            if not all(isinstance(k, str) for k in value):
                self.error(path, "object keys must be strings")
                return False
            return all([self.operand(item, _child(path, k)) for k, item in value.items()])
        self.error(
            path, f"expected a JSON value (string, number, bool, null, list, mapping), got {_show(value)}"
        )
        return False


# --- matching -------------------------------------------------------------------------------------


def _all_of(parts: list[_Match]) -> _Match:
    if len(parts) == 1:
        return parts[0]
    return lambda s: all(p(s) for p in parts)


def _walk(
    value: Any, steps: tuple[tuple[str, int | None], ...], i: int, body: ParsedBody, out: list[Any]
) -> None:
    """Collect the values at `steps[i:]` below `value` into `out`, Mongo-style across lists."""
    if i == len(steps):
        out.append(value)
        return
    name, index = steps[i]
    if isinstance(value, str) and value[:1] in ("{", "["):
        value = body.inner_json(value)
    if isinstance(value, dict):
        if name in value:
            _walk(value[name], steps, i + 1, body, out)
    elif isinstance(value, list):
        if index is not None and index < len(value):
            _walk(value[index], steps, i + 1, body, out)
        for item in value:  # `items.sku`: the field of every element that has it
            if isinstance(item, dict) and name in item:
                _walk(item[name], steps, i + 1, body, out)


def _negate(test: _Test) -> _Test:
    return lambda values: not test(values)


def _any_value(pred: Callable[[Any], bool]) -> _Test:
    """A test that holds if some value, or some element of a list value, satisfies `pred`."""

    return lambda values: any(pred(v) or (isinstance(v, list) and any(map(pred, v))) for v in values)


def _equal(a: Any, b: Any) -> bool:
    """JSON equality: 1 == 1.0, but booleans are not numbers; objects ignore key order."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _eq_test(operand: Any) -> _Test:
    test = _any_value(lambda v: _equal(v, operand))
    if operand is None:  # as in Mongo, null also stands for a missing field
        return lambda values: not values or test(values)
    return test


def _scalar_key(value: Any) -> tuple[bool, Any] | None:
    # Hashable stand-ins that keep `true` apart from 1 (and let 1 meet 1.0).
    if value is None or isinstance(value, bool | int | float | str):
        return (isinstance(value, bool), value)
    return None


def _in_test(operand: list[Any]) -> _Test:
    keys = {k for k in map(_scalar_key, operand) if k is not None}
    others = [item for item in operand if _scalar_key(item) is None]

    def member(v: Any) -> bool:
        key = _scalar_key(v)
        if key is not None:
            return key in keys
        return any(_equal(v, item) for item in others)

    test = _any_value(member)
    if None in operand:
        return lambda values: not values or test(values)
    return test


_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "$gt": lambda a, b: a > b,
    "$gte": lambda a, b: a >= b,
    "$lt": lambda a, b: a < b,
    "$lte": lambda a, b: a <= b,
}


def _compare(cmp: Callable[[Any, Any], bool], operand: int | float | str) -> Callable[[Any], bool]:
    if isinstance(operand, str):
        return lambda v: isinstance(v, str) and cmp(v, operand)
    return lambda v: isinstance(v, int | float) and not isinstance(v, bool) and cmp(v, operand)
