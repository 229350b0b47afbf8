"""What reaches a service of a provider's headers, through a real gateway: a header that could never
be sent is refused at ingress (and dropped from events stored without that check), credentials an
access rule consumed stay at the gateway, and no header value or URL password shows up in an
attempt's error, the API or the log.
"""

from __future__ import annotations

import base64
import logging
import time
from pathlib import Path
from typing import Any

import jwt
import msgspec
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from hookgate import config
from hookgate.broker.events import encode_event
from hookgate.config import ConfigError
from hookgate.hookspecs import hookimpl
from hookgate.plugin_host.hooks import Hooks
from hookgate.types import ComponentRegistry, Event, IngressRequest, Rejection
from tests.plugin_support import sources_config
from tests.support import (
    Gateway,
    NatsServer,
    base_config,
    publish_with_nats,
    receiver,
    run_gateway,
    stream_messages,
    write_config,
)
from tests.test_ingress import acme_config, signed

AUTH = {"Authorization": "Bearer test-token"}
TOKEN = "tok-5ecret-value"


def _rejections(text: str) -> dict[tuple[str, str], float]:
    return {
        (s.labels["source"], s.labels["reason"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "hookgate_ingress_rejections_total"
    }


async def _deliveries(gw: Gateway, endpoint: str, done: Any) -> list[dict[str, Any]]:
    with trio.fail_after(10):
        while True:
            response = await gw.http.get(
                f"{gw.url}/api/v1/deliveries", params={"endpoint": endpoint}, headers=AUTH
            )
            rows: list[dict[str, Any]] = response.json()["data"]
            if done(rows):
                return rows
            await trio.sleep(0.05)


# --- headers that cannot be sent --------------------------------------------------------------


@pytest.mark.parametrize("value", [f"a\x01{TOKEN}", f"{TOKEN}\x7f", f"\x1b[31m{TOKEN}"])
async def test_a_header_with_a_control_character_is_refused_with_400_and_counted(
    tmp_path: Path, nats_server: NatsServer, caplog: pytest.LogCaptureFixture, value: str
) -> None:
    caplog.set_level(logging.INFO)
    body = b'{"a": 1}'
    async with receiver() as rx, run_gateway(tmp_path, acme_config(nats_server.url, rx.url)) as gw:
        refused = await gw.http.post(
            f"{gw.url}/webhooks/acme", content=body, headers={**signed(body, "d-1"), "X-Note": value}
        )
        # The same webhook without it is accepted and delivered: nothing about it was stored.
        accepted = await gw.http.post(f"{gw.url}/webhooks/acme", content=body, headers=signed(body, "d-1"))
        (got,) = await rx.wait_for(1)
        metrics = await gw.http.get(f"{gw.url}/metrics")
    assert refused.status_code == 400
    assert refused.json()["error"] == "invalid_header"
    assert "x-note" in refused.json()["message"]
    assert TOKEN not in refused.text
    assert accepted.status_code == 202
    assert "x-note" not in got.headers
    assert _rejections(metrics.text)[("acme", "invalid_header")] == 1
    assert TOKEN not in caplog.text


async def test_tabs_and_latin1_values_are_still_accepted_and_forwarded(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    body = b'{"a": 1}'
    async with receiver() as rx, run_gateway(tmp_path, acme_config(nats_server.url, rx.url)) as gw:
        response = await gw.http.post(
            f"{gw.url}/webhooks/acme",
            content=body,
            headers=[
                *((k.encode(), v.encode()) for k, v in signed(body, "d-1").items()),
                (b"X-Tab", b"a\tb"),
                (b"X-Latin", "caf\xe9".encode("latin-1")),
            ],
        )
        (got,) = await rx.wait_for(1)
    assert response.status_code == 202
    assert got.headers["x-tab"] == "a\tb"
    assert got.headers["x-latin"] == "caf\xe9"


async def test_a_stored_event_with_unsendable_headers_is_delivered_without_them(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    """Events stored before ingress refused such headers, or published straight to the events
    stream, are delivered with what can be sent instead of failing every attempt."""
    async with receiver() as rx, run_gateway(tmp_path, acme_config(nats_server.url, rx.url)) as gw:
        event = Event(
            id="evt_legacy",
            source="acme",
            type="thing.created",
            received_at=time.time(),
            body=b'{"a": 1}',
            headers=[
                ("x-note", f"a\x01{TOKEN}"),
                ("x-crlf", f"a\r\nInjected: {TOKEN}"),
                ("bad name", "x"),
                ("x-snow", "\u2603"),
                ("x-kept", "yes"),
            ],
        )
        await publish_with_nats(nats_server.url, "hookgate.events.acme", encode_event(event), "acme:legacy")
        (got,) = await rx.wait_for(1)
        (row,) = await _deliveries(gw, "internal", lambda rows: rows and rows[0]["status"] == "succeeded")
    assert got.headers["x-kept"] == "yes"
    assert not {"x-note", "x-crlf", "injected", "bad name", "x-snow"} & set(got.headers)
    assert got.headers["webhook-id"] == "evt_legacy"
    assert row["attempts"] == 1


async def test_a_url_password_never_appears_in_an_attempt_error_the_api_or_the_log(
    tmp_path: Path, nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with receiver() as rx:
        text = base_config(
            nats_server.url,
            f"""
            endpoints:
              plain:
                url: http://hookgate:{TOKEN}@127.0.0.1:{rx.port}/hooks
            routes:
              - {{from: [internal], to: [plain]}}
            """,
        ).replace("egress:\n", "egress:\n  https_only: true\n")
        async with run_gateway(tmp_path, text) as gw:
            published = await gw.publish("thing.created", {"a": 1})
            assert published.status_code == 202
            (row,) = await _deliveries(gw, "plain", lambda rows: rows and rows[0]["status"] == "failed")
            detail = await gw.http.get(f"{gw.url}/api/v1/deliveries/{row['id']}", headers=AUTH)
    assert "https_only" in row["last_error"]
    assert "***@127.0.0.1" in row["last_error"]  # the URL is named, without its credentials
    assert TOKEN not in detail.text
    assert TOKEN not in caplog.text
    assert rx.requests == []


# --- credentials an access rule consumed --------------------------------------------------------

JWT_SECRET = "a-jwt-secret-that-is-long-enough-for-hs256"
API_KEY = "k-api-key-123456"
PASSWORD = "pa55-word-987"

CREDENTIAL_SOURCES = f"""
header-key:
  auth: [{{type: api_key, header: X-Api-Key, key: {API_KEY}}}]
query-key:
  auth: [{{type: api_key, query: api_key, key: {API_KEY}}}]
basic:
  auth: [{{type: basic, username: acme, password: {PASSWORD}}}]
jwt:
  auth: [{{type: bearer_jwt, secret: {JWT_SECRET}}}]
kept:
  auth: [{{type: api_key, header: X-Api-Key, key: {API_KEY}, forward_credential: true}}]
"""


def _jwt() -> str:
    return jwt.encode({"exp": int(time.time()) + 300}, JWT_SECRET, algorithm="HS256")


async def test_the_credential_an_access_rule_checked_is_not_forwarded_or_stored(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    basic = "Basic " + base64.b64encode(f"acme:{PASSWORD}".encode()).decode()
    bearer = f"Bearer {_jwt()}"
    sent = {
        "header-key": ("", {"X-Api-Key": API_KEY}),
        "query-key": (f"?api_key={API_KEY}", {}),
        "basic": ("", {"Authorization": basic}),
        "jwt": ("", {"Authorization": bearer}),
        "kept": ("", {"X-Api-Key": API_KEY}),
    }
    async with (
        receiver() as rx,
        run_gateway(tmp_path, sources_config(nats_server.url, rx.url, CREDENTIAL_SOURCES)) as gw,
    ):
        for source, (query, credential) in sent.items():
            response = await gw.http.post(
                f"{gw.url}/webhooks/{source}{query}",
                content=b'{"a": 1}',
                headers={**credential, "X-Other": f"other-{source}", "Content-Type": "application/json"},
            )
            assert response.status_code == 202, (source, response.text)
        got = {r.headers["hookgate-source"]: r for r in await rx.wait_for(len(sent))}
        stored = await stream_messages(nats_server.url, "HOOKGATE_EVENTS")
    for source in sent:
        assert got[source].headers["x-other"] == f"other-{source}"
        assert got[source].path == "/hooks"
    for source in ("header-key", "query-key", "basic", "jwt"):
        assert "x-api-key" not in got[source].headers
        assert "authorization" not in got[source].headers
        assert API_KEY not in str(got[source].headers)
    assert got["kept"].headers["x-api-key"] == API_KEY  # forward_credential: true
    # Nor is it stored: the event log and anything reading the stream never see it.
    stored_bytes = b"".join(m.data for m in stored if not m.subject.endswith(".kept"))
    for secret in (API_KEY, PASSWORD, basic, bearer):
        assert secret.encode() not in stored_bytes


async def test_forward_credential_is_refused_for_a_query_key(tmp_path: Path) -> None:
    text = base_config(
        None,
        "sources:\n  q:\n    auth: [{type: api_key, query: api_key, key: k, forward_credential: true}]\n",
        data_dir=tmp_path,
    )
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        config.load(path, Hooks().registry)
    (problem,) = info.value.problems
    assert problem.path == "$.sources.q.auth[0].forward_credential"
    assert "query parameter is never forwarded" in problem.message


class _TokenConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    header: str


class _TokenRule:
    """A third-party access rule: any non-empty value in its header passes, and it says so."""

    def __init__(self, config: _TokenConfig):
        self.header = config.header
        self.credential_headers = (config.header,)

    def check(self, request: IngressRequest) -> Rejection | None:
        if request.header(self.header):
            return None
        return Rejection(status=403, code="forbidden", message="no token")


class _TokenPlugin:
    @hookimpl
    def hookgate_register_components(self, registry: ComponentRegistry) -> None:
        registry.add_access_rule("token", _TokenConfig, _TokenRule)


async def test_a_plugin_rule_declares_the_headers_it_consumed(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    sources = "partner:\n  auth: [{type: token, header: X-Partner-Token}]\n"
    async with (
        receiver() as rx,
        run_gateway(
            tmp_path, sources_config(nats_server.url, rx.url, sources), plugins=(_TokenPlugin(),)
        ) as gw,
    ):
        response = await gw.http.post(
            f"{gw.url}/webhooks/partner", content=b"{}", headers={"X-Partner-Token": "t", "X-Other": "o"}
        )
        assert response.status_code == 202
        (got,) = await rx.wait_for(1)
    assert "x-partner-token" not in got.headers
    assert got.headers["x-other"] == "o"
