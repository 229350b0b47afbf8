"""One endpoint from the management API, checked as the loader checks a YAML one."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from hookgate.config.checks import check_endpoint
from hookgate.config.components import resolve_component
from hookgate.config.convert import Converter, drop_nulls
from hookgate.config.loaded import Component
from hookgate.config.problems import ConfigError, Problem, show
from hookgate.config.proxies import listed_proxy, proxy_address
from hookgate.config.schema import BrokerConfig, EgressConfig, EndpointConfig
from hookgate.config.source import Loader
from hookgate.types import ComponentKind, ComponentRegistry

EndpointT = TypeVar("EndpointT", bound=EndpointConfig)


@dataclass(frozen=True)
class CheckedEndpoint(Generic[EndpointT]):
    """An endpoint document that passed every check a YAML endpoint passes, with its components."""

    config: EndpointT
    signer: Component | None
    auth: Component | None


def load_endpoint(
    value: Any,
    type_: type[EndpointT],
    registry: ComponentRegistry,
    broker: BrokerConfig,
    egress: EgressConfig | None = None,
) -> CheckedEndpoint[EndpointT]:
    """Check one endpoint given as JSON (not YAML: no `${VAR}` expansion) like the loader checks a
    YAML one, so both report the same problems; paths start at the document (`$.signing.secret`).

    It comes from an API token holder, not the operator: its `proxy` must be one the config lists
    (`listed_proxy`), and its subject is held to `egress.allow_subjects`.

    Raises ConfigError with every problem found.
    """
    egress = egress if egress is not None else EgressConfig()
    file = "<request>"
    loader = Loader(file, {})
    if not isinstance(value, dict):
        raise ConfigError([Problem(file, None, "$", f"expected a JSON object, got {show(value)}")])
    value = json.loads(json.dumps(value))  # checking drops nulls in place; the caller's value stays
    retry = value.get("retry")
    if isinstance(retry, dict) and "schedule" in retry and "exponential" in retry:
        loader.problem("$.retry.exponential", "set either schedule or exponential, not both")
    conv = Converter(loader)
    drop_nulls(value, type_)
    endpoint = conv.convert(value, type_, "$")
    signer = auth = None
    if endpoint is not None:
        check_endpoint(loader.problem, "$", endpoint, broker, egress)
        if endpoint.proxy:
            try:
                listed = listed_proxy(endpoint.proxy, egress)
            except ValueError as exc:
                loader.problem("$.proxy", str(exc))
            else:
                if listed is None:
                    allowed = [*egress.proxies, *([egress.proxy] if egress.proxy else [])]
                    addresses = ", ".join(dict.fromkeys(proxy_address(p) for p in allowed)) or "none"
                    loader.problem(
                        "$.proxy",
                        "an endpoint created through the API may use only a proxy listed in the "
                        f"config's egress.proxies (listed: {addresses}), or none",
                    )
        if endpoint.signing is not None:
            signer = resolve_component(conv, registry, ComponentKind.SIGNER, "$.signing", endpoint.signing)
        if endpoint.auth is not None:
            auth = resolve_component(conv, registry, ComponentKind.ENDPOINT_AUTH, "$.auth", endpoint.auth)
    if loader.problems or endpoint is None:
        raise ConfigError(list(dict.fromkeys(loader.problems)))
    return CheckedEndpoint(endpoint, signer, auth)
