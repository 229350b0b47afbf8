"""An example third-party hookgate plugin.

- `verify: {type: shared-token, header: X-Token, token: "${TOKEN}"}`: a verifier for senders that
  prove who they are with a fixed token in a header (no signature over the body).
- `hookgate_delivery_outcome`: counts delivery attempts by outcome ("succeeded", "retrying", ...).

Like every plugin, it imports only `hookgate.hookspecs`, `hookgate.types` and `hookgate.plugin_kit`
(the helpers hookgate offers plugin authors: here, constant-time comparison).
"""

from __future__ import annotations

from collections import Counter

import msgspec

from hookgate.hookspecs import hookimpl
from hookgate.plugin_kit import constant_time_equal
from hookgate.types import Attempt, ComponentRegistry, IngressRequest, Rejection

#: Delivery attempts seen by this process, by outcome.
OUTCOMES: Counter[str] = Counter()


class SharedTokenConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    header: str
    token: str

    def __post_init__(self) -> None:
        if not self.token:
            raise ValueError("token must not be empty")


class SharedTokenVerifier:
    default_event_type: str | None = None
    default_event_id: str | None = None

    def __init__(self, config: SharedTokenConfig):
        self.header = config.header
        self._token = config.token.encode()

    def verify(self, request: IngressRequest) -> Rejection | None:
        given = request.header(self.header)
        if given is None:
            return Rejection(status=401, code="missing_signature", message=f"missing {self.header} header")
        # Constant-time, so response timing does not reveal how much of the token was right.
        if not constant_time_equal(given.encode(), self._token):
            return Rejection(status=401, code="invalid_signature", message=f"{self.header} is not valid")
        return None


@hookimpl
def hookgate_register_components(registry: ComponentRegistry) -> None:
    registry.add_verifier("shared-token", SharedTokenConfig, SharedTokenVerifier)


@hookimpl
def hookgate_delivery_outcome(attempt: Attempt) -> None:
    OUTCOMES[attempt.outcome] += 1
