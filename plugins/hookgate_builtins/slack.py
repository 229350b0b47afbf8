"""`verify: {type: slack}`: Slack request signatures, and Slack's `url_verification` challenge.

    sources:
      slack:
        verify: {type: slack, secret: "${SLACK_SIGNING_SECRET}", tolerance: 5m}
        # secret may be a list while rotating; tolerance defaults to 5m

What is checked, on the raw body bytes (JSON, form-encoded or anything else alike):

- `X-Slack-Signature: v0=<64 hex digits>` must be the HMAC-SHA256 of `v0:{timestamp}:{body}` under
  one of the signing secrets, with `timestamp` the `X-Slack-Request-Timestamp` header (unix
  seconds), compared in constant time.
- Then the timestamp must be within `tolerance` of now, either way; otherwise the refusal is
  `timestamp_out_of_tolerance` (checked after the signature, so that code means "signed by Slack,
  but stale or from the future": a replay, or a skewed clock).
- After the signature verified, a `url_verification` request (`{"type": "url_verification",
  "challenge": "..."}`) is answered 200 `{"challenge": "..."}` and not stored.

Event type and id defaults, for the Events API (`event_callback` payloads):

- type `body.event.type` (e.g. `message`, `app_mention`): the inner event's type is what routes
  want to match, while the outer `body.type` is `event_callback` for nearly every request. A JSON
  payload without an inner event (e.g. `app_rate_limited`) falls back to the core's default type
  `webhook`.
- id `body.event_id`: Slack keeps it when it retries (`X-Slack-Retry-Num`), so a retry is stored
  once.

Slash commands and interactivity payloads are form-encoded, and the core answers 400 when a `body.`
selector meets a body that is not JSON. Point those Slack request URLs at a separate source whose
selectors do not read the body, for example:

    slack-interactive:
      verify: {type: slack, secret: "${SLACK_SIGNING_SECRET}"}
      event_type: slack.interactive        # a literal
      event_id: header.X-Slack-Signature   # unique per signed request: drops exact replays only
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Callable

import msgspec

from hookgate.hookspecs import hookimpl
from hookgate.plugin_kit import Duration, check_secrets, matches_any, seconds, secret_keys
from hookgate.types import ComponentRegistry, HandshakeResponse, IngressRequest, Rejection

SIGNATURE_HEADER = "X-Slack-Signature"
TIMESTAMP_HEADER = "X-Slack-Request-Timestamp"
_SIGNATURE = re.compile(r"v0=([0-9a-fA-F]{64})")
_TIMESTAMP = re.compile(r"[0-9]{1,15}")  # ASCII digits only (int() would take any Unicode digit)


class SlackConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    secret: str | list[str]
    tolerance: Duration = "5m"

    def __post_init__(self) -> None:
        check_secrets(self.secret)
        if seconds(self.tolerance) <= 0:
            raise ValueError("tolerance must be more than 0")


class SlackVerifier:
    default_event_type: str | None = "body.event.type"
    default_event_id: str | None = "body.event_id"

    def __init__(self, config: SlackConfig, *, now: Callable[[], float] = time.time):
        self._keys = secret_keys(config.secret)
        self.tolerance = seconds(config.tolerance)
        self.now = now

    def verify(self, request: IngressRequest) -> Rejection | None:
        signature = request.header(SIGNATURE_HEADER)
        timestamp = request.header(TIMESTAMP_HEADER)
        if not signature or not timestamp:
            missing = SIGNATURE_HEADER if not signature else TIMESTAMP_HEADER
            return Rejection(status=401, code="missing_signature", message=f"missing {missing}")
        match = _SIGNATURE.fullmatch(signature)
        if match is None:
            return _invalid(f"{SIGNATURE_HEADER} is not 'v0=' and a hex SHA-256 digest")
        if not _TIMESTAMP.fullmatch(timestamp):
            return _invalid(f"{TIMESTAMP_HEADER} is not a unix timestamp")
        given = bytes.fromhex(match.group(1))
        content = b"v0:" + timestamp.encode() + b":" + request.body
        expected = (hmac.new(key, content, hashlib.sha256).digest() for key in self._keys)
        if not matches_any(expected, [given]):
            return _invalid("signature does not match")
        skew = self.now() - int(timestamp)
        if abs(skew) > self.tolerance:
            when = "old" if skew > 0 else "in the future"
            message = (
                f"{TIMESTAMP_HEADER} is {abs(skew):.0f}s {when}, beyond the {self.tolerance:g}s tolerance"
            )
            return Rejection(status=401, code="timestamp_out_of_tolerance", message=message)
        return None

    def handshake(self, request: IngressRequest) -> HandshakeResponse | None:
        """Answer `url_verification` with its challenge (called only after the signature verified)."""
        if b"url_verification" not in request.body:
            return None  # the cheap test first: this runs for every verified request
        try:
            payload = msgspec.json.decode(request.body)
        # msgspec.DecodeError, UnicodeDecodeError (invalid UTF-8 in a string), or nesting too deep.
        except (ValueError, RecursionError):
            return None
        if not isinstance(payload, dict) or payload.get("type") != "url_verification":
            return None
        challenge = payload.get("challenge")
        if not isinstance(challenge, str):
            return None
        return HandshakeResponse(
            status=200, body=msgspec.json.encode({"challenge": challenge}), content_type="application/json"
        )


def _invalid(message: str) -> Rejection:
    return Rejection(status=401, code="invalid_signature", message=message)


@hookimpl
def hookgate_register_components(registry: ComponentRegistry) -> None:
    registry.add_verifier("slack", SlackConfig, SlackVerifier)
