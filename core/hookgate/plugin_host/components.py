"""The core's own plugin: runs the components each source and endpoint picked in YAML.

Verifiers, access rules, handshakes and signers are contributed by plugins as named components;
this plugin calls the ones a source or endpoint configured, through the same hooks any other
plugin implements.
"""

from __future__ import annotations

from hookgate.hookspecs import hookimpl
from hookgate.types import (
    EndpointView,
    HandshakeResponse,
    IngressRequest,
    OutgoingRequest,
    Rejection,
    SourceView,
    VerifierHandshake,
)


class ConfiguredComponents:
    @hookimpl
    def hookgate_authenticate(self, request: IngressRequest, source: SourceView) -> Rejection | None:
        for rule in source.access_rules:
            rejection = rule.check(request)
            if rejection is not None:
                return rejection
        return None

    @hookimpl
    def hookgate_verify_signature(self, request: IngressRequest, source: SourceView) -> Rejection | None:
        if source.verifier is None:
            return None
        return source.verifier.verify(request)

    @hookimpl
    def hookgate_handshake(self, request: IngressRequest, source: SourceView) -> HandshakeResponse | None:
        if source.handshake is not None:
            answer = source.handshake.answer(request)
            if answer is not None:
                return answer
        if isinstance(source.verifier, VerifierHandshake) and request.method == "POST":
            answer = source.verifier.handshake(request)
            if isinstance(answer, HandshakeResponse):
                return answer
        return None

    @hookimpl
    def hookgate_sign(self, request: OutgoingRequest, endpoint: EndpointView) -> None:
        if endpoint.signer is not None:
            endpoint.signer.sign(request)
