"""Helpers for testing plugin components (verifiers, access rules, handshakes, signers, endpoint auth).

Components are built the way the gateway builds them: YAML through the config loader, then the
factory the plugin registered. Requests are built as ingress and the dispatcher build them.
Assertions that every test module makes the same way live here; what a test checks stays in it.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterable, Mapping
from typing import Any

import pytest
import standardwebhooks.webhooks
import svix.webhooks

from hookgate.config import ConfigError, LoadedConfig, loads
from hookgate.plugin_host.hooks import Hooks
from hookgate.types import ComponentKind, IngressRequest, OutgoingRequest, Rejection
from tests.support import base_config

Headers = Mapping[str, str] | Iterable[tuple[str, str]]

# --- building components through the config loader -------------------------------------------------


def load(hooks: Hooks, text: str, env: dict[str, str] | None = None) -> LoadedConfig:
    """Load config text (named x.yaml in errors) against the plugins' registry."""
    return loads(text, hooks.registry, file="x.yaml", env=env or {})


def build(hooks: Hooks, kind: ComponentKind, component: Any, **factory_options: Any) -> Any:
    """Build a loaded component with the factory its plugin registered for `kind`."""
    ctype = hooks.registry.get(kind, component.type)
    assert ctype is not None, f"no {kind} named {component.type!r}"
    return ctype.factory(component.config, **factory_options)


def with_clock(now: float | None) -> dict[str, Any]:
    """Factory options that fix a component's clock at `now`; None leaves it on the real one."""
    return {} if now is None else {"now": lambda: now}


def load_access_rule(hooks: Hooks, type_: str, **options: Any) -> Any:
    """The rule of `sources: {acme: {auth: [{type: type_, **options}]}}`."""
    text = "sources:\n  acme:\n    auth: [" + json.dumps({"type": type_, **options}) + "]\n"
    (component,) = load(hooks, text).access_rules["acme"]
    return build(hooks, ComponentKind.ACCESS_RULE, component)


def load_handshake(hooks: Hooks, source: str, type_: str, **options: Any) -> Any:
    """The handshake of `sources: {source: {handshake: {type: type_, **options}}}`."""
    text = f"sources:\n  {source}:\n    handshake: " + json.dumps({"type": type_, **options}) + "\n"
    return build(hooks, ComponentKind.HANDSHAKE, load(hooks, text).handshakes[source])


def load_verifier(hooks: Hooks, source: str, verify: Mapping[str, Any], now: float | None = None) -> Any:
    """The verifier of `sources: {source: {verify: verify}}`, its clock fixed at `now` if given."""
    text = f"sources:\n  {source}:\n    verify: {json.dumps(verify)}\n"
    return build(hooks, ComponentKind.VERIFIER, load(hooks, text).verifiers[source], **with_clock(now))


AUTH_ENDPOINT = "endpoints:\n  ep:\n    url: https://example.com/in\n"


def load_auth(hooks: Hooks, auth: Mapping[str, Any]) -> Any:
    """The endpoint auth of `endpoints: {ep: {url: https://example.com/in, auth: auth}}`."""
    component = load(hooks, AUTH_ENDPOINT + f"    auth: {json.dumps(auth)}\n").endpoint_auth["ep"]
    return build(hooks, ComponentKind.ENDPOINT_AUTH, component)


ENDPOINT = "endpoints:\n  billing:\n    url: http://127.0.0.1:9/hooks\n"


def load_signer(hooks: Hooks, signing: str, now: Any = None) -> Any:
    """The signer of endpoint `billing` with `signing:` (YAML under it), on clock `now` if given."""
    component = load(hooks, nested(ENDPOINT + "    signing:\n", signing, 6)).signers["billing"]
    return build(hooks, ComponentKind.SIGNER, component, **({} if now is None else {"now": now}))


class Clock:
    """A settable clock for components that take `now=`."""

    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- config errors ------------------------------------------------------------------------------


def nested(head: str, block: str, indent: int) -> str:
    """`head`, then the (dedented) YAML `block` indented under its last key."""
    return head + textwrap.indent(textwrap.dedent(block), " " * indent)


def load_error(hooks: Hooks, text: str, env: dict[str, str] | None = None) -> ConfigError:
    """The ConfigError that loading `text` must raise."""
    with pytest.raises(ConfigError) as info:
        load(hooks, text, env)
    return info.value


def the_problem(error: ConfigError) -> str:
    """The one problem of a config error, as shown to the user."""
    (problem,) = error.problems
    return str(problem)


