"""`auth: {type: ...}` on an endpoint: how hookgate authenticates itself to the services it delivers to.

    endpoints:
      billing:
        url: https://billing.internal/webhooks
        auth: {type: bearer, token: "${BILLING_TOKEN}"}
      legacy:
        url: https://legacy.internal/hooks
        auth: {type: basic, username: hookgate, password: "${LEGACY_PASSWORD}"}
      partner:
        url: https://api.partner.example/webhooks
        auth:
          type: oauth2                                  # OAuth2 client credentials (RFC 6749, 4.4)
          token_url: https://auth.partner.example/oauth/token
          client_id: hookgate
          client_secret: "${PARTNER_CLIENT_SECRET}"
          scope: webhooks:write                         # optional; a string or a list
          audience: https://api.partner.example         # optional (Auth0 and the like)
          auth_method: client_secret_basic              # or client_secret_post
          timeout: 10s                                  # for one token request, at most 15s
      vault:
        url: https://vault.internal:8443/events
        auth:
          type: mtls
          cert_file: /etc/hookgate/client.pem           # PEM client certificate (and chain)
          key_file: /etc/hookgate/client.key            # PEM private key
          key_password: "${CLIENT_KEY_PASSWORD}"        # optional, for an encrypted key
          ca_file: /etc/hookgate/internal-ca.pem        # optional: trust only this CA for the server

`basic` and `bearer` set `Authorization` on every request (Basic credentials are UTF-8, RFC 7617).

`oauth2` fetches an access token from `token_url` on first use with the client credentials grant,
and caches it until `expires_in` minus a margin (10% of the lifetime, at most 30s); a token without
`expires_in` is kept until the endpoint refuses it. Concurrent deliveries share one token request.
When the endpoint answers 401 to a token, that token is dropped and the attempt is resent once at
once with a fresh one. When the token request fails (unreachable, not 200, not a usable token),
a warning is logged and the request goes out without credentials: the endpoint answers 401 and the
attempt fails and is retried on the endpoint's retry schedule like any other failure, with no
resend. After a failure no new token request is made for a second, and a cached token that is due
for refresh but not expired yet is still used. The token URL is called with plain httpx (honouring
the usual proxy environment variables), not through the egress SSRF guard or `egress.proxy`.

`mtls` presents a client certificate on every TLS connection to the endpoint. The files are read
and checked when the config loads. With `ca_file`, the server's certificate must be signed by that
CA (and only that CA is trusted); without it, the system's trusted CAs are used.

Secrets (passwords, tokens, client secrets, key passwords) are never logged, echoed in errors or
shown in a repr.
"""

from __future__ import annotations

import base64
import logging
import re
import ssl
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote_plus

import httpx
import msgspec
import trio

from hookgate.hookspecs import hookimpl
from hookgate.plugin_kit import Duration, seconds
from hookgate.types import ComponentRegistry, OutgoingRequest

log = logging.getLogger("hookgate.plugins.endpoint_auth")

#: After a failed token request, no new one is made for this long (seconds).
FAILURE_COOLDOWN = 1.0
#: The longest token request timeout: a delivery waits for its token, and the broker redelivers a
#: message whose attempt outlasts its ack wait (twice the endpoint timeout plus 30s).
MAX_TOKEN_TIMEOUT = 15.0
#: A token is refreshed this long before it expires: 10% of its lifetime, at most 30s.
MARGIN_FRACTION = 0.1
MAX_MARGIN = 30.0

