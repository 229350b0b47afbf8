"""The `basic` access rule: HTTP Basic credentials, password rotation, malformed headers, config errors.

Authorization values are built here with `base64` directly (and checked against httpx's own
`BasicAuth` once), independently of the plugin. The last test runs the real gateway.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import httpx
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
)
from tests.support import NatsServer, receiver, run_gateway, stream_messages


@pytest.fixture(scope="module")
def hooks() -> Hooks:
    return Hooks()


def make_rule(hooks: Hooks, **options: Any) -> Any:
    return load_access_rule(hooks, "basic", **options)


def basic(credentials: bytes, scheme: str = "Basic") -> str:
    return f"{scheme} {base64.b64encode(credentials).decode()}"


def request(authorization: str | None = None) -> IngressRequest:
    headers = [("authorization", authorization)] if authorization is not None else []
    return ingress_request("acme", headers=headers)


def test_right_credentials_pass(hooks: Hooks) -> None:
    rule = make_rule(hooks, username="acme", password="pa:ss word")
    assert rule.check(request(basic(b"acme:pa:ss word"))) is None  # the first colon splits
    assert rule.check(request(basic(b"acme:pa:ss word", scheme="basic"))) is None  # scheme any case
    assert rule.check(request(basic(b"acme:pa:ss word", scheme="BASIC"))) is None
    # What httpx sends for the same credentials is accepted too.
    sent = httpx.BasicAuth("acme", "pa:ss word").auth_flow(httpx.Request("POST", "http://x/"))
    assert rule.check(request(next(sent).headers["authorization"])) is None


def test_utf8_credentials_pass(hooks: Hooks) -> None:
    rule = make_rule(hooks, username="jürgen", password="pässwörd☃")
    assert rule.check(request(basic("jürgen:pässwörd☃".encode()))) is None
    # The same text in latin-1 is other bytes (and not UTF-8): refused.
    assert_forbidden(rule.check(request(basic("jürgen:pässwörd".encode("latin-1")))))


def test_every_password_of_a_rotation_list_passes(hooks: Hooks) -> None:
    rule = make_rule(hooks, username="acme", password=["new-pw", "old-pw"])
    assert rule.check(request(basic(b"acme:new-pw"))) is None
    assert rule.check(request(basic(b"acme:old-pw"))) is None
    assert_forbidden(rule.check(request(basic(b"acme:retired-pw"))), "invalid")


@pytest.mark.parametrize(
    "credentials",
    [b"acme:wrong", b"other:secret", b"Acme:secret", b"acme:secre", b"acme:secret ", b"acme:", b":secret"],
)
def test_wrong_credentials_are_forbidden_and_never_echoed(hooks: Hooks, credentials: bytes) -> None:
    rule = make_rule(hooks, username="acme", password="secret")
    result = rule.check(request(basic(credentials)))
    assert_forbidden(result, "invalid username or password")
    assert result is not None and "secret" not in result.message and "acme" not in result.message


def test_missing_header_is_forbidden(hooks: Hooks) -> None:
    rule = make_rule(hooks, username="acme", password="secret")
    assert_forbidden(rule.check(request()), "missing")
    assert_forbidden(rule.check(request("")), "missing")


@pytest.mark.parametrize(
    "authorization",
    [
        "Basic",  # no credentials
        "Basic ",
        "Basic not base64!",
        "Basic YWNtZTpzZWNyZXQ",  # "acme:secret" without its padding
        "Basic YWNtZTpzZWNyZXQ=extra",
        "Basic " + base64.b64encode(b"acmesecret").decode(),  # no colon
        "Basic " + base64.b64encode(b"acme:\xff\xfe").decode(),  # not UTF-8
        "Basic " + base64.urlsafe_b64encode(b"acme:s\xfb\xff").decode(),  # urlsafe alphabet
        "Basic YWNt ZTpz ZWNy ZXQ=",
        "Basicx " + base64.b64encode(b"acme:secret").decode(),
        "Bearer " + base64.b64encode(b"acme:secret").decode(),  # another scheme
        base64.b64encode(b"acme:secret").decode(),  # no scheme at all
        "Basic ☃☃☃☃",  # not ASCII
        "Basic \x00\x01",
    ],
)
def test_malformed_headers_are_forbidden_never_an_exception(hooks: Hooks, authorization: str) -> None:
    rule = make_rule(hooks, username="acme", password="secret")
    assert_forbidden(rule.check(request(authorization)))


# --- config ------------------------------------------------------------------------------------


def config_error(hooks: Hooks, rule: str) -> ConfigError:
    return load_error(hooks, nested("sources:\n  acme:\n    auth:\n      - type: basic\n", rule, 8))


@pytest.mark.parametrize(
    ("rule", "where", "message"),
    [
        ("username: u\n", "x.yaml:4: $.sources.acme.auth[0]", 'missing required key "password"'),
        ("password: p\n", "x.yaml:4: $.sources.acme.auth[0]", 'missing required key "username"'),
        ("username: ''\npassword: p\n", "x.yaml:5: $.sources.acme.auth[0].username", "must not be empty"),
        ("username: 'a:b'\npassword: p\n", "x.yaml:5: $.sources.acme.auth[0].username", "':'"),
        ("username: u\npassword: ''\n", "x.yaml:6: $.sources.acme.auth[0].password", "must not be empty"),
        ("username: u\npassword: []\n", "x.yaml:6: $.sources.acme.auth[0].password", "at least one"),
        ("username: u\npassword: [a, '']\n", "x.yaml:6: $.sources.acme.auth[0].password[1]", "must not be"),
        ("username: u\npassword: p\nrealm: r\n", "x.yaml:7: $.sources.acme.auth[0].realm", "unknown key"),
    ],
)
def test_bad_options_are_refused_with_file_line_and_path(
    hooks: Hooks, rule: str, where: str, message: str
) -> None:
    assert_problem(config_error(hooks, rule), where, message, ignore_case=False)


# --- through the gateway -----------------------------------------------------------------------


async def test_gateway_delivers_with_the_right_credentials_only(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    with trio.fail_after(30):
        async with receiver() as rx:
            text = sources_config(
                nats_server.url,
                rx.url,
                """
                acme:
                  auth: [{type: basic, username: acme, password: "${ACME_PASSWORD}"}]
                """,
            )
            async with run_gateway(tmp_path, text, env={"ACME_PASSWORD": "s3cret"}) as gw:
                url = f"{gw.url}/webhooks/acme"
                wrong = await gw.http.post(url, content=b"1", auth=("acme", "guess"))
                garbage = await gw.http.post(url, content=b"2", headers={"Authorization": "Basic %%%"})
                missing = await gw.http.post(url, content=b"3")
                good = await gw.http.post(url, content=b"4", auth=("acme", "s3cret"))
                (got,) = await rx.wait_for(1)
    for refused in (wrong, garbage, missing):
        assert_http_error(refused, 403, "forbidden")
        assert "s3cret" not in refused.text and "guess" not in refused.text
    assert good.status_code == 202
    assert got.body == b"4"
    assert len(await stream_messages(nats_server.url, "HOOKGATE_EVENTS")) == 1
