"""Tracing: spans for ingress, publishes and attempts, and the trace context carried through NATS.

A real gateway on a real nats-server delivers to a real receiver; spans are recorded with the
OpenTelemetry SDK's in-memory exporter on a TracerProvider handed to the gateway.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any

import nats
import pytest
import trio
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from hookgate.config import ConfigError, TracingConfig, loads
from hookgate.observe import tracing
from hookgate.plugin_host.hooks import Hooks
from hookgate.types import OutgoingRequest
from tests.support import NatsServer, base_config, receiver, run_gateway
from tests.test_ingress import signed

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


class Spans(SpanProcessor):
    """Finished spans, from the SDK's in-memory exporter, with a way to wait for them."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.provider.add_span_processor(self)  # after the exporter: it has the span when we wake
        self._changed = trio.Event()

    def on_end(self, span: ReadableSpan) -> None:
        # Spans end on the gateway's trio thread, so a trio.Event can be set here.
        self._changed.set()
        self._changed = trio.Event()

    @property
    def finished(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    async def wait_for(self, count: int, predicate: Callable[[ReadableSpan], bool]) -> list[ReadableSpan]:
        with trio.fail_after(10):
            while len(matching := [s for s in self.finished if predicate(s)]) < count:
                await self._changed.wait()
        return matching


def named(name: str) -> Callable[[ReadableSpan], bool]:
    return lambda span: span.name == name


def parse_traceparent(value: str) -> tuple[int, int]:
    version, trace_id, span_id, flags = value.split("-")
    assert version == "00" and flags == "01"
    return int(trace_id, 16), int(span_id, 16)


def config(nats_url: str, receiver_url: str, *, enabled: bool = True, retry: str = "[100ms]") -> str:
    return base_config(
        nats_url,
        f"""
        tracing: {{enabled: {str(enabled).lower()}}}
        sources:
          acme:
            verify: {{type: hmac, header: X-Acme-Signature, prefix: "sha256=", secret: acme-secret}}
            event_type: header.X-Acme-Event
            event_id: header.X-Acme-Delivery
        endpoints:
          service:
            url: {receiver_url}/hooks
            retry: {{schedule: {retry}, jitter: 0}}
        routes:
          - to: [service]
        """,
    )


async def test_a_webhook_is_traced_from_the_provider_to_the_endpoint(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    spans = Spans()
    body = b'{"order": 1}'
    async with (
        receiver() as rx,
        run_gateway(tmp_path, config(nats_server.url, rx.url), tracer_provider=spans.provider) as gw,
    ):
        answer = await gw.http.post(
            f"{gw.url}/webhooks/acme",
            content=body,
            headers={**signed(body, "d-1"), "traceparent": TRACEPARENT, "tracestate": "vendor=x"},
        )
        (got,) = await rx.wait_for(1)
        (attempt,) = await spans.wait_for(1, named("deliver service"))
    (ingress,) = [s for s in spans.finished if s.name == "POST /webhooks/{source}"]
    assert answer.status_code == 202
    event_id = answer.json()["id"]

    # The ingress span continues the provider's trace.
    assert ingress.kind is SpanKind.SERVER
    assert ingress.context.trace_id == int(TRACE_ID, 16)
    assert ingress.parent is not None and ingress.parent.span_id == int(PARENT_ID, 16)
    assert ingress.attributes is not None
    assert ingress.attributes["hookgate.source"] == "acme"
    assert ingress.attributes["hookgate.event_id"] == event_id
    assert ingress.attributes["http.response.status_code"] == 202
    assert ingress.status.status_code is StatusCode.UNSET

    # The attempt is its child, across the events and deliveries streams.
    assert attempt.kind is SpanKind.CLIENT
    assert attempt.context.trace_id == int(TRACE_ID, 16)
    assert attempt.parent is not None and attempt.parent.span_id == ingress.context.span_id
    assert attempt.attributes is not None
    assert attempt.attributes["hookgate.endpoint"] == "service"
    assert attempt.attributes["hookgate.event_id"] == event_id
    assert attempt.attributes["hookgate.delivery_id"] == got.headers["hookgate-delivery-id"]
    assert attempt.attributes["hookgate.attempt"] == 1
    assert attempt.attributes["http.response.status_code"] == 200

    # The endpoint sees the attempt as its parent, not the provider's span.
    assert parse_traceparent(got.headers["traceparent"]) == (int(TRACE_ID, 16), attempt.context.span_id)
    assert got.headers["tracestate"] == "vendor=x"


async def test_a_retry_stays_in_the_trace_of_its_publish(tmp_path: Path, nats_server: NatsServer) -> None:
    spans = Spans()
    async with (
        receiver(lambda request, n: 500 if n == 0 else 200) as rx,
        run_gateway(tmp_path, config(nats_server.url, rx.url), tracer_provider=spans.provider) as gw,
    ):
        published = await gw.http.post(
            f"{gw.url}/api/v1/events",
            json={"type": "order.created", "data": {"n": 1}},
            headers={"Authorization": "Bearer test-token", "traceparent": TRACEPARENT},
        )
        first, second = await rx.wait_for(2)
        attempts = await spans.wait_for(2, named("deliver service"))
    (publish,) = [s for s in spans.finished if s.name == "POST /api/v1/events"]
    assert published.status_code == 202
    assert publish.parent is not None and publish.parent.span_id == int(PARENT_ID, 16)
    assert publish.attributes is not None
    assert publish.attributes["hookgate.event_id"] == published.json()["id"]
    assert publish.attributes["http.response.status_code"] == 202

    failed, succeeded = sorted(attempts, key=lambda s: s.start_time or 0)
    # Both attempts are children of the publish, the second one after a scheduled retry.
    for attempt in (failed, succeeded):
        assert attempt.context.trace_id == int(TRACE_ID, 16)
        assert attempt.parent is not None and attempt.parent.span_id == publish.context.span_id
    assert failed.attributes is not None and succeeded.attributes is not None
    assert failed.attributes["hookgate.attempt"] == 1
    assert failed.attributes["http.response.status_code"] == 500
    assert failed.attributes["error.type"] == "http_status"
    assert failed.status.status_code is StatusCode.ERROR
    assert succeeded.attributes["hookgate.attempt"] == 2
    assert succeeded.status.status_code is StatusCode.UNSET
    assert parse_traceparent(first.headers["traceparent"]) == (int(TRACE_ID, 16), failed.context.span_id)
    assert parse_traceparent(second.headers["traceparent"]) == (int(TRACE_ID, 16), succeeded.context.span_id)


async def test_a_service_publishing_to_nats_with_a_traceparent_is_honoured(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    spans = Spans()

    async def publish() -> None:
        nc = await nats.connect(nats_server.url)
        try:
            # Header names in any case: W3C names are case-insensitive.
            await nc.jetstream().publish(
                "hookgate.publish.order.created", b'{"n": 2}', headers={"Traceparent": TRACEPARENT}
            )
        finally:
            await nc.close()

    async with (
        receiver() as rx,
        run_gateway(tmp_path, config(nats_server.url, rx.url), tracer_provider=spans.provider),
    ):
        await trio.to_thread.run_sync(lambda: asyncio.run(publish()))
        (got,) = await rx.wait_for(1)
        (attempt,) = await spans.wait_for(1, named("deliver service"))
    assert attempt.parent is not None and attempt.parent.span_id == int(PARENT_ID, 16)
    assert parse_traceparent(got.headers["traceparent"]) == (int(TRACE_ID, 16), attempt.context.span_id)


async def test_a_rejected_webhook_has_an_error_span(tmp_path: Path, nats_server: NatsServer) -> None:
    spans = Spans()
    async with (
        receiver() as rx,
        run_gateway(tmp_path, config(nats_server.url, rx.url), tracer_provider=spans.provider) as gw,
    ):
        answer = await gw.http.post(
            f"{gw.url}/webhooks/acme",
            content=b"{}",
            headers={**signed(b"{}", "d-2", secret="wrong"), "traceparent": TRACEPARENT},
        )
        (span,) = await spans.wait_for(1, named("POST /webhooks/{source}"))
    assert answer.status_code == 401
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes is not None
    assert span.attributes["http.response.status_code"] == 401
    assert span.attributes["hookgate.rejection"] == "invalid_signature"
    assert "hookgate.event_id" not in span.attributes


async def test_a_handshake_span_is_named_by_its_method(tmp_path: Path, nats_server: NatsServer) -> None:
    spans = Spans()
    async with (
        receiver() as rx,
        run_gateway(tmp_path, config(nats_server.url, rx.url), tracer_provider=spans.provider) as gw,
    ):
        answer = await gw.http.get(f"{gw.url}/webhooks/acme")
        (span,) = await spans.wait_for(1, named("GET /webhooks/{source}"))
    assert answer.status_code == 405  # acme has no GET handshake
    assert span.attributes is not None
    assert span.attributes["http.request.method"] == "GET"
    assert span.attributes["http.response.status_code"] == 405


async def test_tracing_disabled_makes_no_spans_and_adds_no_traceparent(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    spans = Spans()
    async with (
        receiver() as rx,
        run_gateway(
            tmp_path, config(nats_server.url, rx.url, enabled=False), tracer_provider=spans.provider
        ) as gw,
    ):
        published = await gw.publish("order.created", {"n": 3})
        (got,) = await rx.wait_for(1)
    assert published.status_code == 202
    assert "traceparent" not in got.headers
    assert spans.finished == []


# --- without a gateway ----------------------------------------------------------------------


async def test_tracing_off_is_a_no_op() -> None:
    off = tracing.setup(TracingConfig())
    assert off is tracing.OFF and not off.enabled
    scope = {"method": "POST", "headers": [(b"traceparent", TRACEPARENT.encode())]}
    sent: list[object] = []

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    with off.ingress(scope, "acme") as span:
        assert span is tracing.NO_SPAN
        carrier = {"Nats-Msg-Id": "x"}
        span.inject(carrier)
        assert carrier == {"Nats-Msg-Id": "x"}
        assert span.answering(send) is send
        request = OutgoingRequest(
            method="POST",
            url="http://x.test/",
            headers=[("traceparent", TRACEPARENT)],  # forwarded from a provider: left alone
            body=b"",
            delivery_id="d",
            event_id="e",
            attempt=1,
            timestamp=0,
        )
        span.inject_request(request)
        assert request.headers == [("traceparent", TRACEPARENT)]
        span.set("a", 1)
        span.done(500, "HTTP 500", "http_status")
        span.answered(401)
    assert off.publish(scope) is tracing.NO_SPAN
    off.close()


def test_tracing_off_imports_nothing_from_opentelemetry(tmp_path: Path) -> None:
    (tmp_path / "hookgate.yaml").write_text("tracing: {enabled: false}\n")
    code = (
        "import sys\n"
        "from hookgate import config, gateway\n"
        "from hookgate.observe import tracing\n"
        "from hookgate.plugin_host.hooks import Hooks\n"
        f"loaded = config.load({str(tmp_path / 'hookgate.yaml')!r}, Hooks().registry)\n"
        "assert tracing.setup(loaded.config.tracing) is tracing.OFF\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_trace_headers_are_carried_lowercased() -> None:
    headers = {"Nats-Msg-Id": "x", "Traceparent": TRACEPARENT, "TRACESTATE": "a=b", "other": "y"}
    assert tracing.carried(headers) == {"traceparent": TRACEPARENT, "tracestate": "a=b"}
    assert tracing.carried({"Nats-Msg-Id": "x"}) == {}


@pytest.fixture
def without_otel_sdk(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if `hookgate[otel]` were not installed: find_spec reports no SDK."""
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)


@pytest.mark.usefixtures("without_otel_sdk")
def test_enabled_without_the_sdk_is_a_config_error() -> None:
    assert not tracing.available()
    with pytest.raises(ConfigError) as caught:
        loads("server: {}\ntracing:\n  enabled: true\n", Hooks().registry, file="hookgate.yaml", env={})
    assert str(caught.value) == (
        "hookgate.yaml:3: $.tracing.enabled: tracing needs OpenTelemetry: pip install 'hookgate[otel]'"
    )
    with pytest.raises(RuntimeError, match=r"pip install 'hookgate\[otel\]'"):
        tracing.setup(TracingConfig(enabled=True))


@pytest.mark.usefixtures("without_otel_sdk")
def test_disabled_without_the_sdk_is_fine() -> None:
    loaded = loads("tracing: {enabled: false}\n", Hooks().registry, file="hookgate.yaml", env={})
    assert tracing.setup(loaded.config.tracing) is tracing.OFF


def test_tracing_config() -> None:
    registry = Hooks().registry
    loaded = loads("tracing: {enabled: true, service_name: billing-gw}\n", registry, env={})
    assert loaded.config.tracing == TracingConfig(enabled=True, service_name="billing-gw")
    assert loads("", registry, env={}).config.tracing == TracingConfig(enabled=False, service_name="hookgate")
    with pytest.raises(ConfigError) as caught:
        loads("tracing:\n  enabled: true\n  exporter: otlp\n", registry, file="hookgate.yaml", env={})
    assert str(caught.value) == (
        "hookgate.yaml:3: $.tracing.exporter: unknown key; expected one of: enabled, service_name"
    )
    with pytest.raises(ConfigError) as caught:
        loads('tracing: {service_name: ""}\n', registry, file="hookgate.yaml", env={})
    assert "$.tracing.service_name" in str(caught.value)


def test_enabled_without_a_provider_makes_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    # No global provider is set in the tests: hookgate makes its own and shuts it down on close.
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    own = tracing.setup(TracingConfig(enabled=True, service_name="gw-test"))
    assert own.enabled
    provider = own._owned  # type: ignore[attr-defined]
    assert isinstance(provider, TracerProvider)
    assert provider.resource.attributes["service.name"] == "gw-test"
    own.close()
