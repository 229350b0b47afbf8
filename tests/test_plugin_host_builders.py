"""Components built against their protocols, and what they offer beyond them read through protocols."""

from __future__ import annotations

import msgspec
import pytest

from hookgate.hookspecs import hookimpl
from hookgate.plugin_host.builders import (
    build_access_rule,
    build_endpoint_auth,
    build_handshake,
    build_signer,
    build_transform,
    build_verifier,
    credential_headers,
    event_defaults,
    public_keys,
)
from hookgate.plugin_host.components import ConfiguredComponents
from hookgate.plugin_host.hooks import Hooks
from hookgate.types import (
    AccessRule,
    ComponentRegistry,
    EndpointAuth,
    Handshake,
    IngressRequest,
    Rejection,
    Signer,
    SourceView,
    Transform,
    Verifier,
)
from tests.plugin_support import ingress_request, load, nested

WHSK = "whsk_" + "A" * 43 + "="  # a 32-byte seed (all zero bits), base64


@pytest.fixture(scope="module")
def hooks() -> Hooks:
    return Hooks((Broken(),))


class NotAVerifier:
    def __init__(self, config: msgspec.Struct):
        self.config = config


class Options(msgspec.Struct, forbid_unknown_fields=True):
    pass


class Broken:
    @hookimpl
    def hookgate_register_components(self, registry: ComponentRegistry) -> None:
        registry.add_verifier("broken", Options, NotAVerifier)  # type: ignore[arg-type]


CONFIG = """
sources:
  gh:
    verify: {type: github, secret: s3cret}
    handshake: {type: meta, verify_token: t0ken}
    auth:
      - {type: api_key, header: X-Key, key: k3y}
      - {type: api_key, header: X-Key, key: k3y, forward_credential: true}
  plain:
    verify: {type: hmac, header: X-Sig, secret: s3cret}
endpoints:
  ep:
    url: https://example.com/in
    auth: {type: bearer, token: abc}
    signing: {scheme: standard-webhooks, private_key: "%s"}
  shared:
    url: https://example.com/in
    signing: {scheme: hmac, header: X-Sig, secret: s3cret}
routes:
  - to: [ep]
    transform: {type: shape, wrap: payload}
"""


def test_every_built_in_kind_builds_against_its_protocol(hooks: Hooks) -> None:
    loaded = load(hooks, CONFIG % WHSK)
    registry = hooks.registry
    assert isinstance(build_verifier(registry, loaded.verifiers["gh"]), Verifier)
    assert isinstance(build_handshake(registry, loaded.handshakes["gh"]), Handshake)
    assert all(isinstance(build_access_rule(registry, r), AccessRule) for r in loaded.access_rules["gh"])
    assert isinstance(build_signer(registry, loaded.signers["ep"]), Signer)
    assert isinstance(build_endpoint_auth(registry, loaded.endpoint_auth["ep"]), EndpointAuth)
    (transform,) = loaded.transforms.values()
    assert isinstance(build_transform(registry, transform), Transform)
    assert build_verifier(registry, None) is None
    assert build_signer(registry, None) is None


def test_what_components_offer_beyond_their_protocol(hooks: Hooks) -> None:
    loaded = load(hooks, CONFIG % WHSK)
    registry = hooks.registry
    assert event_defaults(build_verifier(registry, loaded.verifiers["gh"])) == (
        "header.X-GitHub-Event",
        "header.X-GitHub-Delivery",
    )
    assert event_defaults(None) == (None, None)
    consumed, forwarded = (build_access_rule(registry, r) for r in loaded.access_rules["gh"])
    assert credential_headers(consumed) == {"x-key"}
    assert credential_headers(forwarded) == frozenset()
    ed25519 = build_signer(registry, loaded.signers["ep"])
    shared = build_signer(registry, loaded.signers["shared"])
    assert ed25519 is not None and shared is not None
    assert [key.startswith("whpk_") for key in public_keys(ed25519)] == [True]
    assert public_keys(shared) == []


class OneHeaderRule:
    credential_headers = "X-Token"  # one name, without the tuple

    def check(self, request: IngressRequest) -> Rejection | None:
        return None


class PlainRule:
    def check(self, request: IngressRequest) -> Rejection | None:
        return None


def test_credential_headers_may_be_one_name_or_absent() -> None:
    assert credential_headers(OneHeaderRule()) == {"x-token"}  # type: ignore[arg-type]
    assert credential_headers(PlainRule()) == frozenset()


def test_a_component_without_its_protocol_is_refused_naming_the_plugin(hooks: Hooks) -> None:
    loaded = load(hooks, nested("sources:\n  acme:\n", "verify: {type: broken}\n", 4))
    with pytest.raises(TypeError) as info:
        build_verifier(hooks.registry, loaded.verifiers["acme"])
    message = str(info.value)
    assert "verifier 'broken'" in message and "NotAVerifier" in message and "verify(request)" in message


async def test_a_verifier_s_own_handshake_answers_only_verified_posts(hooks: Hooks) -> None:
    loaded = load(hooks, CONFIG % WHSK)
    verifier = build_verifier(hooks.registry, loaded.verifiers["gh"])
    source = SourceView(name="gh", verifier=verifier)
    core = ConfiguredComponents()
    ping = ingress_request("gh", headers={"X-GitHub-Event": "ping"})
    assert core.hookgate_handshake(ping, source) is not None
    get = ingress_request("gh", method="GET", headers={"X-GitHub-Event": "ping"})
    assert core.hookgate_handshake(get, source) is None
    without = SourceView(name="plain", verifier=build_verifier(hooks.registry, loaded.verifiers["plain"]))
    assert core.hookgate_handshake(ping, without) is None