def assert_problem(error: ConfigError | str, where: str, *words: str, ignore_case: bool = True) -> None:
    """One problem, at exactly `where` ("file:line: path"), whose message has all of `words`."""
    text = error if isinstance(error, str) else the_problem(error)
    assert text.startswith(where + ": "), f"{text!r} is not at {where!r}"
    message = text[len(where) + 2 :]
    if ignore_case:
        assert all(word.lower() in message.lower() for word in words), f"{text!r} lacks one of {words}"
    else:
        assert all(word in message for word in words), f"{text!r} lacks one of {words}"


# --- requests -----------------------------------------------------------------------------------


def ingress_request(
    source: str,
    *,
    headers: Headers = (),
    body: bytes = b"{}",
    method: str = "POST",
    query: bytes = b"",
    url: str | None = None,
    path: str | None = None,
    client: str | None = "127.0.0.1",
) -> IngressRequest:
    """A request to /webhooks/{source} (or `path`) as ingress hands it over: header names in lower case."""
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    if url is None:
        url = f"http://127.0.0.1/webhooks/{source}" + ("?" + query.decode("latin-1") if query else "")
    return IngressRequest(
        source=source,
        method=method,
        url=url,
        path=path or f"/webhooks/{source}",
        query_string=query,
        headers=[(k.lower(), v) for k, v in pairs],
        body=body,
        client=client,
    )


def outgoing_request(
    body: bytes = b"{}",
    *,
    event_id: str = "evt_123",
    timestamp: int = 1_700_000_000,
    headers: list[tuple[str, str]] | None = None,
    url: str = "http://127.0.0.1:9/hooks",
) -> OutgoingRequest:
    """A first attempt as the dispatcher builds it; by default with its webhook-id and -timestamp."""
    if headers is None:
        headers = [
            ("content-type", "application/json"),
            ("webhook-id", event_id),
            ("webhook-timestamp", str(timestamp)),
        ]
    return OutgoingRequest(
        method="POST",
        url=url,
        headers=headers,
        body=body,
        delivery_id="dlv_1",
        event_id=event_id,
        attempt=1,
        timestamp=timestamp,
    )


def as_ingress(request: OutgoingRequest) -> IngressRequest:
    """A signed outgoing request as hookgate's own ingress would receive it (source "s")."""
    return IngressRequest(
        source="s",
        method="POST",
        url="http://x/webhooks/s",
        path="/webhooks/s",
        query_string=b"",
        headers=[(k.lower(), v) for k, v in request.headers],
        body=request.body,
    )


def only_header(headers: Iterable[tuple[str, str]], name: str) -> str:
    """The value of a header that must be there exactly once (any case)."""
    values = [v for k, v in headers if k.lower() == name.lower()]
    assert len(values) == 1, f"{name}: {values}"
    return values[0]


# --- refusals -----------------------------------------------------------------------------------


def assert_rejection(
    result: Rejection | None, status: int, code: str, *words: str, never: Iterable[str] = ()
) -> None:
    """A Rejection with this status and code, a message holding `words` and none of `never`."""
    assert isinstance(result, Rejection), f"expected a {code} rejection, got {result!r}"
    assert (result.status, result.code) == (status, code), result
    assert result.message
    assert all(w.lower() in result.message.lower() for w in words), result.message
    for secret in never:
        assert secret not in result.message, f"{secret!r} shown in {result.message!r}"


def assert_forbidden(result: Rejection | None, *words: str) -> None:
    """An access rule's refusal: 403 forbidden, the message holding `words` (any case)."""
    assert_rejection(result, 403, "forbidden", *words)


def assert_http_error(response: Any, status: int, code: str) -> None:
    """An HTTP answer of the gateway refusing a request: `status`, with `code` as its error."""
    assert response.status_code == status, response.text
    assert response.json()["error"] == code, response.text


# --- through the gateway ------------------------------------------------------------------------


def sources_config(nats_url: str, receiver_url: str, sources: str, route: str = "{to: [internal]}") -> str:
    """`sources:` as given, routed (by `route`) to one endpoint `internal` at {receiver_url}/hooks."""
    return base_config(
        nats_url,
        nested("sources:\n", sources, 2)
        + f"endpoints:\n  internal:\n    url: {receiver_url}/hooks\nroutes:\n  - {route}\n",
    )


# --- Standard Webhooks oracles ------------------------------------------------------------------


def standard_webhooks_sdks_accept(secret: str, body: bytes, headers: dict[str, str]) -> bool:
    """The verdict of the standardwebhooks and svix SDKs, which must agree to be oracles at all."""
    verdicts = []
    for webhook in (standardwebhooks.webhooks.Webhook(secret), svix.webhooks.Webhook(secret)):
        try:
            webhook.verify(body, headers)
            verdicts.append(True)
        except standardwebhooks.webhooks.WebhookVerificationError:
            verdicts.append(False)
    assert verdicts[0] == verdicts[1], f"standardwebhooks and svix disagree: {verdicts}"
    return verdicts[0]