# RFC 6750, 2.1 (b64token), loosened to any visible ASCII: what may follow "Bearer ".
_TOKEN = re.compile(r"[\x21-\x7e]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _at(path: str, message: str) -> ValueError:
    """A ValueError the config loader reports at `<auth path><path>` (msgspec's own suffix)."""
    return ValueError(f"{message} - at `${path}`")


def _drop_authorization(request: OutgoingRequest) -> None:
    request.headers = [(k, v) for k, v in request.headers if k.lower() != "authorization"]


# --- basic ------------------------------------------------------------------------------------


class EndpointBasicConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    username: str
    password: str

    def __post_init__(self) -> None:
        if not self.username:
            raise _at(".username", "must not be empty")
        if ":" in self.username:
            raise _at(".username", "must not contain ':' (Basic credentials are user:password)")
        if _CONTROL.search(self.username):
            raise _at(".username", "must not contain control characters (a stray newline?)")
        if _CONTROL.search(self.password):
            raise _at(".password", "must not contain control characters (a stray newline?)")

    def __repr__(self) -> str:
        return f"EndpointBasicConfig(username={self.username!r}, password=***)"


def basic_authorization(username: str, password: str) -> str:
    """The `Authorization` value for Basic credentials, UTF-8 encoded (RFC 7617)."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


class BasicAuth:
    def __init__(self, config: EndpointBasicConfig):
        self._value = basic_authorization(config.username, config.password)

    def apply(self, request: OutgoingRequest) -> None:
        request.set_header("Authorization", self._value)

    def unauthorized(self) -> bool:
        return False  # static credentials: sending them again changes nothing

    def ssl_context(self) -> ssl.SSLContext | None:
        return None

    def __repr__(self) -> str:
        return "BasicAuth(***)"


# --- bearer -----------------------------------------------------------------------------------


class EndpointBearerConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    token: str

    def __post_init__(self) -> None:
        if not self.token:
            raise _at(".token", "must not be empty")
        if not _TOKEN.fullmatch(self.token):
            raise _at(".token", "must be printable ASCII without spaces (a stray newline?)")

    def __repr__(self) -> str:
        return "EndpointBearerConfig(token=***)"


class BearerAuth:
    def __init__(self, config: EndpointBearerConfig):
        self._value = f"Bearer {config.token}"

    def apply(self, request: OutgoingRequest) -> None:
        request.set_header("Authorization", self._value)

    def unauthorized(self) -> bool:
        return False

    def ssl_context(self) -> ssl.SSLContext | None:
        return None

    def __repr__(self) -> str:
        return "BearerAuth(***)"


# --- oauth2 (client credentials) --------------------------------------------------------------


class EndpointOAuth2Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    token_url: str
    client_id: str
    client_secret: str
    scope: str | list[str] | None = None
    audience: str | None = None
    auth_method: Literal["client_secret_basic", "client_secret_post"] = "client_secret_basic"
    timeout: Duration = "10s"

    def __post_init__(self) -> None:
        try:
            url = httpx.URL(self.token_url)
        except httpx.InvalidURL:
            raise _at(".token_url", "expected an http(s) URL") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise _at(".token_url", "expected an http(s) URL such as https://auth.example/oauth/token")
        if not self.client_id:
            raise _at(".client_id", "must not be empty")
        if _CONTROL.search(self.client_id):
            raise _at(".client_id", "must not contain control characters (a stray newline?)")
        if not self.client_secret:
            raise _at(".client_secret", "must not be empty")
        if _CONTROL.search(self.client_secret):
            raise _at(".client_secret", "must not contain control characters (a stray newline?)")
        if isinstance(self.scope, list):
            if not self.scope:
                raise _at(".scope", "give at least one scope, or leave scope out")
            for i, scope in enumerate(self.scope):
                if not _TOKEN.fullmatch(scope):
                    raise _at(f".scope[{i}]", "a scope is one word of printable ASCII")
        elif self.scope is not None and not self.scope.strip():
            raise _at(".scope", "must not be empty (leave it out for none)")
        if self.audience is not None and not self.audience:
            raise _at(".audience", "must not be empty (leave it out for none)")
        timeout = seconds(self.timeout)
        if not 0 < timeout <= MAX_TOKEN_TIMEOUT:
            raise _at(
                ".timeout",
                f"must be more than 0 and at most {MAX_TOKEN_TIMEOUT:g}s (each delivery waits for its token)",
            )

    def __repr__(self) -> str:
        return (
            f"EndpointOAuth2Config(token_url={self.token_url!r}, client_id={self.client_id!r}, "
            f"client_secret=***, scope={self.scope!r}, audience={self.audience!r}, "
            f"auth_method={self.auth_method!r}, timeout={self.timeout!r})"
        )


def refresh_after(expires_in: float) -> float:
    """How long a token that expires in `expires_in` seconds is used before it is refreshed."""
    return max(0.0, expires_in - min(MAX_MARGIN, expires_in * MARGIN_FRACTION))


@dataclass(frozen=True, repr=False)
class Token:
    value: str
    refresh_at: float  # trio.current_time() after which a new token is fetched
    expires_at: float  # ... after which it is not used at all

    def __repr__(self) -> str:
        return f"Token(***, refresh_at={self.refresh_at}, expires_at={self.expires_at})"


class TokenError(Exception):
    """The token request failed; the message holds no secret."""


class OAuth2Auth:
    """A client-credentials token, fetched on first use, shared and refreshed before it expires."""

    def __init__(self, config: EndpointOAuth2Config):
        self.token_url = config.token_url
        self.client_id = config.client_id
        self._secret = config.client_secret
        self.timeout = seconds(config.timeout)
        self.auth_method = config.auth_method
        form = {"grant_type": "client_credentials"}
        if config.scope is not None:
            form["scope"] = config.scope if isinstance(config.scope, str) else " ".join(config.scope)
        if config.audience is not None:
            form["audience"] = config.audience
        headers = {"Accept": "application/json", "User-Agent": "hookgate"}
        if config.auth_method == "client_secret_post":
            form.update(client_id=config.client_id, client_secret=config.client_secret)
        else:
            # RFC 6749, 2.3.1: both are form-urlencoded before they become Basic credentials.
            credentials = f"{quote_plus(config.client_id)}:{quote_plus(config.client_secret)}"
            headers["Authorization"] = "Basic " + base64.b64encode(credentials.encode()).decode("ascii")
        self._form = form
        self._headers = headers
        self._verify: ssl.SSLContext | None = None  # built on the first request: loading CAs is slow
        self._lock = trio.Lock()
        self._token: Token | None = None
        self._fetches = 0  # token requests finished, for waiters to share the outcome of the last
        self._outcome: str | None = None  # what the last token request handed out
        self._failed_at: float | None = None
        # The token this task sent last; `unauthorized` runs in the same task as `apply`.
        self._sent: ContextVar[str | None] = ContextVar(f"hookgate_oauth2_sent_{id(self)}")

    def __repr__(self) -> str:
        return f"OAuth2Auth(token_url={self.token_url!r}, client_id={self.client_id!r})"

    async def apply(self, request: OutgoingRequest) -> None:
        token = await self.token()
        self._sent.set(token)
        if token is None:
            # No credentials rather than stale ones: the endpoint answers 401 and the attempt is
            # retried on schedule (raising here would make the message be redelivered at once).
            _drop_authorization(request)
        else:
            request.set_header("Authorization", f"Bearer {token}")

    def unauthorized(self) -> bool:
        try:
            sent = self._sent.get()
        except LookupError:  # not called after our apply in this task: drop whatever is cached
            self._token = None
            return True
        if sent is None:
            return False  # no token could be had: resending now would not help
        if self._token is not None and self._token.value == sent:
            self._token = None  # refused: fetch a new one (unless another delivery did already)
        return True

    def ssl_context(self) -> ssl.SSLContext | None:
        return None

    async def token(self) -> str | None:
        """A usable access token, or None (after logging why) when none can be had now."""
        cached = self._token
        if cached is not None and trio.current_time() < cached.refresh_at:
            return cached.value
        seen = self._fetches
        async with self._lock:
            if self._fetches != seen:
                return self._outcome  # a token request finished while we waited: share its outcome
            cached = self._token
            now = trio.current_time()
            if cached is not None and now < cached.refresh_at:
                return cached.value
            usable = cached.value if cached is not None and now < cached.expires_at else None
            if self._failed_at is not None and now - self._failed_at < FAILURE_COOLDOWN:
                return usable
            try:
                fresh = await self._fetch()
            except TokenError as exc:
                self._failed_at = trio.current_time()
                still = "; using the current token until it expires" if usable else ""
                log.warning(
                    "oauth2: no access token from %s for client %s: %s%s",
                    self.token_url,
                    self.client_id,
                    exc,
                    still,
                )
                self._outcome = usable
            else:
                self._failed_at = None
                self._token = fresh
                self._outcome = fresh.value
            self._fetches += 1
            return self._outcome

    async def _fetch(self) -> Token:
        if self._verify is None:  # httpx would build one per client, blocking the event loop
            self._verify = await trio.to_thread.run_sync(ssl.create_default_context)
        started = trio.current_time()
        with trio.move_on_after(self.timeout):
            try:
                async with httpx.AsyncClient(
                    timeout=self.timeout, verify=self._verify, follow_redirects=False
                ) as client:
                    response = await client.post(self.token_url, data=self._form, headers=self._headers)
            except httpx.TimeoutException:
                raise TokenError(f"no response within {self.timeout:g}s") from None
            except Exception as exc:  # httpx.HTTPError, or anything else on the way: never crash a delivery
                raise TokenError(self._redact(f"{type(exc).__name__}: {exc}")) from None
            return self._parse(response, started)
        raise TokenError(f"no response within {self.timeout:g}s")

    def _parse(self, response: httpx.Response, started: float) -> Token:
        try:
            body: Any = response.json()
        except ValueError:
            body = None
        if not response.is_success:
            detail = ""
            if isinstance(body, dict) and isinstance(body.get("error"), str):
                detail = f": {body['error']}"
                if isinstance(body.get("error_description"), str):
                    detail += f" ({body['error_description'][:200]})"
            raise TokenError(self._redact(f"HTTP {response.status_code}{detail}"))
        if not isinstance(body, dict):
            raise TokenError("the response is not a JSON object")
        value = body.get("access_token")
        if not isinstance(value, str) or not value:
            raise TokenError("the response has no access_token")
        if not _TOKEN.fullmatch(value):
            raise TokenError("the access_token holds spaces or characters a header cannot carry")
        token_type = body.get("token_type", "Bearer")
        if not isinstance(token_type, str) or token_type.lower() != "bearer":
            shown = token_type[:40] if isinstance(token_type, str) else type(token_type).__name__
            raise TokenError(f"the token_type is {shown!r}, not Bearer")
        expires_in = _number(body.get("expires_in"))
        if expires_in is None:
            return Token(value, refresh_at=float("inf"), expires_at=float("inf"))
        log.debug("oauth2: new access token for client %s, expires in %gs", self.client_id, expires_in)
        return Token(value, refresh_at=started + refresh_after(expires_in), expires_at=started + expires_in)

    def _redact(self, text: str) -> str:
        """Text the token server or an error echoed back, without our secret or control characters."""
        for secret in {self._secret, quote_plus(self._secret)}:
            text = text.replace(secret, "***")
        return _CONTROL.sub(" ", text)


def _number(value: object) -> float | None:
    """`expires_in` as seconds: a number, or a numeric string as some servers send; None if absent."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return max(0.0, float(value))
    if isinstance(value, str):
        try:
            return max(0.0, float(value))
        except ValueError:
            return None
    return None


# --- mtls -------------------------------------------------------------------------------------


class EndpointMtlsConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    cert_file: str
    key_file: str
    key_password: str | None = None
    ca_file: str | None = None

    def __post_init__(self) -> None:
        client_context(self)  # every problem with the files is a config error, with its path

    def __repr__(self) -> str:
        password = "***" if self.key_password is not None else "None"
        return (
            f"EndpointMtlsConfig(cert_file={self.cert_file!r}, key_file={self.key_file!r}, "
            f"key_password={password}, ca_file={self.ca_file!r})"
        )


class _KeyIsEncrypted(Exception):
    pass


def _no_password() -> str:
    # Without this, OpenSSL would prompt for the password on the terminal.
    raise _KeyIsEncrypted


def _readable(path: str, key: str) -> None:
    file = Path(path)
    try:
        with file.open("rb"):
            pass
    except FileNotFoundError:
        raise _at(f".{key}", f"no such file: {path}") from None
    except IsADirectoryError:
        raise _at(f".{key}", f"{path} is a directory, not a file") from None
    except OSError as exc:
        raise _at(f".{key}", f"cannot read {path}: {exc.strerror}") from None


def client_context(config: EndpointMtlsConfig) -> ssl.SSLContext:
    """The TLS context presenting the client certificate; ValueError (with its path) for any problem."""
    _readable(config.cert_file, "cert_file")
    _readable(config.key_file, "key_file")
    if config.ca_file is not None:
        _readable(config.ca_file, "ca_file")
    try:
        context = ssl.create_default_context(cafile=config.ca_file)
    except ssl.SSLError as exc:
        raise _at(".ca_file", f"{config.ca_file} holds no PEM CA certificate ({exc.reason})") from None
    password: Any = config.key_password if config.key_password is not None else _no_password
    try:
        context.load_cert_chain(config.cert_file, config.key_file, password=password)
    except _KeyIsEncrypted:
        raise _at(".key_file", f"{config.key_file} is encrypted: give key_password") from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise _at(".key_file", f"{config.key_file} is not the key of {config.cert_file}") from None
        raise _at(
            ".cert_file",
            f"cannot load {config.cert_file} with {config.key_file}: expected a PEM certificate and a PEM "
            "private key" + (" (or key_password is wrong)" if config.key_password is not None else ""),
        ) from None
    return context


class MtlsAuth:
    def __init__(self, config: EndpointMtlsConfig):
        self.cert_file = config.cert_file
        self._context = client_context(config)

    def apply(self, request: OutgoingRequest) -> None:
        return None  # the certificate is presented in the TLS handshake

    def unauthorized(self) -> bool:
        return False

    def ssl_context(self) -> ssl.SSLContext | None:
        return self._context

    def __repr__(self) -> str:
        return f"MtlsAuth(cert_file={self.cert_file!r})"


@hookimpl
def hookgate_register_components(registry: ComponentRegistry) -> None:
    registry.add_endpoint_auth("basic", EndpointBasicConfig, BasicAuth)
    registry.add_endpoint_auth("bearer", EndpointBearerConfig, BearerAuth)
    registry.add_endpoint_auth("oauth2", EndpointOAuth2Config, OAuth2Auth)
    registry.add_endpoint_auth("mtls", EndpointMtlsConfig, MtlsAuth)
