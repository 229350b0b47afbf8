"""What an endpoint can make the gateway do, from the config and from the API: URLs the transport
cannot send to, unexpected exceptions in an attempt, proxies, and NATS subjects.

An API token holder is not the operator: it may name only a proxy the YAML lists, and a subject
endpoint may not reach NATS's own subjects (`$JS`, `$KV`, `_INBOX`) or hookgate's, unless the
operator lists them in `egress.allow_subjects`.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
import trio

from hookgate.config import ConfigError, loads, subject_matches
from hookgate.hookspecs import hookimpl
from hookgate.plugin_host.hooks import Hooks
from hookgate.types import Delivery, EndpointView, OutgoingRequest
from tests.support import (
    Gateway,
    NatsServer,
    attempt_records,
    base_config,
    free_port,
    receiver,
    run_gateway,
)
from tests.test_transport_proxy import proxy_server

AUTH = {"Authorization": "Bearer test-token"}
API = "/api/v1/endpoints"


async def _create(gw: Gateway, **document: Any) -> tuple[int, Any]:
    response = await gw.http.post(f"{gw.url}{API}", json=document, headers=AUTH)
    return response.status_code, response.json()


def _problems(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        loads(text, Hooks().registry, file="h.yaml", env=env or {})
    return [str(p) for p in info.value.problems]


# --- URLs the transport cannot send to ---------------------------------------------------------

# Each passed the old checks (201 from the API, OK from `hookgate check`), then failed in the
# transport on every delivery, redelivered at once without end.
UNSENDABLE = {
    "octal": "http://0177.0.0.1:{port}/i",
    "bracket": "http://[::1:{port}/",
    "port": "http://127.0.0.1:99999/",
}


async def test_urls_the_transport_cannot_send_to_are_refused_by_the_api(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    port = free_port()
    async with run_gateway(tmp_path, base_config(nats_server.url)) as gw:
        answers = {
            name: await _create(gw, name=name, url=url.format(port=port)) for name, url in UNSENDABLE.items()
        }
        listed = (await gw.http.get(f"{gw.url}{API}", headers=AUTH)).json()["data"]
    for name, (status, body) in answers.items():
        assert (status, body["error"]) == (422, "invalid_endpoint"), (name, body)
        assert body["message"].startswith("$.url: not a URL hookgate can send to"), (name, body)
    assert listed == []


def test_urls_the_transport_cannot_send_to_are_config_errors() -> None:
    port = free_port()
    endpoints = "".join(f'  {name}: {{url: "{url.format(port=port)}"}}\n' for name, url in UNSENDABLE.items())
    problems = _problems("endpoints:\n" + endpoints)
    assert [p.split(": not a URL")[0] for p in problems] == [
        "h.yaml:2: $.endpoints.octal.url",
        "h.yaml:3: $.endpoints.bracket.url",
        "h.yaml:4: $.endpoints.port.url",
    ]
    assert "'0177.0.0.1'" in problems[0]


class FailingSigner:
    """Raises in `hookgate_sign` for the first `failures` attempts: a plugin with a bug."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: list[float] = []

    @hookimpl
    def hookgate_sign(self, request: OutgoingRequest, endpoint: EndpointView) -> None:
        self.calls.append(trio.current_time())
        if len(self.calls) <= self.failures:
            raise KeyError("signing-key-that-must-not-be-shown")


