"""A small synchronous client of the management API (`/api/v1`), for the command line.

It finds the API from flags, the environment or the gateway's config file, sends the bearer token,
and turns every failure into an `ApiError` whose text tells the user what to do. The token is
never part of any message.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import httpx

from hookgate import __version__, config
from hookgate.cli import tables

DEFAULT_CONFIG = "hookgate.yaml"
URL_ENV = "HOOKGATE_URL"
TOKEN_ENV = "HOOKGATE_API_TOKEN"
CONFIG_ENV = "HOOKGATE_CONFIG"

Params = Mapping[str, str | int | None]


class ApiError(Exception):
    """A failure to show the user as is: no traceback, exit code 1."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True)
class Target:
    """Where the API is, and the token to show it."""

    url: str
    token: str = field(repr=False)  # kept out of reprs, so it cannot leak into a message


@dataclass(frozen=True)
class Reply:
    status: int
    body: Any
    what: str = ""  # the request, "POST /api/v1/events", for messages

    def object(self) -> dict[str, Any]:
        """The body, which must be a JSON object."""
        if not isinstance(self.body, dict):
            raise ApiError(f"{self.what}: the answer is not a JSON object; is --url the gateway?")
        return self.body


def check_page(what: str, body: Any) -> dict[str, Any]:
    """`body` if it is a page of rows, `{"data": [...], "next": ...}`; else an `ApiError`."""
    if not isinstance(body, dict) or not isinstance(body.get("data"), list):
        raise ApiError(f"{what}: the answer is not a list of rows; is --url the gateway?")
    return body


def resolve(
    url: str | None,
    token: str | None,
    config_path: str | None,
    env: Mapping[str, str] | None = None,
) -> Target:
    """The API's URL and token: each from its flag, else its variable, else the config file."""
    env = os.environ if env is None else env
    url = url or env.get(URL_ENV) or None
    token = token or env.get(TOKEN_ENV) or None
    if url is None or token is None:
        path = config_path or env.get(CONFIG_ENV) or DEFAULT_CONFIG
        server = _server_config(path, env, url is None, token is None)
        url = url or _url_from_listen(path, server)
        token = token or _token_from_config(path, server)
    return Target(_normalise_url(url), token)


def _server_config(
    path: str, env: Mapping[str, str], need_url: bool, need_token: bool
) -> config.ServerConfig:
    try:
        return config.load_server(path, env=dict(env))
    except config.ConfigError as exc:
        wanted = []
        if need_url:
            wanted.append(f"API URL (--url or ${URL_ENV})")
        if need_token:
            wanted.append(f"API token (--token or ${TOKEN_ENV})")
        problems = "\n".join(f"  {p}" for p in exc.problems)
        raise ApiError(
            f"no {' and no '.join(wanted)} was given, and the config file it is otherwise read from "
            f"could not be read (-c/--config or ${CONFIG_ENV}):\n{problems}"
        ) from None


def _url_from_listen(path: str, server: config.ServerConfig) -> str:
    host, _, port = server.listen.rpartition(":")
    if server.listen.startswith(("unix:", "fd://")) or not host or port == "0":
        raise ApiError(
            f"{path}: server.listen is {server.listen!r}, which does not say where to reach the API; "
            f"pass --url or set ${URL_ENV}"
        )
    # A wildcard address says where the gateway listens, not where to reach it.
    if host in ("0.0.0.0", "*"):
        host = "127.0.0.1"
    elif host in ("::", "[::]"):
        host = "[::1]"
    return f"{'https' if server.tls else 'http'}://{host}:{port}"


def _token_from_config(path: str, server: config.ServerConfig) -> str:
    tokens = [t for t in server.api_tokens if t]
    if not tokens:
        raise ApiError(f"no API token: pass --token or set ${TOKEN_ENV} ({path} has no server.api_tokens)")
    return tokens[0]


