"""The hook points plugins implement. Plugins import this module, `hookgate.types` and
`hookgate.plugin_kit` only.

Any hookimpl may be `async def` (except `hookgate_register_components`, which runs before there is
an event loop). Hooks are called through pluggy's caller, and the core awaits awaitable results under
trio, in pluggy's order; for `firstresult` hooks an async implementation's coroutine is a result,
so it ends the call (CONTRIBUTING.md, "Async implementations and wrappers"). Hooks that return a
`Rejection` veto the request; `None` means "no opinion". Every hookspec is documented in
CONTRIBUTING.md and exercised by a test.
"""

from __future__ import annotations

from typing import Any

import pluggy

from hookgate.types import (
    Attempt,
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

PROJECT = "hookgate"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def hookgate_register_components(registry: ComponentRegistry) -> None:
    """Register named components (verifiers, signers, ...) that the YAML picks with `type:`.

    Each component declares its options as a msgspec Struct; a bad option gets the same
    file:line:path error as the core config. This hook is called once, when the plugins load, and
    must be a plain `def`.
    """


@hookspec
def hookgate_authenticate(request: IngressRequest, source: SourceView) -> Rejection | None:
    """Decide whether the caller may send to this source (access rules). Runs before verification.

    Return a Rejection (usually 403) to refuse; every implementation must pass.
    """


@hookspec
def hookgate_verify_signature(request: IngressRequest, source: SourceView) -> Rejection | None:
    """Verify the request's signature on its raw body. Return a Rejection (usually 401) to refuse.

    The core implements this for the source's configured `verify:` component; other plugins can add
    checks that apply to every source.
    """


@hookspec(firstresult=True)
def hookgate_handshake(request: IngressRequest, source: SourceView) -> HandshakeResponse | None:
    """Answer a provider handshake (a challenge, a CRC) instead of storing the request as an event.

    Called for GET/HEAD requests, and for POSTs after their signature verified. The first
    non-None answer wins.
    """


@hookspec
def hookgate_route(event: Event, endpoints: list[str]) -> list[str] | None:
    """Add endpoints for an event beyond those its routes matched (`endpoints`, read-only).

    Return endpoint names to add, or None. Unknown names are logged and skipped.
    """


@hookspec
def hookgate_transform(event: Event, endpoint: EndpointView) -> Event | None:
    """Return a changed copy of the event for this endpoint, or None to leave it.

    Implementations run in pluggy's call order, each seeing the previous one's result: the plugin
    registered last runs first, and `@hookimpl(tryfirst=True)` / `trylast=True` move one.
    """


@hookspec(firstresult=True)
def hookgate_rate_limit(delivery: Delivery, endpoint: EndpointView) -> float | None:
    """Return a delay in seconds to defer this delivery, or None to send it now.

    A deferral does not use up an attempt.
    """


@hookspec
def hookgate_sign(request: OutgoingRequest, endpoint: EndpointView) -> None:
    """Add signature headers to an outgoing request (after all other headers are set)."""


@hookspec
def hookgate_delivery_outcome(attempt: Attempt) -> None:
    """Observe the result of every delivery attempt (for metrics, alerts, audit)."""


@hookspec
def hookgate_startup(info: dict[str, Any]) -> None:
    """The gateway has started; `info` holds `listen` (the bound address) and `version`."""


@hookspec
def hookgate_shutdown() -> None:
    """The gateway is stopping."""
