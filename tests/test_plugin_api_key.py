"""The `api_key` access rule: keys in a header or a query parameter, rotation, refusals, config errors.

Rules are built the way the gateway builds them: YAML through the config loader, then the factory
the plugin registered. The last tests run the real gateway (nats-server, HTTP on loopback), alone
and combined with `ip_allow`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from hookgate.config import ConfigError
from hookgate.plugin_host.hooks import Hooks
from hookgate.types import IngressRequest
from tests.plugin_support import (
    assert_forbidden,
    assert_http_error,
    assert_problem,
    ingress_request,
    load_access_rule,
    load_error,
    nested,
    sources_config,
    the_problem,
)
from tests.support import NatsServer, receiver, run_gateway, stream_messages


@pytest.fixture(scope="module")
def hooks() -> Hooks:
    return Hooks()


def make_rule(hooks: Hooks, **options: Any) -> Any:
    return load_access_rule(hooks, "api_key", **options)


def request(headers: list[tuple[str, str]] | None = None, query: bytes = b"") -> IngressRequest:
    return ingress_request("acme", headers=headers or [], query=query)


# --- header ------------------------------------------------------------------------------------


def test_right_key_in_the_header_passes(hooks: Hooks) -> None:
    rule = make_rule(hooks, header="X-Api-Key", key="k-123")
    assert rule.check(request([("X-Api-Key", "k-123")])) is None
    # Ingress hands over lower-case header names; however the config spells the name, it matches.
    odd_case = make_rule(hooks, header="x-API-key", key="k-123")
    assert odd_case.check(request([("X-Api-Key", "k-123")])) is None


def test_wrong_or_missing_header_key_is_forbidden_and_never_echoed(hooks: Hooks) -> None:
    rule = make_rule(hooks, header="X-Api-Key", key="k-123")
    for sent in ("k-12", "k-1234", "K-123", " k-123", "k-123 ", "wrong"):
        result = rule.check(request([("X-Api-Key", sent)]))
        assert_forbidden(result, "invalid")
        assert result is not None and "k-12" not in result.message
    assert_forbidden(rule.check(request()), "missing", "X-Api-Key")
    assert_forbidden(rule.check(request([("X-Api-Key", "")])), "missing")
    assert_forbidden(rule.check(request([("X-Other", "k-123")])), "missing")
    # A key in the query does not count when the rule reads a header.
    assert_forbidden(rule.check(request(query=b"X-Api-Key=k-123")), "missing")


def test_a_repeated_header_is_forbidden(hooks: Hooks) -> None:
    rule = make_rule(hooks, header="X-Api-Key", key="k-123")
    assert_forbidden(rule.check(request([("X-Api-Key", "wrong"), ("X-Api-Key", "k-123")])), "more than once")


def test_non_ascii_keys_compare_as_utf8_bytes(hooks: Hooks) -> None:
    rule = make_rule(hooks, header="X-Api-Key", key="clé-☃")
    # The ASGI layer hands header values over latin-1 decoded: these are the UTF-8 bytes sent.
    assert rule.check(request([("X-Api-Key", "clé-☃".encode().decode("latin-1"))])) is None
    assert_forbidden(rule.check(request([("X-Api-Key", "clé-☃")])))  # not what a client can send


# --- rotation ----------------------------------------------------------------------------------


def test_every_key_of_a_rotation_list_passes(hooks: Hooks) -> None:
    rule = make_rule(hooks, header="X-Api-Key", key=["new-key", "old-key"])
    assert rule.check(request([("X-Api-Key", "new-key")])) is None
    assert rule.check(request([("X-Api-Key", "old-key")])) is None
    assert_forbidden(rule.check(request([("X-Api-Key", "retired-key")])), "invalid")


# --- query -------------------------------------------------------------------------------------


def test_right_key_in_the_query_passes(hooks: Hooks) -> None:
    rule = make_rule(hooks, query="api_key", key="k 1&2=3")
    assert rule.check(request(query=b"api_key=k%201%262%3D3")) is None
    assert rule.check(request(query=b"a=1&api_key=k+1%262%3D3&b=2")) is None


def test_wrong_missing_or_repeated_query_key_is_forbidden(hooks: Hooks) -> None:
    rule = make_rule(hooks, query="api_key", key=["k1", "k2"])
    assert rule.check(request(query=b"api_key=k2")) is None
    assert_forbidden(rule.check(request(query=b"api_key=k3")), "invalid")
    assert_forbidden(rule.check(request(query=b"api_key=")), "missing", "api_key")
    assert_forbidden(rule.check(request(query=b"api_key")), "missing")
    assert_forbidden(rule.check(request(query=b"apikey=k1")), "missing")
    assert_forbidden(rule.check(request(query=b"api_key=k1&api_key=k2")), "more than once")
    # The header of the same name does not count when the rule reads the query.
    assert_forbidden(rule.check(request([("api_key", "k1")])), "missing")


def test_garbage_query_strings_are_refused_not_raised(hooks: Hooks) -> None:
    rule = make_rule(hooks, query="api_key", key="k1")
    for query in (b"api_key=%ff%fe", b"api_key=\xff\x00", b"%%%&&&===", b"api_key=%zz", b"&" * 1000):
        assert_forbidden(rule.check(request(query=query)))


# --- config ------------------------------------------------------------------------------------


def config_error(hooks: Hooks, rule: str) -> ConfigError:
    return load_error(hooks, nested("sources:\n  acme:\n    auth:\n      - type: api_key\n", rule, 8))


@pytest.mark.parametrize(
    ("rule", "where", "message"),
    [
        ("key: k\n", "x.yaml:4: $.sources.acme.auth[0]", "exactly one of header or query"),
        ("key: k\nheader: X-K\nquery: k\n", "x.yaml:4: $.sources.acme.auth[0]", "exactly one of header"),
        ("header: X-K\n", "x.yaml:4: $.sources.acme.auth[0]", 'missing required key "key"'),
        ('header: X-K\nkey: ""\n', "x.yaml:6: $.sources.acme.auth[0].key", "must not be empty"),
        ("header: X-K\nkey: []\n", "x.yaml:6: $.sources.acme.auth[0].key", "at least one key"),
        (
            "header: X-K\nkey:\n  - a\n  - ''\n",
            "x.yaml:8: $.sources.acme.auth[0].key[1]",
            "must not be empty",
        ),
        ("header: X-K\nkey: [a, 5]\n", "x.yaml:6: $.sources.acme.auth[0].key[1]", "expected a string"),
        ("header: 'X Key'\nkey: k\n", "x.yaml:5: $.sources.acme.auth[0].header", "header name"),
        ("query: ''\nkey: k\n", "x.yaml:5: $.sources.acme.auth[0].query", "must not be empty"),
        ("header: X-K\nkey: k\nkeys: [k]\n", "x.yaml:7: $.sources.acme.auth[0].keys", "unknown key"),
    ],
)
def test_bad_options_are_refused_with_file_line_and_path(
    hooks: Hooks, rule: str, where: str, message: str
) -> None:
    assert_problem(config_error(hooks, rule), where, message, ignore_case=False)


def test_an_unset_key_variable_is_named(hooks: Hooks) -> None:
    problem = the_problem(config_error(hooks, 'header: X-K\nkey: "${ACME_KEY}"\n'))
    assert problem == "x.yaml:6: $.sources.acme.auth[0].key: environment variable ACME_KEY is not set"


def test_an_unknown_rule_type_lists_the_installed_ones(hooks: Hooks) -> None:
    problem = the_problem(load_error(hooks, "sources:\n  acme:\n    auth:\n      - type: apikey\n"))
    assert problem.startswith("x.yaml:4: $.sources.acme.auth[0].type: unknown access rule")
    for name in ("api_key", "basic", "bearer_jwt", "ip_allow"):
        assert name in problem


# --- through the gateway -----------------------------------------------------------------------


async def test_gateway_delivers_with_the_right_key_and_refuses_and_stores_nothing_without(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    with trio.fail_after(30):
        async with receiver() as rx:
            text = sources_config(
                nats_server.url,
                rx.url,
                """
                acme:
                  auth: [{type: api_key, header: X-Api-Key, key: [k-new, k-old]}]
                """,
                route="{from: [acme], to: [internal]}",
            )
            async with run_gateway(tmp_path, text) as gw:
                url = f"{gw.url}/webhooks/acme"
                wrong = await gw.http.post(url, content=b'{"n": 1}', headers={"X-Api-Key": "k-guess"})
                missing = await gw.http.post(url, content=b'{"n": 2}')
                in_query = await gw.http.post(url, content=b'{"n": 3}', params={"X-Api-Key": "k-new"})
                old = await gw.http.post(url, content=b'{"n": 4}', headers={"X-Api-Key": "k-old"})
                (got,) = await rx.wait_for(1)
    for refused in (wrong, missing, in_query):
        assert_http_error(refused, 403, "forbidden")
        assert "k-new" not in refused.text and "k-old" not in refused.text and "k-guess" not in refused.text
    assert old.status_code == 202
    assert got.body == b'{"n": 4}'
    assert "x-api-key" not in got.headers  # checked, then dropped: the key stays at the gateway
    assert len(await stream_messages(nats_server.url, "HOOKGATE_EVENTS")) == 1
    assert rx.requests == [got]


async def test_gateway_needs_every_rule_to_pass_api_key_and_ip_allow(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    with trio.fail_after(30):
        async with receiver() as rx:
            text = sources_config(
                nats_server.url,
                rx.url,
                """
                local:
                  auth:
                    - {type: api_key, header: X-Api-Key, key: k}
                    - {type: ip_allow, networks: [127.0.0.0/8, "::1/128"]}
                remote:
                  auth:
                    - {type: ip_allow, networks: [10.0.0.0/8]}
                    - {type: api_key, header: X-Api-Key, key: k}
                """,
            )
            async with run_gateway(tmp_path, text) as gw:
                post = gw.http.post
                local_ok = await post(f"{gw.url}/webhooks/local", content=b"1", headers={"X-Api-Key": "k"})
                local_bad_key = await post(
                    f"{gw.url}/webhooks/local", content=b"2", headers={"X-Api-Key": "x"}
                )
                remote = await post(f"{gw.url}/webhooks/remote", content=b"3", headers={"X-Api-Key": "k"})
                spoofed = await post(
                    f"{gw.url}/webhooks/remote",
                    content=b"4",
                    headers={"X-Api-Key": "k", "X-Forwarded-For": "10.1.2.3"},
                )
                (got,) = await rx.wait_for(1)
    assert local_ok.status_code == 202
    assert got.body == b"1"
    for refused in (local_bad_key, remote, spoofed):
        assert_http_error(refused, 403, "forbidden")
    assert "127.0.0.1" in remote.json()["message"]  # the peer, not the spoofed header
    assert len(await stream_messages(nats_server.url, "HOOKGATE_EVENTS")) == 1