def _normalise_url(url: str) -> str:
    # "127.0.0.1:8080" is what people type; httpx would refuse it for lacking a scheme.
    if "://" not in url:
        url = f"http://{url}"
    return url.rstrip("/")


class ApiClient:
    """Synchronous calls to `/api/v1`; every failure is an `ApiError`.

    An https gateway's certificate is verified against `cacert` (a PEM file of CA certificates)
    when given, else against $SSL_CERT_FILE or $SSL_CERT_DIR when set, else certifi's CAs.
    """

    def __init__(self, target: Target, timeout: float = 30.0, cacert: str | None = None):
        self.target = target
        self.timeout = timeout
        verify: ssl.SSLContext | bool = True
        if cacert:
            try:
                verify = ssl.create_default_context(cafile=cacert)
            except (OSError, ssl.SSLError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                raise ApiError(f"--cacert: cannot use {cacert}: {reason}") from None
        self._http = httpx.Client(
            headers={
                "Authorization": f"Bearer {target.token}",
                "User-Agent": f"hookgate-cli/{__version__}",
            },
            timeout=timeout,
            verify=verify,
        )

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._http.close()

    def get(self, path: str, params: Params | None = None) -> Any:
        return self.request("GET", path, params=params).body

    def post(self, path: str, body: Any = None) -> Reply:
        return self.request("POST", path, body=body)

    def page(self, path: str, params: Params | None = None) -> dict[str, Any]:
        """One page of a list: a dict whose "data" is a list."""
        return check_page(f"GET /api/v1{path}", self.get(path, params))

    def pages(self, path: str, params: Params) -> Iterator[dict[str, Any]]:
        """Every page of a list, following `next` until it is null."""
        cursor = params.get("cursor")
        while True:
            page = self.page(path, {**params, "cursor": cursor})
            yield page
            cursor = page.get("next")
            if not cursor:
                return

    def request(self, method: str, path: str, *, params: Params | None = None, body: Any = None) -> Reply:
        what = f"{method} /api/v1{path}"
        query = {k: str(v) for k, v in (params or {}).items() if v is not None}
        try:
            response = self._http.request(method, f"{self.target.url}/api/v1{path}", params=query, json=body)
        except httpx.TimeoutException:
            raise ApiError(
                f"{what}: the API at {self.target.url} did not answer within {self.timeout:g}s"
            ) from None
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            reason = tables.one_line(str(exc)) or type(exc).__name__
            if "CERTIFICATE_VERIFY_FAILED" in reason:
                raise ApiError(
                    f"cannot verify the TLS certificate of the API at {self.target.url} ({reason}); "
                    "pass --cacert with the CA that signed it (or set SSL_CERT_FILE)"
                ) from None
            raise ApiError(
                f"cannot reach the API at {self.target.url} ({reason}); "
                f"is the gateway running there? Set --url or ${URL_ENV}"
            ) from None
        if response.status_code >= 400:
            raise _error(what, response)
        try:
            return Reply(response.status_code, response.json(), what)
        except ValueError:
            raise ApiError(
                f"{what}: {response.status_code} with a body that is not JSON; is {self.target.url} "
                "the gateway's API?"
            ) from None


def _error(what: str, response: httpx.Response) -> ApiError:
    status = response.status_code
    try:
        payload = response.json()
    except ValueError:
        payload = None
    code = payload.get("error") if isinstance(payload, dict) else None
    message = payload.get("message") if isinstance(payload, dict) else None
    if status == 401:
        hint = (
            f"the API wants a token: pass --token, set ${TOKEN_ENV}, or use a config with server.api_tokens"
        )
    elif status == 403:
        hint = (
            f"the gateway refused the API token; use one of its server.api_tokens (--token or ${TOKEN_ENV})"
        )
    elif message:
        hint = tables.one_line(str(message))
    else:
        hint = tables.one_line(response.text, 200) or response.reason_phrase
    label = f"{status} {code}" if code else f"{status} {response.reason_phrase}".rstrip()
    return ApiError(f"{what}: {label}: {hint}", status=status, code=code)
