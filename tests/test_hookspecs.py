"""One test per hookspec, each on the real gateway (real nats-server, real HTTP on loopback).

Every test registers a small plugin class with `run_gateway(..., plugins=(Plugin(),))` and checks
the behaviour the hook exists for. Several hookimpls are `async def` and only record what they saw
after an `await`, which proves the core awaits them under trio.

The last tests keep this honest: a hookspec without a `test_<name>...` function here, or without a
`### hookgate_<name>` section in CONTRIBUTING.md, fails the suite.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio

import hookgate
from hookgate import hookspecs
from hookgate.broker.events import decode_event
from hookgate.config import ConfigError, loads
from hookgate.hookspecs import hookimpl
from hookgate.plugin_host.hooks import Hooks
from hookgate.types import (
    Attempt,
    ComponentKind,
    ComponentRegistry,
    Delivery,
    EndpointView,
    Event,
    HandshakeResponse,
    IngressRequest,
    OutgoingRequest,
    Rejection,
    SourceView,
)
from tests.support import (
    ROOT,
    NatsServer,
    Received,
    attempt_records,
    base_config,
    receiver,
    run_gateway,
    stream_messages,
)

HMAC_SECRET = "acme-secret"


def hmac_headers(body: bytes, secret: str = HMAC_SECRET) -> dict[str, str]:
    return {"X-Acme-Signature": hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()}


async def stored_events(nats_url: str) -> list[Event]:
    return [decode_event(m.data) for m in await stream_messages(nats_url, "HOOKGATE_EVENTS")]


# --- hookgate_register_components ------------------------------------------------------------


class KeyConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    header: str
    key: str


class KeyVerifier:
    default_event_type: str | None = "header.X-Kind"
    default_event_id: str | None = "header.X-Delivery"

    def __init__(self, config: KeyConfig):
        self.config = config

    def verify(self, request: IngressRequest) -> Rejection | None:
        if request.header(self.config.header) != self.config.key:
            return Rejection(status=401, code="invalid_signature", message="wrong key")
        return None


class StampConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    value: str


class StampSigner:
    def __init__(self, config: StampConfig):
        self.value = config.value

    def sign(self, request: OutgoingRequest) -> None:
        request.set_header("x-stamp", f"{self.value}:{hashlib.sha256(request.body).hexdigest()}")


class ComponentsPlugin:
    @hookimpl
    def hookgate_register_components(self, registry: ComponentRegistry) -> None:
        registry.add_verifier("test-key", KeyConfig, KeyVerifier)
        registry.add_signer("test-stamp", StampConfig, StampSigner)


async def test_register_components_adds_a_verifier_and_a_signer_the_yaml_picks(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    plugin = ComponentsPlugin()
    hooks = Hooks((plugin,))
    verifier_type = hooks.registry.get(ComponentKind.VERIFIER, "test-key")
    assert verifier_type is not None
    assert verifier_type.plugin == hooks.pm.get_name(plugin)
    assert "test-stamp" in hooks.registry.names(ComponentKind.SIGNER)

    # A bad option of a plugin component gets the core's file:line:path error.
    bad = "sources:\n  partner:\n    verify:\n      type: test-key\n      header: X-Key\n      kee: k\n"
    with pytest.raises(ConfigError) as info:
        loads(bad, hooks.registry, file="x.yaml", env={})
    (problem,) = info.value.problems
    assert str(problem).startswith("x.yaml:6: $.sources.partner.verify.kee: "), str(problem)
    assert "unknown" in str(problem)

    async with receiver() as rx:
        text = base_config(
            nats_server.url,
            f"""
            sources:
              partner:
                verify: {{type: test-key, header: X-Key, key: k-123}}
            endpoints:
              main:
                url: {rx.url}/main
                signing: {{scheme: test-stamp, value: s1}}
            routes:
              - from: [partner]
                to: [main]
            """,
        )
        async with run_gateway(tmp_path, text, plugins=(plugin,)) as gw:
            url = f"{gw.url}/webhooks/partner"
            wrong = await gw.http.post(url, content=b"{}", headers={"X-Key": "nope"})
            right = await gw.http.post(
                url,
                content=b'{"n": 1}',
                headers={"X-Key": "k-123", "X-Kind": "thing.made", "X-Delivery": "d1"},
            )
            await rx.wait_for(1)
    (got,) = rx.requests
    assert wrong.status_code == 401
    assert wrong.json()["error"] == "invalid_signature"
    assert right.status_code == 202
    assert got.body == b'{"n": 1}'
    assert got.headers["x-stamp"] == "s1:" + hashlib.sha256(b'{"n": 1}').hexdigest()
    # The verifier's defaults picked the event type and the dedup id.
    (event,) = await stored_events(nats_server.url)
    assert event.type == "thing.made"
    assert event.external_id == "d1"


def test_register_components_must_be_a_plain_def() -> None:
    class AsyncRegistration:
        @hookimpl
        async def hookgate_register_components(self, registry: ComponentRegistry) -> None:
            registry.add_verifier("never", KeyConfig, KeyVerifier)

    with pytest.raises(TypeError, match="must be a plain def"):
        Hooks((AsyncRegistration(),), load_entry_points=False)


# --- hookgate_authenticate -------------------------------------------------------------------


class PartnerKeyAuth:
    """Access rule: callers must present X-Partner-Key; refuses with 403 otherwise."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    @hookimpl
    async def hookgate_authenticate(self, request: IngressRequest, source: SourceView) -> Rejection | None:
        await trio.lowlevel.checkpoint()
        self.seen.append((source.name, request.method))
        if request.header("X-Partner-Key") != "letmein":
            return Rejection(status=403, code="forbidden", message="unknown partner")
        return None


