"""Route filters: every operator, paths into bodies and headers, and the errors of bad specs."""

from __future__ import annotations

import datetime
import json
from typing import Any

import pytest

from hookgate.config.filters import Filter, FilterError, ParsedBody, compile_filter
from hookgate.types import Event

ORDER = {
    "id": "evt_1",
    "type": "order.created",
    "amount": 1500,
    "price": 9.5,
    "currency": "usd",
    "paid": True,
    "note": None,
    "tags": ["urgent", "gift"],
    "scores": [3, 8],
    "matrix": [[1, 2], [3, 4]],
    "customer": {"name": "Ada Lovelace", "email": "ADA@example.com", "address": {"country": "GB"}},
    "items": [
        {"sku": "B", "qty": 1, "options": [{"k": "color", "v": "red"}]},
        {"sku": "A", "qty": 5, "options": [{"k": "size", "v": "L"}]},
    ],
    "meta": {"a": 1, "b": [1, 2]},
    "text": "line one\nLine two",
}


def event(body: Any = ORDER, headers: list[tuple[str, str]] | None = None, content_type: str = "") -> Event:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return Event(
        id="e1",
        source="acme",
        type="order.created",
        received_at=0.0,
        body=raw,
        content_type=content_type or "application/json",
        headers=headers or [],
    )


