"""Plugin components built from the config, each checked against its protocol in `hookgate.types`.

The config resolved every `type:` against the registry; here the plugin's factory builds the
component, and one that lacks its protocol's methods is refused when the gateway starts, naming
the plugin, rather than failing on the first request. What a component may offer beyond its
protocol is read through the small protocols of `hookgate.types`, never by probing attributes.
"""

from __future__ import annotations

from hookgate.config import Component
from hookgate.types import (
    AccessRule,
    ComponentRegistry,
    ComponentType,
    CredentialHeaders,
    EndpointAuth,
    EventDefaults,
    Handshake,
    PublicKeys,
    Signer,
    Transform,
    Verifier,
)


def build_verifier(registry: ComponentRegistry, component: Component | None) -> Verifier | None:
    built = _build(registry, component)
    if built is None or isinstance(built, Verifier):
        return built
    raise _not_a(registry, component, built, "verify(request)")


def build_signer(registry: ComponentRegistry, component: Component | None) -> Signer | None:
    built = _build(registry, component)
    if built is None or isinstance(built, Signer):
        return built
    raise _not_a(registry, component, built, "sign(request)")


def build_access_rule(registry: ComponentRegistry, component: Component) -> AccessRule:
    built = _build(registry, component)
    if isinstance(built, AccessRule):
        return built
    raise _not_a(registry, component, built, "check(request)")


def build_handshake(registry: ComponentRegistry, component: Component | None) -> Handshake | None:
    built = _build(registry, component)
    if built is None or isinstance(built, Handshake):
        return built
    raise _not_a(registry, component, built, "answer(request)")


def build_endpoint_auth(registry: ComponentRegistry, component: Component | None) -> EndpointAuth | None:
    built = _build(registry, component)
    if built is None or isinstance(built, EndpointAuth):
        return built
    raise _not_a(registry, component, built, "apply(request), unauthorized() and ssl_context()")


def build_transform(registry: ComponentRegistry, component: Component) -> Transform:
    built = _build(registry, component)
    if isinstance(built, Transform):
        return built
    raise _not_a(registry, component, built, "transform(event)")


def event_defaults(verifier: Verifier | None) -> tuple[str | None, str | None]:
    """Where the verifier reads the event type and id by default; (None, None) if it does not say."""
    if isinstance(verifier, EventDefaults):
        return verifier.default_event_type, verifier.default_event_id
    return None, None


def credential_headers(rule: AccessRule) -> frozenset[str]:
    """The lower-case names of the headers an access rule says it consumed (`credential_headers`)."""
    if not isinstance(rule, CredentialHeaders):
        return frozenset()
    names: tuple[str, ...] | str = rule.credential_headers or ()
    if isinstance(names, str):  # one name, written without the tuple
        names = (names,)
    return frozenset(name.lower() for name in names)


def public_keys(signer: Signer) -> list[str]:
    """The public keys receivers verify the signer's signatures with; none for a shared secret."""
    return list(signer.public_keys()) if isinstance(signer, PublicKeys) else []


def _build(registry: ComponentRegistry, component: Component | None) -> object:
    if component is None:
        return None
    built: object = _type_of(registry, component).factory(component.config)
    return built


def _type_of(registry: ComponentRegistry, component: Component) -> ComponentType:
    ctype = registry.get(component.kind, component.type)
    assert ctype is not None, "checking resolved every component"
    return ctype


def _not_a(registry: ComponentRegistry, component: Component | None, built: object, needs: str) -> TypeError:
    assert component is not None  # only a built component can lack its methods
    plugin = _type_of(registry, component).plugin or "?"
    return TypeError(
        f"plugin {plugin!r}: {component.kind} {component.type!r} built a {type(built).__name__}, "
        f"which lacks {needs}"
    )