def acme_text(nats_url: str, rx_url: str) -> str:
    return base_config(
        nats_url,
        f"""
        sources:
          acme:
            verify: {{type: hmac, header: X-Acme-Signature, secret: {HMAC_SECRET}}}
        endpoints:
          main:
            url: {rx_url}/main
        routes:
          - from: [acme]
            to: [main]
        """,
    )


async def test_authenticate_rejection_refuses_the_request_before_verification(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    plugin = PartnerKeyAuth()
    async with (
        receiver() as rx,
        run_gateway(tmp_path, acme_text(nats_server.url, rx.url), plugins=(plugin,)) as gw,
    ):
        url = f"{gw.url}/webhooks/acme"
        body = b'{"order": 7}'
        unsigned_no_key = await gw.http.post(url, content=b"{}")
        signed_no_key = await gw.http.post(url, content=body, headers=hmac_headers(body))
        wrong_key = await gw.http.post(
            url, content=body, headers={**hmac_headers(body), "X-Partner-Key": "x"}
        )
        handshake_no_key = await gw.http.get(url)
        key_unsigned = await gw.http.post(url, content=body, headers={"X-Partner-Key": "letmein"})
        accepted = await gw.http.post(
            url, content=body, headers={**hmac_headers(body), "X-Partner-Key": "letmein"}
        )
        await rx.wait_for(1)
    (got,) = rx.requests
    for refused in (unsigned_no_key, signed_no_key, wrong_key, handshake_no_key):
        assert refused.status_code == 403
        assert refused.json()["error"] == "forbidden"
    # Authentication passed, so verification ran and refused the unsigned request.
    assert key_unsigned.status_code == 401
    assert accepted.status_code == 202
    assert got.body == body
    assert [r.body for r in rx.requests] == [body]
    assert len(await stored_events(nats_server.url)) == 1
    assert plugin.seen == [("acme", "POST")] * 3 + [("acme", "GET")] + [("acme", "POST")] * 2


# --- hookgate_verify_signature ---------------------------------------------------------------


class BodyDigestCheck:
    """A check for every source: X-Body-Sha256 must be the SHA-256 of the raw body bytes."""

    @hookimpl
    def hookgate_verify_signature(self, request: IngressRequest, source: SourceView) -> Rejection | None:
        given = request.header("X-Body-Sha256")
        if given is None:
            return Rejection(status=401, code="missing_signature", message="no X-Body-Sha256")
        if not hmac.compare_digest(given, hashlib.sha256(request.body).hexdigest()):
            return Rejection(status=401, code="invalid_signature", message=f"bad digest for {source.name}")
        return None


async def test_verify_signature_refuses_a_bad_signature_on_the_raw_body(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    async with receiver() as rx:
        text = base_config(
            nats_server.url,
            f"""
            sources:
              plain: {{}}
              acme:
                verify: {{type: hmac, header: X-Acme-Signature, secret: {HMAC_SECRET}}}
            endpoints:
              main:
                url: {rx.url}/main
            routes:
              - to: [main]
            """,
        )
        async with run_gateway(tmp_path, text, plugins=(BodyDigestCheck(),)) as gw:
            body = b'{ "raw":  "bytes" }'
            digest = {"X-Body-Sha256": hashlib.sha256(body).hexdigest()}
            missing = await gw.http.post(f"{gw.url}/webhooks/plain", content=body)
            wrong = await gw.http.post(f"{gw.url}/webhooks/plain", content=body + b" ", headers=digest)
            # The configured hmac verifier and the plugin's check must both pass.
            only_plugin = await gw.http.post(f"{gw.url}/webhooks/acme", content=body, headers=digest)
            both = await gw.http.post(
                f"{gw.url}/webhooks/acme", content=body, headers={**digest, **hmac_headers(body)}
            )
            plain = await gw.http.post(f"{gw.url}/webhooks/plain", content=body, headers=digest)
            await rx.wait_for(2)
    got = rx.requests
    assert missing.status_code == 401
    assert missing.json()["error"] == "missing_signature"
    assert wrong.status_code == 401
    assert wrong.json()["error"] == "invalid_signature"
    assert only_plugin.status_code == 401
    assert both.status_code == 202
    assert plain.status_code == 202
    assert sorted(r.headers["hookgate-source"] for r in got) == ["acme", "plain"]
    assert all(r.body == body for r in got)
    assert len(await stored_events(nats_server.url)) == 2


# --- hookgate_handshake ----------------------------------------------------------------------


class ChallengeEcho:
    """Meta-style `hub.challenge` on GET, Slack-style `url_verification` on POST."""

    @hookimpl
    async def hookgate_handshake(
        self, request: IngressRequest, source: SourceView
    ) -> HandshakeResponse | None:
        await trio.lowlevel.checkpoint()
        if request.method in ("GET", "HEAD"):
            query = dict(p.split("=", 1) for p in request.query_string.decode().split("&") if "=" in p)
            if "hub.challenge" in query:
                return HandshakeResponse(body=query["hub.challenge"].encode())
            return None
        try:
            payload = json.loads(request.body)
        except ValueError:
            return None
        if isinstance(payload, dict) and payload.get("type") == "url_verification":
            return HandshakeResponse(
                body=json.dumps({"challenge": payload["challenge"]}).encode(),
                content_type="application/json",
            )
        return None


async def test_handshake_answers_challenges_instead_of_storing_an_event(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    async with receiver() as rx:
        text = base_config(
            nats_server.url,
            f"""
            sources:
              meta: {{}}
            endpoints:
              main:
                url: {rx.url}/main
            routes:
              - to: [main]
            """,
        )
        async with run_gateway(tmp_path, text, plugins=(ChallengeEcho(),)) as gw:
            url = f"{gw.url}/webhooks/meta"
            get = await gw.http.get(url, params={"hub.mode": "subscribe", "hub.challenge": "ch-42"})
            head = await gw.http.head(url, params={"hub.challenge": "ch-42"})
            no_challenge = await gw.http.get(url)
            slack = await gw.http.post(url, json={"type": "url_verification", "challenge": "abc"})
            event = await gw.http.post(url, json={"type": "message", "text": "hi"})
            await rx.wait_for(1)
    (got,) = rx.requests
    assert get.status_code == 200
    assert get.text == "ch-42"
    assert get.headers["content-type"].startswith("text/plain")
    assert head.status_code == 200
    assert no_challenge.status_code == 405
    assert slack.status_code == 200
    assert slack.json() == {"challenge": "abc"}
    assert event.status_code == 202
    assert got.json() == {"type": "message", "text": "hi"}
    (stored,) = await stored_events(nats_server.url)
    assert json.loads(stored.body) == {"type": "message", "text": "hi"}


# --- hookgate_route --------------------------------------------------------------------------


class AuditRouter:
    """Copies every `payment.*` event to the audit endpoint; names an unknown endpoint too."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, list[str]]] = []

    @hookimpl
    async def hookgate_route(self, event: Event, endpoints: list[str]) -> list[str] | None:
        await trio.lowlevel.checkpoint()
        self.seen.append((event.type, list(endpoints)))
        if event.type.startswith("payment."):
            return ["ghost", "audit", "main"]
        return None


async def test_route_adds_endpoints_beyond_the_matched_routes(
    tmp_path: Path, nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    plugin = AuditRouter()
    caplog.set_level(logging.WARNING, logger="hookgate.router")
    async with receiver() as main, receiver() as audit:
        text = base_config(
            nats_server.url,
            f"""
            endpoints:
              main:
                url: {main.url}/main
              audit:
                url: {audit.url}/audit
            routes:
              - from: [internal]
                to: [main]
            """,
        )
        async with run_gateway(tmp_path, text, plugins=(plugin,)) as gw:
            # An explicit `to` is final: the hook is not asked about it.
            explicit = await gw.publish("payment.explicit", {"n": 0}, to=["main"])
            published = [await gw.publish(t, {"n": 1}) for t in ("order.created", "payment.captured")]
            await main.wait_for(3)
            await audit.wait_for(1)
    assert [r.status_code for r in (explicit, *published)] == [202, 202, 202]
    (got,) = audit.requests
    assert got.json()["type"] == "payment.captured"
    assert got.path == "/audit"
    # "main" was already a target: it is not delivered twice.
    assert sorted(r.json()["type"] for r in main.requests) == [
        "order.created",
        "payment.captured",
        "payment.explicit",
    ]
    assert [r.json()["type"] for r in audit.requests] == ["payment.captured"]
    assert plugin.seen == [("order.created", ["main"]), ("payment.captured", ["main"])]
    assert any("unknown endpoint 'ghost'" in r.getMessage() for r in caplog.records)


# --- hookgate_transform ----------------------------------------------------------------------


class Redact:
    """For the `analytics` endpoint only: drop `data.email`."""

    @hookimpl
    async def hookgate_transform(self, event: Event, endpoint: EndpointView) -> Event | None:
        await trio.lowlevel.checkpoint()
        if endpoint.name != "analytics":
            return None
        data = json.loads(event.body)
        data.pop("email", None)
        data.setdefault("steps", []).append("redact")
        return msgspec.structs.replace(event, body=json.dumps(data).encode())


class Tag:
    """Runs after Redact (registered before it) and sees its result."""

    @hookimpl
    def hookgate_transform(self, event: Event, endpoint: EndpointView) -> Event | None:
        if endpoint.name != "analytics":
            return None
        data = json.loads(event.body)
        data.setdefault("steps", []).append("tag")
        return msgspec.structs.replace(event, body=json.dumps(data).encode(), type=event.type + ".redacted")


async def test_transform_changes_the_body_that_arrives(tmp_path: Path, nats_server: NatsServer) -> None:
    async with receiver() as crm, receiver() as analytics:
        text = base_config(
            nats_server.url,
            f"""
            endpoints:
              crm:
                url: {crm.url}/crm
              analytics:
                url: {analytics.url}/analytics
            routes:
              - from: [internal]
                to: [crm, analytics]
            """,
        )
        # pluggy calls the plugin registered last first: Redact, then Tag on Redact's result.
        async with run_gateway(tmp_path, text, plugins=(Tag(), Redact())) as gw:
            response = await gw.publish("user.signed_up", {"user": "u1", "email": "u1@example.com"})
            await crm.wait_for(1)
            await analytics.wait_for(1)
    assert response.status_code == 202
    (to_crm,) = crm.requests
    (to_analytics,) = analytics.requests
    assert to_crm.json()["data"] == {"user": "u1", "email": "u1@example.com"}
    assert to_crm.json()["type"] == "user.signed_up"
    assert to_analytics.json()["data"] == {"user": "u1", "steps": ["redact", "tag"]}
    assert to_analytics.json()["type"] == "user.signed_up.redacted"
    assert to_analytics.headers["webhook-id"] == response.json()["id"]
    # The stored event is untouched: transforms apply per delivery.
    (stored,) = await stored_events(nats_server.url)
    assert json.loads(stored.body) == {"user": "u1", "email": "u1@example.com"}


# --- hookgate_rate_limit ---------------------------------------------------------------------


DEFER = 0.6


class DeferOnce:
    """Defers each delivery once by DEFER seconds, then lets it through."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, float]] = []
        self.outcome = trio.Event()

    @hookimpl
    async def hookgate_rate_limit(self, delivery: Delivery, endpoint: EndpointView) -> float | None:
        await trio.lowlevel.checkpoint()
        first = not any(d == delivery.id for d, _, _ in self.calls)
        self.calls.append((delivery.id, delivery.attempt, trio.current_time()))
        return DEFER if first else None

    @hookimpl
    def hookgate_delivery_outcome(self, attempt: Attempt) -> None:
        self.outcome.set()


async def test_rate_limit_defers_a_delivery_without_using_an_attempt(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    plugin = DeferOnce()
    async with receiver() as rx:
        text = base_config(
            nats_server.url,
            f"""
            endpoints:
              main:
                url: {rx.url}/main
                retry: {{schedule: [100ms]}}
            routes:
              - to: [main]
            """,
        )
        async with run_gateway(tmp_path, text, plugins=(plugin,)) as gw:
            published = await gw.publish("tick", {"n": 1})
            await rx.wait_for(1)
            with trio.fail_after(10):
                await plugin.outcome.wait()
                # The outcome hook runs as the attempt's record is handed to the broker: wait
                # until it is stored.
                while not (attempts := await attempt_records(nats_server.url, "main")):
                    await trio.sleep(0.05)
    assert published.status_code == 202
    (got,) = rx.requests
    assert got.headers["hookgate-attempt"] == "1"
    assert [(attempt, delivery) for delivery, attempt, _ in plugin.calls] == [
        (1, got.headers["hookgate-delivery-id"]),
        (1, got.headers["hookgate-delivery-id"]),
    ]
    first_call = plugin.calls[0][2]
    assert got.at - first_call >= DEFER - 0.1
    # Exactly one attempt was recorded: the deferral did not count as one.
    assert [json.loads(m.data)["attempt"] for m in attempts] == [1]
    assert json.loads(attempts[0].data)["outcome"] == "succeeded"


# --- hookgate_sign ---------------------------------------------------------------------------


class TeamSigner:
    """Signs every outgoing request with a team key, over the id, attempt and body."""

    def __init__(self) -> None:
        self.seen_headers: list[dict[str, str]] = []

    @hookimpl
    def hookgate_sign(self, request: OutgoingRequest, endpoint: EndpointView) -> None:
        self.seen_headers.append({k.lower(): v for k, v in request.headers})
        content = f"{request.event_id}.{request.attempt}.".encode() + request.body
        digest = hmac.new(b"team-key", content, hashlib.sha256).hexdigest()
        request.set_header("X-Team-Signature", f"{endpoint.name}={digest}")


async def test_sign_adds_a_header_that_arrives(tmp_path: Path, nats_server: NatsServer) -> None:
    plugin = TeamSigner()
    async with receiver() as rx:
        text = base_config(
            nats_server.url,
            f"""
            endpoints:
              billing:
                url: {rx.url}/billing
                headers: {{X-Team: billing}}
            routes:
              - to: [billing]
            """,
        )
        async with run_gateway(tmp_path, text, plugins=(plugin,)) as gw:
            response = await gw.publish("invoice.paid", {"amount": 5})
            await rx.wait_for(1)
    (got,) = rx.requests
    event_id = response.json()["id"]
    content = f"{event_id}.1.".encode() + got.body
    expected = "billing=" + hmac.new(b"team-key", content, hashlib.sha256).hexdigest()
    assert got.headers["x-team-signature"] == expected
    # The signer ran after the other headers were set.
    (seen,) = plugin.seen_headers
    for name in ("webhook-id", "webhook-timestamp", "hookgate-delivery-id", "hookgate-attempt", "x-team"):
        assert seen[name] == got.headers[name]


# --- hookgate_delivery_outcome ---------------------------------------------------------------


class OutcomeLog:
    def __init__(self) -> None:
        self.attempts: list[Attempt] = []
        self.succeeded = trio.Event()

    @hookimpl
    async def hookgate_delivery_outcome(self, attempt: Attempt) -> None:
        await trio.lowlevel.checkpoint()
        self.attempts.append(attempt)
        if attempt.outcome == "succeeded":
            self.succeeded.set()


class BrokenObserver:
    def __init__(self) -> None:
        self.calls = 0

    @hookimpl
    def hookgate_delivery_outcome(self, attempt: Attempt) -> None:
        self.calls += 1
        raise RuntimeError("this observer is broken")


async def test_delivery_outcome_sees_every_attempt(tmp_path: Path, nats_server: NatsServer) -> None:
    plugin = OutcomeLog()
    broken = BrokenObserver()  # registered last, so pluggy calls it first

    def fail_first(request: Received, n: int) -> int:
        return 500 if n == 0 else 200

    async with receiver(fail_first) as rx:
        text = base_config(
            nats_server.url,
            f"""
            endpoints:
              flaky:
                url: {rx.url}/flaky
                retry: {{schedule: [100ms], jitter: 0}}
            routes:
              - to: [flaky]
            """,
        )
        async with run_gateway(tmp_path, text, plugins=(plugin, broken)) as gw:
            event_id = (await gw.publish("job.done", {"job": 3})).json()["id"]
            await rx.wait_for(2)
            with trio.fail_after(10):
                await plugin.succeeded.wait()
    first, second = plugin.attempts
    assert (first.outcome, first.attempt, first.status, first.error_kind) == (
        "retrying",
        1,
        500,
        "http_status",
    )
    assert first.next_attempt_at is not None and first.next_attempt_at > first.started_at
    assert (second.outcome, second.attempt, second.status, second.error_kind) == ("succeeded", 2, 200, None)
    for attempt in (first, second):
        assert attempt.endpoint == "flaky"
        assert attempt.event_id == event_id
        assert attempt.delivery_id == rx.requests[0].headers["hookgate-delivery-id"]
        assert attempt.latency >= 0
        assert attempt.response_body == b'{"ok":true}'
    # A failing observer is logged; it neither hid the attempts from the others nor changed the delivery.
    assert broken.calls == 2
    assert [r.headers["hookgate-attempt"] for r in rx.requests] == ["1", "2"]


# --- hookgate_startup and hookgate_shutdown --------------------------------------------------


class Lifecycle:
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    @hookimpl
    async def hookgate_startup(self, info: dict[str, Any]) -> None:
        await trio.lowlevel.checkpoint()
        self.events.append(("startup", dict(info)))

    @hookimpl
    async def hookgate_shutdown(self) -> None:
        await trio.lowlevel.checkpoint()
        self.events.append(("shutdown", None))


def lifecycle_text(nats_url: str) -> str:
    return base_config(nats_url, "endpoints:\n  main:\n    url: http://127.0.0.1:9/main\n")


async def test_startup_sees_the_listen_url_and_version(tmp_path: Path, nats_server: NatsServer) -> None:
    plugin = Lifecycle()
    async with run_gateway(tmp_path, lifecycle_text(nats_server.url), plugins=(plugin,)) as gw:
        url = gw.url
        # Called once, before run_gateway handed the gateway over: it was serving by then.
        events = list(plugin.events)
        health = await gw.http.get(f"{events[0][1]['listen']}/healthz") if events else None
    assert [name for name, _ in events] == ["startup"]
    info = events[0][1]
    assert info["listen"] == url
    assert info["version"] == hookgate.__version__
    assert health is not None and health.status_code == 200


async def test_shutdown_is_called_when_the_gateway_stops(tmp_path: Path, nats_server: NatsServer) -> None:
    plugin = Lifecycle()
    async with run_gateway(tmp_path, lifecycle_text(nats_server.url), plugins=(plugin,)) as gw:
        assert [name for name, _ in plugin.events] == ["startup"]
        url = gw.url
    assert [name for name, _ in plugin.events] == ["startup", "shutdown"]
    # It ran after the HTTP server stopped accepting requests.
    with pytest.raises(OSError):
        host, port = url.removeprefix("http://").rsplit(":", 1)
        await trio.open_tcp_stream(host, int(port))


# --- every hookspec has a test and a section in CONTRIBUTING.md ------------------------------


def hookspec_names() -> list[str]:
    marker = f"{hookspecs.PROJECT}_spec"
    return sorted(
        name for name, fn in vars(hookspecs).items() if inspect.isfunction(fn) and hasattr(fn, marker)
    )


def test_every_hookspec_has_a_test_here() -> None:
    names = hookspec_names()
    assert len(names) >= 11
    tests = [
        name for name, fn in vars(sys.modules[__name__]).items() if name.startswith("test_") and callable(fn)
    ]
    untested = [
        name
        for name in names
        if not any(
            t == f"test_{name.removeprefix('hookgate_')}"
            or t.startswith(f"test_{name.removeprefix('hookgate_')}_")
            for t in tests
        )
    ]
    assert not untested, f"hookspecs without a test_<name> function in {__name__}: {untested}"
    source = Path(__file__).read_text()
    unimplemented = [name for name in names if f"def {name}(" not in source]
    assert not unimplemented, f"hookspecs no test plugin here implements: {unimplemented}"


def test_every_hookspec_has_a_section_in_contributing() -> None:
    path = ROOT / "CONTRIBUTING.md"
    if not path.exists():
        pytest.skip("CONTRIBUTING.md not written yet")
    headings = set(re.findall(r"^###\s+`?(hookgate_\w+)`?", path.read_text(), flags=re.MULTILINE))
    names = set(hookspec_names())
    assert not names - headings, (
        f"hookspecs without a '### <name>' section in CONTRIBUTING.md: {sorted(names - headings)}"
    )
    assert not headings - names, (
        f"CONTRIBUTING.md documents hooks that do not exist: {sorted(headings - names)}"
    )