MATCHES: list[tuple[dict[str, Any], bool]] = [
    # implicit equality, $eq, $ne
    ({}, True),
    ({"currency": "usd"}, True),
    ({"currency": "eur"}, False),
    ({"amount": 1500.0}, True),  # 1500 == 1500.0
    ({"amount": {"$eq": 1500}}, True),
    ({"amount": {"$ne": 1500}}, False),
    ({"amount": {"$ne": 1}}, True),
    ({"paid": True}, True),
    ({"paid": 1}, False),  # a bool is not a number
    ({"amount": True}, False),
    ({"amount": "1500"}, False),  # nor is a string
    ({"note": None}, True),
    ({"missing": None}, True),  # null stands for missing too, as in Mongo
    ({"missing": {"$ne": None}}, False),
    ({"note": {"$ne": None}}, False),
    ({"amount": {"$ne": None}}, True),
    ({"customer.address": {"country": "GB"}}, True),  # whole objects
    ({"meta": {"$eq": {"b": [1, 2], "a": 1}}}, True),  # key order does not matter
    ({"meta": {"$eq": {"a": 1}}}, False),
    ({"meta": {"$eq": {"a": True, "b": [1, 2]}}}, False),
    ({"tags": ["urgent", "gift"]}, True),  # the whole list
    ({"tags": ["gift", "urgent"]}, False),
    ({"tags": "gift"}, True),  # or one of its elements
    ({"tags": {"$ne": "gift"}}, False),
    ({"tags": {"$ne": "spam"}}, True),
    ({"matrix": [3, 4]}, True),
    ({"matrix": 3}, False),  # no implicit descent into nested lists
    # comparisons
    ({"amount": {"$gt": 1000}}, True),
    ({"amount": {"$gt": 1500}}, False),
    ({"amount": {"$gte": 1500}}, True),
    ({"amount": {"$lt": 1500.5}}, True),
    ({"amount": {"$lte": 1499}}, False),
    ({"amount": {"$gte": 1000, "$lt": 2000}}, True),
    ({"amount": {"$gte": 1000, "$lt": 1200}}, False),
    ({"price": {"$gt": 9}}, True),
    ({"currency": {"$gt": "eur"}}, True),  # strings compare with strings
    ({"currency": {"$lt": "eur"}}, False),
    ({"amount": {"$gt": "1000"}}, False),  # mismatched types never match
    ({"currency": {"$gt": 0}}, False),
    ({"paid": {"$gte": 0}}, False),  # bool is not a number
    ({"note": {"$lt": 1}}, False),
    ({"customer": {"$gt": 0}}, False),
    ({"missing": {"$gt": 0}}, False),
    ({"scores": {"$gt": 5}}, True),  # any element
    ({"scores": {"$gt": 8}}, False),
    ({"scores": {"$gt": 5, "$lt": 4}}, True),  # each operator may match a different element, as in Mongo
    # $in, $nin
    ({"currency": {"$in": ["eur", "usd"]}}, True),
    ({"currency": {"$in": ["eur"]}}, False),
    ({"currency": {"$in": []}}, False),
    ({"amount": {"$in": [1500.0]}}, True),
    ({"paid": {"$in": [1]}}, False),
    ({"amount": {"$in": [True]}}, False),
    ({"tags": {"$in": ["gift", "x"]}}, True),
    ({"meta.b": {"$in": [[1, 2]]}}, True),
    ({"customer.address": {"$in": [{"country": "GB"}]}}, True),
    ({"missing": {"$in": [None]}}, True),
    ({"missing": {"$in": ["x"]}}, False),
    ({"currency": {"$nin": ["eur", "gbp"]}}, True),
    ({"currency": {"$nin": ["usd"]}}, False),
    ({"tags": {"$nin": ["gift"]}}, False),
    ({"missing": {"$nin": ["x"]}}, True),
    # $exists
    ({"note": {"$exists": True}}, True),  # present, even if null
    ({"note": {"$exists": False}}, False),
    ({"missing": {"$exists": False}}, True),
    ({"missing": {"$exists": True}}, False),
    ({"customer.address.city": {"$exists": False}}, True),
    ({"items.qty": {"$exists": True}}, True),
    # $regex
    ({"customer.name": {"$regex": "^Ada"}}, True),
    ({"customer.name": {"$regex": "Love"}}, True),  # search, not match
    ({"customer.name": {"$regex": "^Love"}}, False),
    ({"customer.email": {"$regex": "^ada@", "$options": "i"}}, True),
    ({"customer.email": {"$regex": "^ada@"}}, False),
    ({"text": {"$regex": "^Line"}}, False),
    ({"text": {"$regex": "^Line", "$options": "m"}}, True),
    ({"text": {"$regex": "one.Line"}}, False),
    ({"text": {"$regex": "one.Line", "$options": "s"}}, True),
    ({"customer.name": {"$regex": "ada   # first name", "$options": "xi"}}, True),
    ({"tags": {"$regex": "^gi"}}, True),  # any element
    ({"amount": {"$regex": "15"}}, False),  # strings only
    ({"missing": {"$regex": ""}}, False),
    # field-level $not
    ({"amount": {"$not": {"$gt": 2000}}}, True),
    ({"amount": {"$not": {"$gt": 1000}}}, False),
    ({"missing": {"$not": {"$gt": 1}}}, True),
    ({"currency": {"$not": {"$regex": "^u"}}}, False),
    ({"amount": {"$not": {"$not": {"$gt": 1000}}}}, True),
    ({"amount": {"$not": {"$gte": 1000, "$lt": 2000}}}, False),
    # implicit $and, $and, $or, top-level $not
    ({"currency": "usd", "amount": {"$gt": 1000}}, True),
    ({"currency": "usd", "amount": {"$gt": 2000}}, False),
    ({"$and": [{"currency": "usd"}, {"paid": True}]}, True),
    ({"$and": [{"currency": "usd"}, {"paid": False}]}, False),
    ({"$or": [{"currency": "eur"}, {"paid": True}]}, True),
    ({"$or": [{"currency": "eur"}, {"paid": False}]}, False),
    ({"$or": [{"currency": "eur"}], "paid": True}, False),
    ({"$not": {"currency": "eur"}}, True),
    ({"$not": {"currency": "usd", "paid": True}}, False),
    ({"$not": {}}, False),
    ({"$or": [{"$and": [{"amount": {"$gt": 1}}, {"type": {"$regex": "^order\\."}}]}, {"x": 1}]}, True),
    # nested paths
    ({"customer.address.country": "GB"}, True),
    ({"customer.address.country.code": "GB"}, False),
    ({"currency.length": 3}, False),
    ({"amount.x": {"$exists": True}}, False),
    # arrays: any element, numeric index, nested arrays of objects
    ({"items.sku": "A"}, True),
    ({"items.sku": "C"}, False),
    ({"items.qty": {"$gte": 5}}, True),
    ({"items.qty": {"$gt": 5}}, False),
    ({"items.0.sku": "B"}, True),
    ({"items.0.sku": "A"}, False),
    ({"items.1.sku": "A"}, True),
    ({"items.2.sku": {"$exists": True}}, False),
    ({"tags.0": "urgent"}, True),
    ({"tags.1": "urgent"}, False),
    ({"matrix.1.0": 3}, True),
    ({"matrix.1": 4}, True),
    ({"items.options.v": "L"}, True),
    ({"items.options.k": {"$in": ["weight"]}}, False),
    ({"items.1.options.0.v": "L"}, True),
    ({"items.0.options.0.v": "L"}, False),
    ({"items": {"$eq": {"sku": "A", "qty": 5, "options": [{"k": "size", "v": "L"}]}}}, True),
    ({"items.sku": {"$nin": ["A"]}}, False),
    ({"items.sku": {"$not": {"$eq": "A"}}}, False),
]


@pytest.mark.parametrize(("spec", "expected"), MATCHES, ids=[json.dumps(c[0]) for c in MATCHES])
def test_matches(spec: dict[str, Any], expected: bool) -> None:
    assert compile_filter(spec).matches(event()) is expected


HEADERS = [("x-github-event", "push"), ("Content-Type", "application/json"), ("x-tag", "a"), ("X-Tag", "b")]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"headers.x-github-event": "push"}, True),
        ({"headers.X-GitHub-Event": "push"}, True),  # names are case-insensitive
        ({"headers.x-github-event": "PUSH"}, False),  # values are not
        ({"headers.content-type": {"$regex": "json$"}}, True),
        ({"headers.x-tag": "b"}, True),  # a repeated header: any of its values
        ({"headers.x-tag": {"$nin": ["a"]}}, False),
        ({"headers.x-missing": {"$exists": False}}, True),
        ({"headers.x-missing": {"$exists": True}}, False),
        ({"headers.x-github-event": {"$in": ["push", "pull_request"]}}, True),
        ({"headers.x-github-event": {"$gt": 1}}, False),  # header values are strings
        ({"headers.x-github-event": "push", "currency": "usd"}, True),
        ({"headers.x-github-event": "push", "currency": "eur"}, False),
    ],
)
def test_headers(spec: dict[str, Any], expected: bool) -> None:
    assert compile_filter(spec).matches(event(headers=HEADERS)) is expected


SLACK_PAYLOAD = json.dumps({"type": "block_actions", "user": {"id": "U1"}, "actions": [{"value": "ok"}]})
FORM = f"command=%2Fdeploy&text=prod+now&count=3&payload={SLACK_PAYLOAD}&empty=".encode()


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"command": "/deploy"}, True),
        ({"text": {"$regex": "^prod "}}, True),
        ({"count": "3"}, True),  # form fields are strings
        ({"count": 3}, False),
        ({"empty": ""}, True),
        ({"payload.type": "block_actions"}, True),  # a field holding JSON can be reached into
        ({"payload.user.id": "U1"}, True),
        ({"payload.actions.value": "ok"}, True),
        ({"payload.actions.0.value": "ok"}, True),
        ({"payload": {"$regex": "^\\{"}}, True),  # and is still a string itself
        ({"payload.nope": {"$exists": False}}, True),
        ({"missing": {"$exists": False}}, True),
    ],
)
def test_form_bodies(spec: dict[str, Any], expected: bool) -> None:
    form = event(FORM, content_type="application/x-www-form-urlencoded; charset=utf-8")
    assert compile_filter(spec).matches(form) is expected


def test_json_bodies_reach_into_json_strings_too() -> None:
    body = {"envelope": json.dumps({"kind": "x", "n": [1, 2]}), "broken": "{not json", "plain": "[x"}
    assert compile_filter({"envelope.kind": "x", "envelope.n": 2}).matches(event(body))
    assert compile_filter({"broken.a": {"$exists": False}, "plain.0": {"$exists": False}}).matches(
        event(body)
    )


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"", "application/json"),
        (b"{not json", "application/json"),
        (b"\xff\xfe", "application/json"),
        (b'{"a": "\xff"}', "application/json"),
        (b"<xml/>", "application/xml"),
        (b'{"a": 1e400}', "application/json"),  # out of range for msgspec: the whole body is unreadable
        (b"[" * 100_000 + b"]" * 100_000, "application/json"),  # deeper than msgspec will go
        (b"a=%ff&b=\xff", "application/x-www-form-urlencoded"),
    ],
)
def test_unreadable_bodies_have_no_fields(body: bytes, content_type: str) -> None:
    unreadable = event(body, headers=[("x-a", "1")], content_type=content_type)
    assert compile_filter({"a": {"$exists": False}, "headers.x-a": "1"}).matches(unreadable)
    assert compile_filter({"a": {"$ne": 1}, "b.c": {"$nin": [1]}, "d": None}).matches(unreadable)
    never: list[dict[str, Any]] = [
        {"a": {"$exists": True}},
        {"a": 1},
        {"a": {"$gt": 0}},
        {"a": {"$regex": ""}},
    ]
    for spec in never:
        assert not compile_filter(spec).matches(unreadable)


