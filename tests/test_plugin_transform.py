"""The `shape` transform: each option, their order, non-JSON bodies, config errors, and a gateway run.

The last test runs the real gateway: one internal event, two routes, one of them reshaping it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio

from hookgate.config import ConfigError
from hookgate.plugin_host.hooks import Hooks
from hookgate.types import ComponentKind, Event
from tests.plugin_support import build, load, load_error, nested
from tests.support import NatsServer, base_config, receiver, run_gateway


@pytest.fixture(scope="module")
def hooks() -> Hooks:
    return Hooks()


def make_shape(hooks: Hooks, **options: Any) -> Any:
    """The transform as the gateway builds it from YAML (JSON is YAML)."""
    spec = json.dumps({"type": "shape", **options})
    text = f'endpoints:\n  a: {{url: "http://a.example/"}}\nroutes:\n  - to: [a]\n    transform: {spec}\n'
    return build(hooks, ComponentKind.TRANSFORM, load(hooks, text).transforms[0])


def internal(body: Any, type_: str = "invoice.paid") -> Event:
    return Event(id="evt_1", source="internal", type=type_, received_at=0.0, body=json.dumps(body).encode())


def ingress(body: bytes, content_type: str) -> Event:
    return Event(
        id="evt_2",
        source="shop",
        type="order.created",
        received_at=0.0,
        body=body,
        content_type=content_type,
        headers=[("content-type", content_type), ("x-shop-signature", "abc"), ("user-agent", "Shop/1")],
    )


ORDER: dict[str, Any] = {
    "id": "in_1",
    "amount": 1500,
    "customer": {"id": "cus_9", "email": "a@example.com"},
    "items": [{"sku": "A", "qty": 1}, {"sku": "B", "qty": 2}, {"sku": "C", "qty": 3}],
    "notes": None,
    "label": "x",
}

# (options, body, expected body); a body of None expects the very same event back.
CASES: dict[str, tuple[dict[str, Any], Any, Any]] = {
    # rename
    "rename moves a value, creating intermediates": (
        {"rename": {"customer.id": "customer_id", "amount": "totals.amount"}},
        ORDER,
        {
            "id": "in_1",
            "customer": {"email": "a@example.com"},
            "items": ORDER["items"],
            "notes": None,
            "label": "x",
            "customer_id": "cus_9",
            "totals": {"amount": 1500},
        },
    ),
    "rename within a list element by index": (
        {"rename": {"items.1.sku": "items.1.code"}},
        {"items": [{"sku": "A"}, {"sku": "B"}]},
        {"items": [{"sku": "A"}, {"code": "B"}]},
    ),
    "rename replaces an existing target": ({"rename": {"a": "b"}}, {"a": 1, "b": 2}, {"b": 1}),
    "rename into its own child": ({"rename": {"a": "a.inner"}}, {"a": [1]}, {"a": {"inner": [1]}}),
    "rename of a missing path changes nothing": ({"rename": {"nope": "x"}}, ORDER, None),
    "rename blocked by a string leaves the value": ({"rename": {"amount": "label.x"}}, ORDER, None),
    "renames apply in the order listed": ({"rename": {"a": "b", "b": "c"}}, {"a": 1}, {"c": 1}),
    # remove
    "remove deletes paths, list elements by index": (
        {"remove": ["customer.email", "items.1", "notes", "nope", "items.9", "label.x"]},
        ORDER,
        {
            "id": "in_1",
            "amount": 1500,
            "customer": {"id": "cus_9"},
            "items": [{"sku": "A", "qty": 1}, {"sku": "C", "qty": 3}],
            "label": "x",
        },
    ),
    "remove of missing paths changes nothing": (
        {"remove": ["nope", "customer.nope", "items.x"]},
        ORDER,
        None,
    ),
    "remove runs in order (indexes shift)": ({"remove": ["0", "0"]}, [1, 2, 3], [3]),
    # set
    "set creates intermediate objects and keeps JSON types": (
        {"set": {"meta.origin": "hookgate", "meta.n": 1.5, "meta.flags": [True, None], "meta.o": {"k": {}}}},
        {"id": 1},
        {"id": 1, "meta": {"origin": "hookgate", "n": 1.5, "flags": [True, None], "o": {"k": {}}}},
    ),
    "set replaces values and list elements": (
        {"set": {"amount": "n/a", "items.0": "first", "customer": None}},
        ORDER,
        {**ORDER, "amount": "n/a", "items": ["first", *ORDER["items"][1:]], "customer": None},
    ),
    "set through null makes an object": (
        {"set": {"notes.by": "me"}},
        {"notes": None},
        {"notes": {"by": "me"}},
    ),
    "set with a numeric segment on a missing path makes an object": (
        {"set": {"a.0": "x"}},
        {},
        {"a": {"0": "x"}},
    ),
    "set blocked by a string or past a list's end is skipped": (
        {"set": {"label.x": 1, "items.5": 1, "items.sku": 1, "ok": True}},
        ORDER,
        {**ORDER, "ok": True},
    ),
    "set builds on what an earlier set made": (
        {"set": {"a": {"x": 1}, "a.y": 2}},
        {},
        {"a": {"x": 1, "y": 2}},
    ),
    # wrap
    "wrap puts the body under a key": ({"wrap": "payload"}, {"a": 1}, {"payload": {"a": 1}}),
    "wrap with a dot path nests": ({"wrap": "event.data"}, [1, 2], {"event": {"data": [1, 2]}}),
    "wrap takes any JSON body": ({"wrap": "value"}, 42, {"value": 42}),
    # pick
    "pick keeps only the paths, in their nesting": (
        {"pick": ["amount", "customer.id", "items.2.sku", "items.0", "nope", "customer.nope"]},
        ORDER,
        {"amount": 1500, "customer": {"id": "cus_9"}, "items": [{"sku": "A", "qty": 1}, {"sku": "C"}]},
    ),
    "pick of a whole value wins over its parts": (
        {"pick": ["customer.id", "customer"]},
        ORDER,
        {"customer": ORDER["customer"]},
    ),
    "pick keeps null and empty values that are there": (
        {"pick": ["notes", "e"]},
        {"notes": None, "e": {}, "x": 1},
        {"notes": None, "e": {}},
    ),
    "pick finding nothing gives an empty object": ({"pick": ["nope", "label.x"]}, ORDER, {}),
    "pick on a list body": ({"pick": ["1", "7"]}, ["a", "b"], ["b"]),
    "pick finding nothing in a list body gives an empty list": ({"pick": ["5"]}, ["a"], []),
    # template
    "template placeholders keep JSON types": (
        {
            "template": {
                "amount": "{{ amount }}",
                "customer": "{{customer}}",
                "items": "{{ items }}",
                "first": "{{ items.0.sku }}",
                "notes": "{{ notes }}",
                "missing": "{{ nope.deeper }}",
                "literals": [1, True, None, "plain", {"k": "v"}],
            }
        },
        ORDER,
        {
            "amount": 1500,
            "customer": ORDER["customer"],
            "items": ORDER["items"],
            "first": "A",
            "notes": None,
            "missing": None,
            "literals": [1, True, None, "plain", {"k": "v"}],
        },
    ),
    "template reserved names: the event's fields and the body": (
        {
            "template": {
                "t": "{{ type }}",
                "i": "{{ id }}",
                "s": "{{ source }}",
                "all": "{{ body }}",
                "field": "{{ body.type }}",
                "nested": "{{ body.body.id }}",
            }
        },
        {"type": "in-body", "body": {"id": 7}},
        {
            "t": "invoice.paid",
            "i": "evt_1",
            "s": "internal",
            "all": {"type": "in-body", "body": {"id": 7}},
            "field": "in-body",
            "nested": 7,
        },
    ),
    "template interpolates placeholders inside text": (
        {
            "template": {
                "text": "{{ id }}: {{ amount }} for {{ customer.id }}{{ nope }}{{ notes }} {{ items.0 }}"
            }
        },
        ORDER,
        {"text": 'evt_1: 1500 for cus_9 {"sku":"A","qty":1}'},
    ),
    "template may be a single placeholder (unwrap)": (
        {"template": "{{ customer }}"},
        ORDER,
        ORDER["customer"],
    ),
    "template may be a literal": ({"template": ["fixed"]}, ORDER, ["fixed"]),
    # order of the options
    "remove runs after rename": ({"rename": {"a": "b"}, "remove": ["b"]}, {"a": 1, "c": 2}, {"c": 2}),
    "set runs after remove": ({"remove": ["a"], "set": {"a": 2}}, {"a": 1}, {"a": 2}),
    "wrap runs after set": ({"set": {"x": 1}, "wrap": "w"}, {"a": 1}, {"w": {"a": 1, "x": 1}}),
    "pick runs after wrap": ({"wrap": "w", "pick": ["w.a"]}, {"a": 1, "b": 2}, {"w": {"a": 1}}),
    "template runs last": (
        {"pick": ["a"], "event_type": "new.type", "template": {"b": "{{ body }}", "t": "{{ type }}"}},
        {"a": 1, "b": 2},
        {"b": {"a": 1}, "t": "new.type"},
    ),
    "all options together": (
        {
            "event_type": "ledger.entry",
            "rename": {"customer.id": "customer_id"},
            "remove": ["customer", "notes"],
            "set": {"meta.origin": "hookgate"},
            "wrap": "payload",
            "pick": ["payload.customer_id", "payload.amount", "payload.meta"],
            "template": {
                "kind": "{{ type }}",
                "who": "{{ payload.customer_id }}",
                "cents": "{{ payload.amount }}",
                "meta": "{{ payload.meta }}",
                "ref": "{{ source }}/{{ id }}",
            },
        },
        ORDER,
        {
            "kind": "ledger.entry",
            "who": "cus_9",
            "cents": 1500,
            "meta": {"origin": "hookgate"},
            "ref": "internal/evt_1",
        },
    ),
}


@pytest.mark.parametrize(("options", "body", "expected"), list(CASES.values()), ids=list(CASES))
def test_options(hooks: Hooks, options: dict[str, Any], body: Any, expected: Any) -> None:
    event = internal(body)
    shaped = make_shape(hooks, **options).transform(event)
    if expected is None:
        assert shaped is event
        return
    assert shaped is not event
    assert msgspec.json.decode(shaped.body) == expected
    assert json.loads(event.body) == body  # the original is untouched
    assert (shaped.id, shaped.source, shaped.content_type) == (event.id, event.source, "application/json")
    assert shaped.type == options.get("event_type", event.type)


def test_event_type_alone_keeps_the_body_bytes(hooks: Hooks) -> None:
    event = Event(id="e", source="internal", type="a", received_at=0.0, body=b'{ "spaced" : 1 }')
    shaped = make_shape(hooks, event_type="b").transform(event)
    assert shaped.type == "b" and shaped.body is event.body
    same = make_shape(hooks, event_type="a").transform(event)
    assert same is event


def test_set_values_are_fresh_for_every_event(hooks: Hooks) -> None:
    shape = make_shape(hooks, set={"a": {"x": [1]}, "a.y": 2, "a.x.0": 9})
    first = shape.transform(internal({}))
    second = shape.transform(internal({"b": 1}))
    assert msgspec.json.decode(first.body) == {"a": {"x": [9], "y": 2}}
    assert msgspec.json.decode(second.body) == {"b": 1, "a": {"x": [9], "y": 2}}


def test_template_values_taken_from_the_body_are_not_shared_with_config(hooks: Hooks) -> None:
    shape = make_shape(hooks, template={"fixed": {"k": [1]}, "v": "{{ a }}"})
    assert msgspec.json.decode(shape.transform(internal({"a": 1})).body) == {"fixed": {"k": [1]}, "v": 1}
    assert msgspec.json.decode(shape.transform(internal({})).body) == {"fixed": {"k": [1]}, "v": None}


def test_ingress_json_body_changed_becomes_application_json(hooks: Hooks) -> None:
    event = ingress(b'{"a": 1, "b": 2}', "application/vnd.shop+json; charset=utf-8")
    shaped = make_shape(hooks, remove=["b"], event_type="order.new").transform(event)
    assert shaped.body == b'{"a":1}'
    assert shaped.content_type == "application/json"
    assert shaped.type == "order.new"
    assert shaped.headers == [
        ("x-shop-signature", "abc"),
        ("user-agent", "Shop/1"),
        ("content-type", "application/json"),
    ]
    assert event.headers[0] == ("content-type", "application/vnd.shop+json; charset=utf-8")


def test_ingress_json_body_not_changed_is_the_same_event(hooks: Hooks) -> None:
    event = ingress(b'{"a": 1}', "text/plain")
    assert make_shape(hooks, remove=["b"], rename={"c": "d"}).transform(event) is event


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"a=1&b=%7B%7D", "application/x-www-form-urlencoded"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "image/png"),
        (b"", "application/json"),
        (b'{"a": "\xff"}', "application/json"),  # not UTF-8
        (b"[" * 100_000, "application/json"),
    ],
    ids=["form", "binary", "empty", "invalid-utf8", "too-deep"],
)
def test_non_json_bodies_are_left_as_they_are(
    hooks: Hooks, caplog: pytest.LogCaptureFixture, body: bytes, content_type: str
) -> None:
    shape = make_shape(hooks, wrap="w", template={"x": "{{ a }}"})
    event = ingress(body, content_type)
    with caplog.at_level(logging.DEBUG, logger="hookgate.plugins.transform"):
        assert shape.transform(event) is event
        assert shape.transform(event) is event
    notes = [r for r in caplog.records if "not JSON" in r.getMessage()]
    assert len(notes) == 1, "logged once per route"
    assert notes[0].levelno == logging.DEBUG
    # Another route (another instance) logs once for itself.
    with caplog.at_level(logging.DEBUG, logger="hookgate.plugins.transform"):
        make_shape(hooks, wrap="w").transform(event)
    assert len([r for r in caplog.records if "not JSON" in r.getMessage()]) == 2


def test_non_json_body_still_gets_the_new_type(hooks: Hooks) -> None:
    event = ingress(b"a=1", "application/x-www-form-urlencoded")
    shaped = make_shape(hooks, event_type="form.posted", wrap="w").transform(event)
    assert (shaped.type, shaped.body, shaped.content_type) == ("form.posted", b"a=1", event.content_type)
    assert shaped.headers == event.headers


def test_skipped_paths_are_logged_once_per_route_and_path(
    hooks: Hooks, caplog: pytest.LogCaptureFixture
) -> None:
    shape = make_shape(hooks, set={"label.x": 1}, rename={"a": "label.y"})
    with caplog.at_level(logging.DEBUG, logger="hookgate.plugins.transform"):
        for _ in range(3):
            assert shape.transform(internal({"label": "s", "a": 1})) is not None
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 2
    assert any('set "label.x"' in m for m in skipped) and any('rename "label.y"' in m for m in skipped)


def test_the_component_is_registered_as_shape(hooks: Hooks) -> None:
    assert "shape" in hooks.registry.names(ComponentKind.TRANSFORM)


# --- config errors -------------------------------------------------------------------------------


def config_error(hooks: Hooks, options: str) -> ConfigError:
    head = 'endpoints:\n  a: {url: "http://a.example/"}\nroutes:\n  - to: [a]\n    transform:\n'
    head += "      type: shape\n"
    return load_error(hooks, nested(head, options, 6))


T = "x.yaml:{line}: $.routes[0].transform"


@pytest.mark.parametrize(
    ("options", "where", "message"),
    [
        ("", T.format(line=5), "needs at least one of event_type, rename"),
        ("event_type: ''\n", T.format(line=7) + ".event_type", "event_type: expected a type name"),
        ("event_type: [a]\n", T.format(line=7) + ".event_type", "expected a string"),
        ("rename:\n  a: x\n  b..c: y\n", T.format(line=9) + '.rename["b..c"]', 'path "b..c" has an empty'),
        ("rename: {a: ''}\n", T.format(line=7) + ".rename.a", "the target path is empty"),
        ("rename: {a: b.}\n", T.format(line=7) + ".rename.a", 'the target path "b." has an empty segment'),
        ("rename: [a, b]\n", T.format(line=7) + ".rename", "expected a mapping"),
        ("remove: [a, .b]\n", T.format(line=7) + ".remove[1]", 'remove: the path ".b" has an empty segment'),
        ("remove: a\n", T.format(line=7) + ".remove", "expected a list"),
        ("set:\n  ok: 1\n  when: 2024-05-01\n", T.format(line=9) + ".set.when", "got a date; quote it"),
        ("set: {x: .nan}\n", T.format(line=7) + ".set.x", "nan is not a JSON number"),
        ("set: {'': 1}\n", T.format(line=7) + '.set[""]', "set: the path is empty"),
        ("wrap: ''\n", T.format(line=7) + ".wrap", "wrap: the path is empty"),
        ("wrap: {a: b}\n", T.format(line=7) + ".wrap", "expected a string"),
        ("pick: []\n", T.format(line=7) + ".pick", "length >= 1"),
        ("pick: [a, 'b..c']\n", T.format(line=7) + ".pick[1]", "has an empty segment"),
        (
            "template:\n  a:\n    b: ['{{ x }}', '{{ type.name }}']\n",
            T.format(line=9) + ".template.a.b[1]",
            'write "{{ body.type.name }}"',
        ),
        ("template: {a: '{{ }}'}\n", T.format(line=7) + ".template.a", "an empty placeholder"),
        ("template: {a: 'x {{ y }} }}'}\n", T.format(line=7) + ".template.a", 'a stray "}}"'),
        ("template: {a: '{{ {b} }}'}\n", T.format(line=7) + ".template.a", 'a stray "{{"'),
        ("template: {a: '{{ b..c }}'}\n", T.format(line=7) + ".template.a", "has an empty segment"),
        ("template: {a: 2024-05-01}\n", T.format(line=7) + ".template.a", "got a date"),
    ],
)
def test_bad_options_are_refused_with_file_line_and_path(
    hooks: Hooks, options: str, where: str, message: str
) -> None:
    (problem,) = config_error(hooks, options).problems
    assert str(problem).startswith(where + ": "), str(problem)
    assert message in str(problem), str(problem)


def test_an_unknown_option_is_named(hooks: Hooks) -> None:
    (problem,) = config_error(hooks, "event_type: a\nrenam: {a: b}\n").problems
    assert str(problem) == 'x.yaml:8: $.routes[0].transform.renam: unknown key; did you mean "rename"?'


def test_pick_keeps_keys_in_the_order_listed(hooks: Hooks) -> None:
    shaped = make_shape(hooks, pick=["b", "a"]).transform(internal({"a": 1, "b": 2, "c": 3}))
    assert shaped.body == b'{"b":2,"a":1}'


# --- through the gateway -------------------------------------------------------------------------


async def test_a_route_reshapes_the_event_for_its_endpoints_only(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    with trio.fail_after(30):
        async with receiver() as a, receiver() as b:
            text = base_config(
                nats_server.url,
                f"""
                endpoints:
                  a: {{url: "{a.url}/a"}}
                  b: {{url: "{b.url}/b"}}
                routes:
                  - name: reshaped
                    from: [internal]
                    types: ["invoice.*"]
                    transform:
                      type: shape
                      event_type: ledger.entry
                      rename: {{"customer.id": customer_id}}
                      remove: [customer]
                      template:
                        kind: "{{{{ type }}}}"
                        customer: "{{{{ customer_id }}}}"
                        cents: "{{{{ amount }}}}"
                        lines: "{{{{ items }}}}"
                        ref: "{{{{ source }}}}:{{{{ id }}}}"
                    to: [a]
                  - name: original
                    from: [internal]
                    to: [b]
                """,
            )
            data = {"amount": 1500, "customer": {"id": "cus_9", "email": "x@example.com"}, "items": [1, 2]}
            async with run_gateway(tmp_path, text) as gw:
                published = await gw.publish("invoice.paid", data)
                (got_a,) = await a.wait_for(1)
                (got_b,) = await b.wait_for(1)
    assert published.status_code == 202
    event_id = published.json()["id"]
    shaped = got_a.json()
    assert shaped["type"] == "ledger.entry"
    assert shaped["data"] == {
        "kind": "ledger.entry",
        "customer": "cus_9",
        "cents": 1500,
        "lines": [1, 2],
        "ref": f"internal:{event_id}",
    }
    assert got_a.headers["content-type"] == "application/json"
    original = got_b.json()
    assert original["type"] == "invoice.paid"
    assert original["data"] == data
    assert set(shaped) == set(original) == {"type", "timestamp", "data"}
    assert shaped["timestamp"] == original["timestamp"]
    assert got_a.headers["webhook-id"] == got_b.headers["webhook-id"] == event_id