async def test_an_exception_in_an_attempt_is_an_internal_attempt_retried_on_schedule(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    plugin = FailingSigner(failures=2)
    async with receiver() as rx:
        text = base_config(
            nats_server.url,
            f"""
            endpoints:
              svc: {{url: "{rx.url}/in", retry: {{schedule: [300ms, 600ms], jitter: 0}}}}
            routes:
              - {{from: [internal], to: [svc]}}
            """,
        )
        async with run_gateway(tmp_path, text, plugins=(plugin,)) as gw:
            await gw.publish("x", {})
            (got,) = await rx.wait_for(1)
            with trio.fail_after(10):
                while len(records := await attempt_records(nats_server.url)) < 3:
                    await trio.sleep(0.05)
            attempts = [json.loads(m.data) for m in records]
            detail = (
                await gw.http.get(f"{gw.url}/api/v1/deliveries/{attempts[0]['delivery_id']}", headers=AUTH)
            ).json()
    assert got.headers["hookgate-attempt"] == "3"
    assert [(a["attempt"], a["outcome"], a["error_kind"]) for a in attempts] == [
        (1, "retrying", "internal"),
        (2, "retrying", "internal"),
        (3, "succeeded", None),
    ]
    for attempt in attempts[:2]:
        assert "KeyError" in attempt["error"] and "signing-key" not in attempt["error"]
    # On the schedule, not redelivered at once: three calls in all, 300ms and 600ms apart.
    assert len(plugin.calls) == 3
    first, second, third = plugin.calls
    assert second - first >= 0.29 and third - second >= 0.59, plugin.calls
    assert detail["status"] == "succeeded" and [a["error_kind"] for a in detail["attempt_log"]] == [
        "internal",
        "internal",
        None,
    ]


async def test_an_attempt_that_always_fails_inside_the_gateway_ends_dead(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    plugin = FailingSigner(failures=1000)
    async with receiver() as rx:
        text = base_config(
            nats_server.url,
            f"""
            endpoints:
              svc: {{url: "{rx.url}/in", retry: {{schedule: [100ms, 100ms], jitter: 0}}}}
            routes:
              - {{from: [internal], to: [svc]}}
            """,
        )
        async with run_gateway(tmp_path, text, plugins=(plugin,)) as gw:
            await gw.publish("x", {})
            with trio.fail_after(10):
                while len(records := await attempt_records(nats_server.url)) < 3:
                    await trio.sleep(0.05)
            await trio.sleep(0.5)  # room for an attempt too many, which must not come
    attempts = [json.loads(m.data) for m in records]
    assert [(a["outcome"], a["error_kind"]) for a in attempts] == [
        ("retrying", "internal"),
        ("retrying", "internal"),
        ("dead", "internal"),
    ]
    assert len(plugin.calls) == 3 and rx.requests == []


class FailingRateLimit:
    """Raises in `hookgate_rate_limit`, which runs before an attempt starts, the first two times."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    @hookimpl
    def hookgate_rate_limit(self, delivery: Delivery, endpoint: EndpointView) -> float | None:
        self.calls.append(trio.current_time())
        if len(self.calls) <= 2:
            raise RuntimeError("limiter down")
        return None


async def test_a_failure_outside_an_attempt_is_redelivered_after_a_growing_delay(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    plugin = FailingRateLimit()
    async with receiver() as rx:
        text = base_config(
            nats_server.url,
            f"""
            endpoints:
              svc: {{url: "{rx.url}/in"}}
            routes:
              - {{from: [internal], to: [svc]}}
            """,
        )
        async with run_gateway(tmp_path, text, plugins=(plugin,)) as gw:
            await gw.publish("x", {})
            (got,) = await rx.wait_for(1, timeout=15)
    assert got.headers["hookgate-attempt"] == "1"  # no attempt was made before
    first, second, third = plugin.calls
    assert second - first >= 0.9 and third - second >= 1.9, plugin.calls


# --- proxies --------------------------------------------------------------------------------

USER, PASSWORD = "hook", "proxy-pass-5f1e"
PROXY_AUTH = b"Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode())


async def test_api_endpoints_may_use_only_a_proxy_the_config_lists(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    async with receiver() as rx, proxy_server(require=PROXY_AUTH) as proxy, receiver() as loopback_service:
        listed = f"http://{USER}:{PASSWORD}@127.0.0.1:{proxy.port}"
        text = base_config(
            nats_server.url,
            f"""
            endpoints:
              # YAML endpoints are the operator's: any proxy will do.
              yaml-any: {{url: "{rx.url}/yaml", proxy: "http://127.0.0.1:{free_port()}"}}
            """,
        ).replace("egress:\n", f'egress:\n  proxies: ["{listed}"]\n')
        url = f"{rx.url}/in"
        async with run_gateway(tmp_path, text) as gw:
            refused = {
                proxy_url: await _create(gw, name=f"r{i}", url=url, proxy=proxy_url)
                for i, proxy_url in enumerate(
                    [
                        f"http://127.0.0.1:{loopback_service.port}",
                        "http://169.254.169.254:80",
                        f"http://{USER}:wrong@127.0.0.1:{proxy.port}",  # the listed one, other credentials
                        f"http://127.0.0.1:{proxy.port + 1}",
                        "socks5://127.0.0.1:1080",
                    ]
                )
            }
            named = await _create(
                gw, name="via", url=url, proxy=f"http://127.0.0.1:{proxy.port}", signing=None
            )
            with_credentials = await _create(gw, name="via2", url=url, proxy=listed, signing=None)
            direct = await _create(gw, name="direct", url=f"{rx.url}/direct", proxy="", signing=None)
            patched = await gw.http.patch(
                f"{gw.url}{API}/direct", json={"proxy": "http://169.254.169.254:80"}, headers=AUTH
            )
            published = await gw.publish("x", {}, to=["via", "direct"])
            assert published.status_code == 202
            got = await rx.wait_for(2)
    for proxy_url, (status, body) in refused.items():
        assert (status, body["error"]) == (422, "invalid_endpoint"), (proxy_url, body)
        assert body["message"].startswith("$.proxy: "), (proxy_url, body)
        assert "wrong" not in body["message"] and PASSWORD not in body["message"]
    assert "listed: 127.0.0.1:" in refused["http://169.254.169.254:80"][1]["message"]
    assert named[0] == 201 and with_credentials[0] == 201 and direct[0] == 201
    assert named[1]["config"]["proxy"] == f"http://127.0.0.1:{proxy.port}"  # as given: no password
    assert (patched.status_code, patched.json()["error"]) == (422, "invalid_endpoint")
    assert loopback_service.requests == []
    assert sorted(r.path for r in got) == ["/direct", "/in"]
    # The endpoint named the proxy without credentials: the config's credentials were sent.
    (seen,) = proxy.seen
    assert seen.line.startswith(f"POST http://127.0.0.1:{rx.port}/in ".encode())
    assert seen.headers[b"proxy-authorization"] == PROXY_AUTH


def test_listed_proxies_are_checked_when_the_config_loads() -> None:
    problems = _problems('egress:\n  proxies: ["http://ok.test:3128", "https://tls.test:3128"]\n')
    assert len(problems) == 1 and problems[0].startswith("h.yaml:2: $.egress.proxies[1]: proxy ")


# --- NATS subjects ------------------------------------------------------------------------------

REFUSED_SUBJECTS = {
    "js-api": "$JS.API.STREAM.DELETE.ORDERS",
    "kv-own": "$KV.HOOKGATE_ENDPOINTS.billing",
    "kv-other": "$KV.settings.x",
    "sys": "$SYS.REQ.SERVER.PING",
    "inbox": "_INBOX.abc.def",
    "own": "hookgate.publish.x",
    "own-bare": "hookgate",
}


def test_subject_endpoints_may_not_target_nats_or_hookgate_subjects() -> None:
    endpoints = "".join(f'  {name}: {{subject: "{subject}"}}\n' for name, subject in REFUSED_SUBJECTS.items())
    problems = _problems("endpoints:\n" + endpoints + "  fine: {subject: billing.events}\n")
    where = [p.split(": ", 2)[:2] for p in problems]
    assert where == [
        [f"h.yaml:{i + 2}", f"$.endpoints.{name}.subject"] for i, name in enumerate(REFUSED_SUBJECTS)
    ]
    assert "egress.allow_subjects" in problems[0] and "egress.allow_subjects" in problems[4]
    assert "HOOKGATE_" in problems[1]
    assert "would loop" in problems[5]


def test_allow_subjects_opens_nats_subjects_but_never_hookgates_own() -> None:
    allow = 'egress:\n  allow_subjects: ["$KV.settings.*", "_INBOX.>", "$KV.>", "hookgate.>"]\n'
    endpoints = "".join(f'  {name}: {{subject: "{subject}"}}\n' for name, subject in REFUSED_SUBJECTS.items())
    problems = _problems(allow + "endpoints:\n" + endpoints)
    refused = [p.split(": ", 2)[1] for p in problems]
    assert refused == [
        "$.endpoints.js-api.subject",  # no pattern matches it
        "$.endpoints.kv-own.subject",  # hookgate's own bucket, whatever the list says
        "$.endpoints.sys.subject",
        "$.endpoints.own.subject",
        "$.endpoints.own-bare.subject",
    ]


def test_the_gateways_prefix_is_the_one_refused() -> None:
    text = (
        "broker: {prefix: acme.hg}\nendpoints:\n  a: {subject: acme.hg.x}\n"
        '  b: {subject: "$KV.ACME_HG_ENDPOINTS.x"}\n  c: {subject: hookgate.x}\n'
    )
    problems = _problems(text)
    assert [p.split(": ", 2)[1] for p in problems] == ["$.endpoints.a.subject", "$.endpoints.b.subject"]


def test_bad_allow_subjects_patterns_are_config_errors() -> None:
    problems = _problems('egress:\n  allow_subjects: ["ok.*", "a.>.b", "", "a..b", "a b", "a*"]\n')
    assert [p.split(": ", 2)[1] for p in problems] == [f"$.egress.allow_subjects[{i}]" for i in range(1, 6)]


@pytest.mark.parametrize(
    ("pattern", "subject", "matches"),
    [
        ("a.b", "a.b", True),
        ("a.b", "a.b.c", False),
        ("a.*", "a.b", True),
        ("a.*", "a.b.c", False),
        ("a.*.c", "a.b.c", True),
        ("a.>", "a.b.c", True),
        ("a.>", "a", False),
        (">", "a", True),
        ("*", "a.b", False),
        ("$KV.settings.*", "$KV.settings.x", True),
    ],
)
def test_subject_patterns_match_as_nats_does(pattern: str, subject: str, matches: bool) -> None:
    assert subject_matches(pattern, subject) is matches


async def test_api_subject_endpoints_are_held_to_the_same_rules(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    text = base_config(nats_server.url).replace(
        "egress:\n", 'egress:\n  allow_subjects: ["_INBOX.partner.>"]\n'
    )
    async with run_gateway(tmp_path, text) as gw:
        refused = {
            name: await _create(gw, name=name, subject=subject) for name, subject in REFUSED_SUBJECTS.items()
        }
        allowed = await _create(gw, name="partner", subject="_INBOX.partner.replies")
        plain = await _create(gw, name="audit", subject="audit.events")
    for name, (status, body) in refused.items():
        assert (status, body["error"]) == (422, "invalid_endpoint"), (name, body)
        assert body["message"].startswith("$.subject: "), (name, body)
    assert allowed[0] == 201 and plain[0] == 201