@pytest.mark.parametrize(
    ("body", "spec", "expected"),
    [
        (b"[1, 2, 3]", {"0": 1}, True),  # a top-level list
        (b'[{"a": 1}, {"a": 2}]', {"a": 2}, True),
        (b'"text"', {"a": {"$exists": False}}, True),
        (b"42", {"a": {"$exists": False}}, True),
        (b'{"a.b": 1}', {"a.b": 1}, False),  # dots always separate segments
        (b'{"1": "x"}', {"1": "x"}, True),  # numeric segments are keys of objects
        (b'{"a": [{"0": "k"}, "v"]}', {"a.0": "k"}, True),  # and of list elements, as in Mongo
        (b'{"a": [{"0": "k"}, "v"]}', {"a.1": "v"}, True),
        (b'{"n": 10000000000000000000000}', {"n": {"$gt": 1e21}}, True),
    ],
)
def test_body_shapes(body: bytes, spec: dict[str, Any], expected: bool) -> None:
    assert compile_filter(spec).matches(event(body)) is expected


def test_body_is_parsed_once_and_shared() -> None:
    shared = ParsedBody.of(event())
    first = compile_filter({"amount": {"$gt": 1}})
    second = compile_filter({"items.sku": "A"})
    assert first.matches(event(b"ignored"), shared)
    value = shared.value
    assert second.matches(event(b"ignored"), shared)
    assert shared.value is value


def test_already_decoded_body() -> None:
    assert compile_filter({"a.b": 1}).matches(event(b""), ParsedBody.decoded({"a": {"b": 1}}))


def test_filter_keeps_spec() -> None:
    compiled = compile_filter({"a": 1})
    assert isinstance(compiled, Filter)
    assert compiled.spec == {"a": 1}
    assert "Filter" in repr(compiled)


R = "$.routes[0].filter"


