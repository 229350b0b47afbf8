"""OpenTelemetry tracing, optional (`pip install 'hookgate[otel]'`, then `tracing: {enabled: true}`).

Spans: one per ingress request (`POST /webhooks/{source}`), one per internal publish
(`POST /api/v1/events`), and one per delivery attempt. The W3C trace context travels from the
provider's `traceparent` header, through the `traceparent`/`tracestate` headers of the NATS
messages (event, delivery, scheduled retry), to the `traceparent` header of every outgoing request.

When tracing is off, `OFF` stands in: its spans are one shared do-nothing object, so the hot path
pays a method call and nothing is imported from opentelemetry. The router and the retry schedule
copy trace headers between NATS messages whether or not tracing is on here, so that replicas with
and without tracing can share the consumers.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import AsyncIterator, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hookgate.config import TracingConfig
    from hookgate.ingress.asgi import Message, Scope, Send
    from hookgate.types import Delivery, OutgoingRequest

log = logging.getLogger("hookgate.tracing")

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
_TRACE_HEADERS = (TRACEPARENT, TRACESTATE)
_TRACE_HEADERS_BYTES = (b"traceparent", b"tracestate")
INSTALL_HINT = "tracing needs OpenTelemetry: pip install 'hookgate[otel]'"


def available() -> bool:
    """Whether the OpenTelemetry SDK can be imported (without importing it)."""
    try:
        return importlib.util.find_spec("opentelemetry.sdk.trace") is not None
    except ModuleNotFoundError:  # the `opentelemetry` namespace itself is missing
        return False


def carried(headers: Mapping[str, str]) -> dict[str, str]:
    """The trace context among a NATS message's headers, to copy onto the messages it leads to.

    Services publishing straight to JetStream may spell the names in any case (W3C names are
    case-insensitive); they are passed on lowercased.
    """
    out: dict[str, str] = {}
    for name, value in headers.items():
        lowered = name.lower()
        if lowered in _TRACE_HEADERS:
            out[lowered] = value
    return out


class Span:
    """A span that records nothing: what every span is while tracing is off."""

    __slots__ = ()

    def __enter__(self) -> Span:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    def set(self, name: str, value: str | int) -> None:
        """Set an attribute."""

    def done(self, status: int | None, error: str | None = None, error_kind: str | None = None) -> None:
        """Record the HTTP status and, if the request or attempt failed, an error status."""

    def answered(self, status: int) -> None:
        """Record the status a server span answered; a rejection (4xx) or 5xx is an error."""

    def answering(self, send: Send) -> Send:
        """`send`, recording the status it answers with on this span."""
        return send

    def inject(self, carrier: dict[str, str]) -> None:
        """Write this span's context into message headers (`traceparent`, maybe `tracestate`)."""

    def inject_request(self, request: OutgoingRequest) -> None:
        """Put this span's context on an outgoing request, replacing any forwarded one."""


NO_SPAN = Span()


class Tracing:
    """Tracing that is off: every span is NO_SPAN."""

    enabled = False

    def ingress(self, scope: Scope, source: str) -> Span:
        return NO_SPAN

    def publish(self, scope: Scope) -> Span:
        return NO_SPAN

    def attempt(self, delivery: Delivery, headers: Mapping[str, str]) -> Span:
        return NO_SPAN

    def close(self) -> None:
        pass


OFF = Tracing()


def setup(config: TracingConfig, provider: Any = None) -> Tracing:
    """The gateway's tracing, from its config.

    `provider` is an OpenTelemetry TracerProvider to use (tests pass one with an in-memory
    exporter). Without it, a TracerProvider that the process configured globally is used (for
    example by `opentelemetry-instrument`); failing that, hookgate makes its own (see
    `_own_provider`), and shuts it down in `close()`.
    """
    if not config.enabled:
        return OFF
    if not available():
        raise RuntimeError(INSTALL_HINT)
    return _OtelTracing(config.service_name, provider)


@contextlib.asynccontextmanager
async def tracing_for(config: TracingConfig, provider: Any = None) -> AsyncIterator[Tracing]:
    """`setup`, closed on exit (after everything that makes spans has stopped)."""
    tracing = setup(config, provider)
    try:
        yield tracing
    finally:
        tracing.close()


