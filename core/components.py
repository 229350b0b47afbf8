"""The core's own plugin: runs the components each source and endpoint picked in YAML.

Verifiers and signers are contributed by plugins as named components; this plugin calls the one a
source or endpoint configured, through the same hooks any other plugin implements.
"""

from __future__ import annotations

from hookgate.hookspecs import hookimpl
from hookgate.types import EndpointView, IngressRequest, OutgoingRequest, Rejection, SourceView


class ConfiguredComponents:
    @hookimpl
    def hookgate_verify_signature(self, request: IngressRequest, source: SourceView) -> Rejection | None:
        if source.verifier is None:
            return None
        return source.verifier.verify(request)

    @hookimpl
    def hookgate_sign(self, request: OutgoingRequest, endpoint: EndpointView) -> None:
        if endpoint.signer is not None:
            endpoint.signer.sign(request)