@pytest.mark.parametrize(
    ("spec", "path", "phrase"),
    [
        ([{"a": 1}], R, "expected a mapping"),
        ("a == 1", R, "expected a mapping"),
        (None, R, "expected a mapping"),
        ({1: "a"}, R, "field paths are strings"),
        ({"a": {"$foo": 1}}, f'{R}.a["$foo"]', 'unknown operator "$foo"'),
        ({"data.amount": {"$gte": "x", "$bar": 1}}, f'{R}["data.amount"]["$bar"]', "unknown operator"),
        ({"$foo": 1}, f'{R}["$foo"]', '"$foo" is unknown'),
        ({"$gt": 1}, f'{R}["$gt"]', "field-level operator"),
        ({"$nor": [{"a": 1}]}, f'{R}["$nor"]', "the top level takes $and, $or, $not"),
        ({"a": {"$and": [{"b": 1}]}}, f'{R}.a["$and"]', "belongs at the top level"),
        ({"a": {"$or": []}}, f'{R}.a["$or"]', "belongs at the top level"),
        ({"$and": {"a": 1}}, f'{R}["$and"]', "$and expects a non-empty list"),
        ({"$and": []}, f'{R}["$and"]', "$and expects a non-empty list"),
        ({"$or": "a"}, f'{R}["$or"]', "$or expects a non-empty list"),
        ({"$or": [{"a": 1}, 2]}, f'{R}["$or"][1]', "expected a mapping"),
        ({"$and": [{"a": {"$in": 1}}]}, f'{R}["$and"][0].a["$in"]', "$in expects a list"),
        ({"$not": [{"a": 1}]}, f'{R}["$not"]', "expected a mapping"),
        ({"$not": {"a": {"$exists": 1}}}, f'{R}["$not"].a["$exists"]', "$exists expects true or false"),
        ({"a": {"$in": "usd"}}, f'{R}.a["$in"]', "$in expects a list"),
        ({"a": {"$nin": {"x": 1}}}, f'{R}.a["$nin"]', "$nin expects a list"),
        ({"a": {"$exists": "yes"}}, f'{R}.a["$exists"]', "$exists expects true or false"),
        ({"a": {"$exists": None}}, f'{R}.a["$exists"]', "$exists expects true or false"),
        ({"a": {"$gt": [1]}}, f'{R}.a["$gt"]', "$gt expects a number or a string"),
        ({"a": {"$lte": True}}, f'{R}.a["$lte"]', "$lte expects a number or a string"),
        ({"a": {"$lt": None}}, f'{R}.a["$lt"]', "$lt expects a number or a string"),
        ({"a": {"$regex": "("}}, f'{R}.a["$regex"]', "invalid regular expression: missing ), unterminated"),
        ({"a": {"$regex": 5}}, f'{R}.a["$regex"]', "$regex expects a string pattern"),
        ({"a": {"$regex": "x", "$options": "g"}}, f'{R}.a["$options"]', 'unknown regex option "g"'),
        ({"a": {"$regex": "x", "$options": 1}}, f'{R}.a["$options"]', "$options expects a string"),
        ({"a": {"$options": "i"}}, f'{R}.a["$options"]', "$options needs $regex"),
        ({"a": {"$not": 5}}, f'{R}.a["$not"]', "$not expects an operator document"),
        ({"a": {"$not": {"b": 1}}}, f'{R}.a["$not"]', "$not expects an operator document"),
        ({"a": {"$not": {"$gt": {}}}}, f'{R}.a["$not"]["$gt"]', "$gt expects a number or a string"),
        ({"a": {"$gt": 1, "b": 2}}, f"{R}.a.b", "mixes operators and plain keys"),
        ({"": 1}, f'{R}[""]', "has an empty segment"),
        ({"a..b": 1}, f'{R}["a..b"]', "has an empty segment"),
        ({"a.": 1}, f'{R}["a."]', "has an empty segment"),
        ({"headers": "x"}, f"{R}.headers", 'expected "headers.<name>"'),
        ({"headers.": "x"}, f'{R}["headers."]', 'expected "headers.<name>"'),
        ({"a": datetime.date(2024, 1, 1)}, f"{R}.a", "expected a JSON value"),
        ({"a": {"$in": [1, datetime.date(2024, 1, 1)]}}, f'{R}.a["$in"][1]', "got a date"),
        ({"a": {"$eq": {"b": {1: 2}}}}, f'{R}.a["$eq"].b', "object keys must be strings"),
        ({"a": {"$ne": [{"b": datetime.date(2024, 1, 1)}]}}, f'{R}.a["$ne"][0].b', "expected a JSON value"),
    ],
)
def test_invalid_specs(spec: Any, path: str, phrase: str) -> None:
    with pytest.raises(FilterError) as caught:
        compile_filter(spec, R)
    assert (caught.value.path, phrase in caught.value.message) == (path, True), caught.value.message
    first = caught.value.errors[0]
    assert (first.path, first.message) == (caught.value.path, caught.value.message)
    assert str(caught.value).startswith(f"{path}: ")


def test_every_problem_is_reported() -> None:
    spec = {
        "a": {"$foo": 1},
        "b": {"$in": 2, "$regex": "["},
        "$or": [{"c": {"$exists": 0}}, {"d": {"$options": "i"}}],
        "$bar": 1,
    }
    with pytest.raises(FilterError) as caught:
        compile_filter(spec, "$.routes[3].filter")
    assert [e.path for e in caught.value.errors] == [
        '$.routes[3].filter.a["$foo"]',
        '$.routes[3].filter.b["$in"]',
        '$.routes[3].filter.b["$regex"]',
        '$.routes[3].filter["$or"][0].c["$exists"]',
        '$.routes[3].filter["$or"][1].d["$options"]',
        '$.routes[3].filter["$bar"]',
    ]
    assert len(str(caught.value).splitlines()) == 6


def test_default_path() -> None:
    with pytest.raises(FilterError) as caught:
        compile_filter({"x.y": {"$gte": []}})
    assert caught.value.path == '$.routes[0].filter["x.y"]["$gte"]'