class _OtelSpan(Span):
    __slots__ = ("_propagator", "_span", "_token")

    def __init__(self, span: Any, propagator: Any):
        self._span = span
        self._propagator = propagator
        self._token: Any = None

    def __enter__(self) -> Span:
        from opentelemetry import context, trace

        # Current for the task while open, so spans that plugins start nest under it.
        self._token = context.attach(trace.set_span_in_context(self._span))
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        from opentelemetry import context
        from opentelemetry.trace import Status, StatusCode

        context.detach(self._token)
        if exc is not None:
            # Includes trio.Cancelled: an attempt cut short by shutdown did not complete.
            self._span.record_exception(exc)
            self._span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
        self._span.end()

    def set(self, name: str, value: str | int) -> None:
        self._span.set_attribute(name, value)

    def done(self, status: int | None, error: str | None = None, error_kind: str | None = None) -> None:
        from opentelemetry.trace import Status, StatusCode

        if status:
            self._span.set_attribute("http.response.status_code", status)
        if error_kind is not None:
            self._span.set_attribute("error.type", error_kind)
        if error is not None:
            self._span.set_status(Status(StatusCode.ERROR, error))

    def answered(self, status: int) -> None:
        # Unlike OpenTelemetry's HTTP server convention, 4xx counts: for a gateway a refused
        # webhook (bad signature, unknown source) is the thing worth finding.
        self.done(status, None if 0 < status < 400 else f"HTTP {status}" if status else "no response")

    def answering(self, send: Send) -> Send:
        async def recording(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.answered(message["status"])
            await send(message)

        return recording

    def inject(self, carrier: dict[str, str]) -> None:
        from opentelemetry import trace

        self._propagator.inject(carrier, context=trace.set_span_in_context(self._span))

    def inject_request(self, request: OutgoingRequest) -> None:
        carrier: dict[str, str] = {}
        self.inject(carrier)
        # A provider's own trace headers are forwarded with its other headers; ours replace them.
        request.headers = [(k, v) for k, v in request.headers if k.lower() not in _TRACE_HEADERS]
        request.headers.extend(carrier.items())


class _OtelTracing(Tracing):
    enabled = True

    def __init__(self, service_name: str, provider: Any = None):
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        from hookgate import __version__

        self._owned = None
        if provider is None:
            configured = trace.get_tracer_provider()
            # Until something sets one, the global provider is a proxy that records nothing.
            if isinstance(configured, trace.ProxyTracerProvider):
                provider = self._owned = _own_provider(service_name)
            else:
                provider = configured
        self._tracer = provider.get_tracer("hookgate", __version__)
        # W3C TraceContext only, whatever OTEL_PROPAGATORS says: the headers we copy between
        # NATS messages are exactly these.
        self._propagator = TraceContextTextMapPropagator()
        self._kinds = trace.SpanKind

    def _parent(self, carrier: Mapping[str, str]) -> Any:
        return self._propagator.extract(carrier) if carrier else None

    def _server(self, name: str, scope: Scope, attributes: dict[str, str | int]) -> Span:
        carrier = {
            k.decode("latin-1").lower(): v.decode("latin-1")
            for k, v in scope["headers"]
            if k.lower() in _TRACE_HEADERS_BYTES
        }
        span = self._tracer.start_span(
            name, context=self._parent(carrier), kind=self._kinds.SERVER, attributes=attributes
        )
        return _OtelSpan(span, self._propagator)

    def ingress(self, scope: Scope, source: str) -> Span:
        return self._server(
            f"{scope['method']} /webhooks/{{source}}",  # GET/HEAD: provider handshakes
            scope,
            {
                "http.request.method": scope["method"],
                "http.route": "/webhooks/{source}",
                "hookgate.source": source,
            },
        )

    def publish(self, scope: Scope) -> Span:
        return self._server(
            "POST /api/v1/events",
            scope,
            {"http.request.method": scope["method"], "http.route": "/api/v1/events"},
        )

    def attempt(self, delivery: Delivery, headers: Mapping[str, str]) -> Span:
        span = self._tracer.start_span(
            f"deliver {delivery.endpoint}",
            context=self._parent(carried(headers)),
            kind=self._kinds.CLIENT,
            attributes={
                "hookgate.endpoint": delivery.endpoint,
                "hookgate.delivery_id": delivery.id,
                "hookgate.event_id": delivery.event.id,
                "hookgate.attempt": delivery.attempt,
            },
        )
        return _OtelSpan(span, self._propagator)

    def close(self) -> None:
        # Only a provider we made is ours to shut down; this flushes its batch of spans.
        if self._owned is not None:
            self._owned.shutdown()


def _own_provider(service_name: str) -> Any:
    """An SDK TracerProvider configured by the standard OTEL_* environment variables.

    The exporter is OTLP over HTTP (OTEL_EXPORTER_OTLP_ENDPOINT, default http://localhost:4318)
    when its package is installed, as the `otel` extra does; OTEL_TRACES_EXPORTER may say
    `console` or `none` instead. OTEL_SERVICE_NAME, when set, wins over `service_name`; the
    sampler follows OTEL_TRACES_SAMPLER (default: parent-based, always on).
    """
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service_name}
    provider = TracerProvider(resource=Resource.create(attributes))
    choice = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
    exporter: SpanExporter | None = None
    if choice == "console":
        exporter = ConsoleSpanExporter()
    elif choice == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            log.warning(
                "tracing: no OTLP exporter installed (pip install 'hookgate[otel]'); spans are not exported"
            )
        else:
            exporter = OTLPSpanExporter()
    elif choice != "none":
        log.warning("tracing: OTEL_TRACES_EXPORTER=%s is not supported here; spans are not exported", choice)
    if exporter is not None:
        # The SDK's standard export path: spans are queued and sent from the processor's own thread.
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider
