"""`verify: {type: twilio}`: Twilio's `X-Twilio-Signature` webhook signatures.

    sources:
      twilio:
        verify:
          type: twilio
          secret: "${TWILIO_AUTH_TOKEN}"
          public_url: https://hooks.example.com/webhooks/twilio   # optional, behind a proxy

What is checked, as Twilio's own `RequestValidator` checks it:

- `X-Twilio-Signature` is the base64 HMAC-SHA1, keyed with the auth token, of the full URL Twilio
  requested followed, for `application/x-www-form-urlencoded` bodies, by every POST parameter
  sorted by name, each name immediately followed by its value (a repeated name contributes each
  of its distinct values, sorted).
- JSON (and other non-form) bodies: the URL carries `bodySHA256=<hex>`, the signature covers the
  URL alone, and the SHA-256 of the raw body must equal `bodySHA256`. A non-empty body that is
  neither a form nor covered by `bodySHA256` is refused: the signature would not cover it.
- The URL is tried with and without its port, so `https://host:443/path` and `https://host/path`
  are the same to it (as to Twilio's validator, which strips any port, or adds 443/80 when none).
- With the `X-Twilio-Webhooks-Signature-Settings: key=...,algorithm=HMAC_SHA256` header, the HMAC
  is SHA-256 (keyed with that shared key, which then belongs in `secret`).
- `secret` may be a list while rotating: any one of them matching passes.

The URL is the one the request was addressed to (scheme, Host header, raw path and query). When
hookgate runs behind a proxy or TLS terminator, set `public_url` to the URL configured in Twilio
(scheme, host and path, no query): the request's query string is appended to it.

Refusals are 401 with code `missing_signature` or `invalid_signature`. Twilio signs no timestamp,
so there is no replay window to check.

Event id and type: Twilio posts forms (`MessageSid`, `CallSid`, ...), which the ingress `body.*`
selectors cannot read (they need JSON). Twilio sends an `I-Twilio-Idempotency-Token` header with
its webhooks, the same on each retry of one webhook, so that is the default event id
(`header.I-Twilio-Idempotency-Token`): retries are stored and routed once; a request without it
gets a fresh id. The header is not signed, which costs nothing here: whoever could replay a
signed request could already deliver it again. The event type has no default (events are of type
`webhook`); set `event_type:` to a literal such as `twilio.sms` per source if routes need one.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Callable
from typing import Annotated, Any
from urllib.parse import parse_qs, parse_qsl, urlparse

import msgspec

from hookgate.hookspecs import hookimpl
from hookgate.plugin_kit import constant_time_equal, matches_any, secret_keys
from hookgate.types import ComponentRegistry, IngressRequest, Rejection

HEADER = "X-Twilio-Signature"
SETTINGS_HEADER = "X-Twilio-Webhooks-Signature-Settings"
IDEMPOTENCY_HEADER = "I-Twilio-Idempotency-Token"
FORM = "application/x-www-form-urlencoded"
# A signature is 28 (SHA-1) or 44 (SHA-256) base64 characters; the settings header a few dozen.
MAX_HEADER_LENGTH = 1024

_ALGORITHMS: dict[str, Callable[..., Any]] = {"HMAC_SHA1": hashlib.sha1, "HMAC_SHA256": hashlib.sha256}

Secret = Annotated[str, msgspec.Meta(min_length=1, description="an auth token (or a webhook shared key)")]
PUBLIC_URL_PATTERN = r"^https?://[^/?#\s]+(/[^?#\s]*)?(?!\n)$"
PublicUrl = Annotated[
    str,
    msgspec.Meta(
        pattern=PUBLIC_URL_PATTERN,
        description="the URL configured in Twilio, without a query: http(s)://host[:port]/path",
    ),
]


class TwilioConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    secret: Secret | Annotated[list[Secret], msgspec.Meta(min_length=1)]
    public_url: PublicUrl | None = None


class TwilioVerifier:
    default_event_type: str | None = None
    default_event_id: str | None = f"header.{IDEMPOTENCY_HEADER}"

    def __init__(self, config: TwilioConfig):
        self._keys = secret_keys(config.secret)
        self.public_url = config.public_url

    def verify(self, request: IngressRequest) -> Rejection | None:
        given = (request.header(HEADER) or "").strip()
        if not given:
            return Rejection(status=401, code="missing_signature", message=f"missing {HEADER} header")
        if len(given) > MAX_HEADER_LENGTH or not given.isascii():
            return _invalid(f"{HEADER} is malformed")
        digest = _algorithm(request.header(SETTINGS_HEADER) or "")
        if digest is None:
            return _invalid(f"{SETTINGS_HEADER} names an unsupported algorithm")
        url = self._url(request)
        urls = _with_and_without_port(url)
        if urls is None:
            return _invalid("the request URL cannot be parsed")
        query = parse_qs(urlparse(url).query)
        params = ""
        if "bodySHA256" in query:
            body_hash = hashlib.sha256(request.body).hexdigest().encode("ascii")
            if not constant_time_equal(body_hash, query["bodySHA256"][0].encode("utf-8", "replace")):
                return _invalid("the body does not match bodySHA256")
        elif _media_type(request.header("content-type")) == FORM:
            form = _form_params(request.body)
            if form is None:
                return _invalid("the form body is not UTF-8")
            params = form
        elif request.body:
            return _invalid("the body is neither a form nor covered by bodySHA256")
        expected = (
            base64.b64encode(hmac.new(key, (candidate + params).encode(), digest).digest()).decode("ascii")
            for key in self._keys
            for candidate in urls
        )
        return None if matches_any(expected, [given]) else _invalid("signature does not match")

    def _url(self, request: IngressRequest) -> str:
        if self.public_url is None:
            return request.url
        query = request.query_string.decode("latin-1")
        return f"{self.public_url}?{query}" if query else self.public_url


def _algorithm(settings: str) -> Callable[..., Any] | None:
    """The hash named by the signature settings header; SHA-1 (the auth-token scheme) without one."""
    if len(settings) > MAX_HEADER_LENGTH:
        return None
    for part in settings.split(","):
        name, sep, value = part.partition("=")
        if sep and name.strip() == "algorithm" and value.strip():
            return _ALGORITHMS.get(value.strip().upper())
    return hashlib.sha1


def _with_and_without_port(url: str) -> tuple[str, ...] | None:
    """The URL without its port and with it (443 or 80 added when absent), as Twilio tries them."""
    try:
        parsed = urlparse(url)
        port = parsed.port
    except ValueError:  # a bad IPv6 literal or port in the Host header
        return None
    netloc = parsed.netloc
    if port is None:
        without = parsed.geturl()
        default = 443 if parsed.scheme == "https" else 80
        with_port = parsed._replace(netloc=f"{netloc}:{default}").geturl()
    else:
        with_port = parsed.geturl()
        without = parsed._replace(netloc=netloc[: netloc.rindex(":")]).geturl()
    return (without, with_port)


def _media_type(content_type: str | None) -> str:
    return (content_type or "").partition(";")[0].strip().lower()


def _form_params(body: bytes) -> str | None:
    """The signed form parameters: sorted names, each followed by its distinct values, sorted."""
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        return None
    values: dict[str, set[str]] = {}
    for name, value in pairs:
        values.setdefault(name, set()).add(value)
    return "".join(name + value for name in sorted(values) for value in sorted(values[name]))


def _invalid(message: str) -> Rejection:
    return Rejection(status=401, code="invalid_signature", message=message)


@hookimpl
def hookgate_register_components(registry: ComponentRegistry) -> None:
    registry.add_verifier("twilio", TwilioConfig, TwilioVerifier)
