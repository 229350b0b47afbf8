"""Endpoint auth (`auth:` on an endpoint): basic, bearer, OAuth2 client credentials and mTLS.

Everything on the wire is real: a token server (trio + h11) and HTTPS servers requiring client
certificates run on loopback, certificates are made here with `cryptography`, and the gateway
delivers through a real nats-server. The plugin module is registered explicitly, so these tests
do not depend on its entry point.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import functools
import importlib.metadata
import ipaddress
import json
import logging
import ssl
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote_plus

import h11
import httpx
import msgspec
import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hookgate import hookspecs
from hookgate.config import ConfigError, json_schema
from hookgate.plugin_host.hooks import Hooks
from hookgate.types import ComponentKind, OutgoingRequest
from hookgate_builtins import endpoint_auth
from tests.plugin_support import (
    AUTH_ENDPOINT,
    assert_problem,
    load_auth,
    load_error,
    nested,
    outgoing_request,
)
from tests.support import (
    Gateway,
    NatsServer,
    Received,
    attempt_records,
    base_config,
    receiver,
    run_gateway,
)

PLUGINS = (endpoint_auth,)


def _loaded_by_entry_point() -> bool:
    return any(
        ep.value == endpoint_auth.__name__ for ep in importlib.metadata.entry_points(group=hookspecs.PROJECT)
    )


# For the gateway (which also loads the entry points): registering the module twice is an error, so
# it is passed explicitly only until pyproject lists it.
GATEWAY_PLUGINS: tuple[object, ...] = () if _loaded_by_entry_point() else PLUGINS
SECRET = "s3cr:t/+ ä&="  # needs form-urlencoding inside Basic credentials (RFC 6749, 2.3.1)


@pytest.fixture(scope="module")
def hooks() -> Hooks:
    return Hooks(PLUGINS, load_entry_points=False)


def make_auth(hooks: Hooks, **options: Any) -> Any:
    return load_auth(hooks, options)


def outgoing(headers: list[tuple[str, str]] | None = None) -> OutgoingRequest:
    headers = headers if headers is not None else [("content-type", "application/json")]
    return outgoing_request(
        b"{}", url="https://example.com/in", headers=headers, event_id="evt_1", timestamp=0
    )


def authorization(request: OutgoingRequest) -> list[str]:
    return [v for k, v in request.headers if k.lower() == "authorization"]


# --- basic and bearer: headers --------------------------------------------------------------


def test_the_four_types_are_registered(hooks: Hooks) -> None:
    assert hooks.registry.names(ComponentKind.ENDPOINT_AUTH) == ["basic", "bearer", "mtls", "oauth2"]


def test_basic_sends_utf8_credentials(hooks: Hooks) -> None:
    auth = make_auth(hooks, type="basic", username="hookgate", password="pä:ss word")
    request = outgoing([("Authorization", "Bearer from-endpoint-headers"), ("x-other", "1")])
    assert auth.apply(request) is None
    (value,) = authorization(request)  # replaces any Authorization already there
    assert value == "Basic " + base64.b64encode("hookgate:pä:ss word".encode()).decode()
    # The same as httpx builds for these credentials.
    flow = httpx.BasicAuth("hookgate", "pä:ss word").auth_flow(httpx.Request("POST", "https://x/"))
    assert value == next(flow).headers["authorization"]
    assert ("x-other", "1") in request.headers
    assert auth.unauthorized() is False
    assert auth.ssl_context() is None


def test_basic_allows_an_empty_password(hooks: Hooks) -> None:
    # API keys sent as the username with no password (Stripe's style) are common.
    auth = make_auth(hooks, type="basic", username="sk_test_123", password="")
    request = outgoing()
    auth.apply(request)
    assert authorization(request) == ["Basic " + base64.b64encode(b"sk_test_123:").decode()]


def test_bearer_sends_the_token(hooks: Hooks) -> None:
    auth = make_auth(hooks, type="bearer", token="abc.DEF-123_~+/=")
    request = outgoing()
    auth.apply(request)
    assert authorization(request) == ["Bearer abc.DEF-123_~+/="]
    assert auth.unauthorized() is False
    assert auth.ssl_context() is None


def test_reprs_hide_secrets(hooks: Hooks) -> None:
    configs = [
        endpoint_auth.EndpointBasicConfig(username="u", password="hunter2-secret"),
        endpoint_auth.EndpointBearerConfig(token="hunter2-secret"),
        endpoint_auth.EndpointOAuth2Config(
            token_url="https://a/t", client_id="c", client_secret="hunter2-secret"
        ),
    ]
    for config in configs:
        assert "hunter2-secret" not in repr(config)
    auths = [
        make_auth(hooks, type="basic", username="u", password="hunter2-secret"),
        make_auth(hooks, type="bearer", token="hunter2-secret"),
        make_auth(
            hooks, type="oauth2", token_url="https://a/t", client_id="c", client_secret="hunter2-secret"
        ),
    ]
    for auth in auths:
        assert "hunter2-secret" not in repr(auth)


def test_refresh_margin_is_ten_percent_at_most_30s() -> None:
    assert endpoint_auth.refresh_after(3600) == 3570
    assert endpoint_auth.refresh_after(300) == 270
    assert endpoint_auth.refresh_after(60) == 54
    assert endpoint_auth.refresh_after(0) == 0


# --- config errors --------------------------------------------------------------------------


def config_error(hooks: Hooks, auth: str, env: dict[str, str] | None = None) -> ConfigError:
    return load_error(hooks, nested(AUTH_ENDPOINT + "    auth:\n", auth, 6), env)


@pytest.mark.parametrize(
    ("auth", "where", "message"),
    [
        ("type: basic\npassword: p\n", "x.yaml:4: $.endpoints.ep.auth", 'missing required key "username"'),
        ("type: basic\nusername: ''\npassword: p\n", "x.yaml:6: $.endpoints.ep.auth.username", "empty"),
        ("type: basic\nusername: 'a:b'\npassword: p\n", "x.yaml:6: $.endpoints.ep.auth.username", "':'"),
        (
            "type: basic\nusername: u\npasword: p\n",
            "x.yaml:7: $.endpoints.ep.auth.pasword",
            'did you mean "password"',
        ),
        ("type: bearer\n", "x.yaml:4: $.endpoints.ep.auth", 'missing required key "token"'),
        ("type: bearer\ntoken: ''\n", "x.yaml:6: $.endpoints.ep.auth.token", "must not be empty"),
        ("type: bearer\ntoken: 'two words'\n", "x.yaml:6: $.endpoints.ep.auth.token", "without spaces"),
        ("type: kerberos\n", "x.yaml:5: $.endpoints.ep.auth.type", "unknown endpoint auth"),
        (
            "type: oauth2\ntoken_url: ftp://a/t\nclient_id: c\nclient_secret: s\n",
            "x.yaml:6: $.endpoints.ep.auth.token_url",
            "http(s) URL",
        ),
        (
            "type: oauth2\ntoken_url: https://a/t\nclient_secret: s\n",
            "x.yaml:4: $.endpoints.ep.auth",
            'missing required key "client_id"',
        ),
        (
            "type: oauth2\ntoken_url: https://a/t\nclient_id: c\nclient_secret: s\nauth_method: jwt\n",
            "x.yaml:9: $.endpoints.ep.auth.auth_method",
            '"client_secret_basic", "client_secret_post"',
        ),
        (
            "type: oauth2\ntoken_url: https://a/t\nclient_id: c\nclient_secret: s\ntimeout: 10 seconds\n",
            "x.yaml:9: $.endpoints.ep.auth.timeout",
            "duration",
        ),
        (
            "type: oauth2\ntoken_url: https://a/t\nclient_id: c\nclient_secret: s\ntimeout: 1m\n",
            "x.yaml:9: $.endpoints.ep.auth.timeout",
            "at most 15s",
        ),
        (
            "type: oauth2\ntoken_url: https://a/t\nclient_id: c\nclient_secret: s\nscope: []\n",
            "x.yaml:9: $.endpoints.ep.auth.scope",
            "at least one scope",
        ),
        (
            "type: oauth2\ntoken_url: https://a/t\nclient_id: c\nclient_secret: s\nscope: [a, 'b c']\n",
            "x.yaml:9: $.endpoints.ep.auth.scope[1]",
            "one word",
        ),
    ],
)
def test_config_errors_name_the_line_and_path(hooks: Hooks, auth: str, where: str, message: str) -> None:
    assert_problem(config_error(hooks, auth), where, message, ignore_case=False)


def test_a_secret_with_a_stray_newline_is_refused_without_echoing_it(hooks: Hooks) -> None:
    env = {"TOKEN": "hunter2-token\n", "PASSWORD": "hunter2-pass\r\n", "CLIENT_SECRET": "hunter2-cs\n"}
    for auth, where in [
        ('type: bearer\ntoken: "${TOKEN}"\n', "$.endpoints.ep.auth.token"),
        ('type: basic\nusername: u\npassword: "${PASSWORD}"\n', "$.endpoints.ep.auth.password"),
        (
            'type: oauth2\ntoken_url: https://a/t\nclient_id: c\nclient_secret: "${CLIENT_SECRET}"\n',
            "$.endpoints.ep.auth.client_secret",
        ),
    ]:
        error = str(config_error(hooks, auth, env))
        assert where in error, error
        assert "hunter2" not in error, error


def test_the_json_schema_offers_the_four_types(hooks: Hooks) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(json_schema(hooks.registry))

    def endpoint(auth: dict[str, Any]) -> dict[str, Any]:
        return {"endpoints": {"ep": {"url": "https://example.com/in", "auth": auth}}}

    good: list[dict[str, Any]] = [
        {"type": "basic", "username": "u", "password": "p"},
        {"type": "bearer", "token": "t"},
        {
            "type": "oauth2",
            "token_url": "https://a/t",
            "client_id": "c",
            "client_secret": "s",
            "scope": ["a"],
        },
        {"type": "mtls", "cert_file": "c.pem", "key_file": "k.pem", "ca_file": "ca.pem"},
    ]
    for auth in good:
        assert list(validator.iter_errors(endpoint(auth))) == [], auth
    bad: list[dict[str, Any]] = [
        {"type": "bearer"},
        {"type": "basic", "username": "u", "password": "p", "realm": "x"},
        {
            "type": "oauth2",
            "token_url": "https://a/t",
            "client_id": "c",
            "client_secret": "s",
            "timeout": "1 s",
        },
        {
            "type": "oauth2",
            "token_url": "https://a/t",
            "client_id": "c",
            "client_secret": "s",
            "auth_method": "x",
        },
        {"type": "mtls", "cert_file": "c.pem"},
    ]
    for auth in bad:
        assert list(validator.iter_errors(endpoint(auth))), auth


# --- OAuth2: a real token server on loopback ------------------------------------------------


@dataclass
class HttpRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    peer_cert: dict[str, Any] | None = None

    def form(self) -> dict[str, str]:
        return {k: v[0] for k, v in parse_qs(self.body.decode(), keep_blank_values=True).items()}


Handler = Callable[[HttpRequest], Awaitable[tuple[int, Any]]]


@dataclass
class Server:
    port: int = 0
    requests: list[HttpRequest] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)


async def _serve_connection(handler: Handler, server: Server, stream: trio.abc.Stream) -> None:
    conn = h11.Connection(h11.SERVER)
    try:
        peer_cert = None
        if isinstance(stream, trio.SSLStream):
            await stream.do_handshake()
            peer_cert = stream.getpeercert()
        while True:
            request: h11.Request | None = None
            body = bytearray()
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    conn.receive_data(bytes(data))
                    continue
                if isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    return
            assert request is not None
            received = HttpRequest(
                request.method.decode(),
                request.target.decode(),
                {k.decode().lower(): v.decode() for k, v in request.headers},
                bytes(body),
                peer_cert,
            )
            server.requests.append(received)
            status, payload = await handler(received)
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            headers = [("content-type", "application/json"), ("content-length", str(len(data)))]
            await stream.send_all(
                conn.send(h11.Response(status_code=status, headers=headers))
                + conn.send(h11.Data(data=data))
                + conn.send(h11.EndOfMessage())
            )
            if conn.our_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError) as exc:
        server.errors.append(exc)  # e.g. a TLS client without a certificate


@contextlib.asynccontextmanager
async def serve(
    handler: Handler, port: int = 0, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[Server]:
    """An HTTP(S) server on 127.0.0.1 answering with `handler`; stopped when the block ends."""
    server = Server()
    handle = functools.partial(_serve_connection, handler, server)
    async with trio.open_nursery() as nursery:
        if ssl_context is None:
            listeners = await nursery.start(functools.partial(trio.serve_tcp, handle, port, host="127.0.0.1"))
        else:
            listeners = await nursery.start(
                functools.partial(trio.serve_ssl_over_tcp, handle, port, ssl_context, host="127.0.0.1")
            )
        listener = listeners[0].transport_listener if ssl_context is not None else listeners[0]
        server.port = listener.socket.getsockname()[1]
        yield server
        nursery.cancel_scope.cancel()


@dataclass
class TokenIssuer:
    """Issues tok-1, tok-2, ... to the right client credentials; records what each request carried."""

    client_id: str = "hookgate"
    client_secret: str = SECRET
    expires_in: Any = 3600
    status: int = 200
    release: trio.Event | None = None  # if set: hold each answer until it is set
    arrived: trio.Event = field(default_factory=trio.Event)  # set by the first request
    issued: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    received_secret: str = ""

    async def __call__(self, request: HttpRequest) -> tuple[int, Any]:
        self.arrived.set()
        if self.release is not None:
            await self.release.wait()
        problem = self.problem(request)
        if problem:
            self.refused.append(problem)
            # A careless server that echoes what it got: the gateway must not log it.
            echoed = f"bad {problem}: client_secret {self.received_secret}\nline two"
            return 401, {"error": "invalid_client", "error_description": echoed}
        if self.status != 200:
            return self.status, {"error": "temporarily_unavailable"}
        token = f"tok-{len(self.issued) + 1}"
        self.issued.append(token)
        answer: dict[str, Any] = {"access_token": token, "token_type": "bearer"}
        if self.expires_in is not None:
            answer["expires_in"] = self.expires_in
        return 200, answer

    def problem(self, request: HttpRequest) -> str | None:
        if request.method != "POST" or request.path != "/oauth/token":
            return "request line"
        if request.headers.get("content-type") != "application/x-www-form-urlencoded":
            return "content type"
        form = request.form()
        if form.get("grant_type") != "client_credentials":
            return "grant_type"
        header = request.headers.get("authorization")
        if header is not None:
            scheme, _, encoded = header.partition(" ")
            user, _, password = base64.b64decode(encoded).decode().partition(":")
            credentials = (unquote_plus(user), unquote_plus(password))
            if scheme != "Basic" or "client_secret" in form:
                return "client authentication"
        else:
            credentials = (form.get("client_id", ""), form.get("client_secret", ""))
        self.received_secret = credentials[1]
        if credentials != (self.client_id, self.client_secret):
            return "credentials"
        return None


def oauth2_options(port: int, **extra: Any) -> dict[str, Any]:
    return {
        "type": "oauth2",
        "token_url": f"http://127.0.0.1:{port}/oauth/token",
        "client_id": "hookgate",
        "client_secret": SECRET,
        **extra,
    }


async def test_oauth2_client_secret_basic_sends_the_form_and_caches_the_token(hooks: Hooks) -> None:
    issuer = TokenIssuer()
    with trio.fail_after(10):
        async with serve(issuer) as server:
            auth = make_auth(hooks, **oauth2_options(server.port, scope=["read", "write"], audience="api"))
            first, second = outgoing(), outgoing()
            await auth.apply(first)
            await auth.apply(second)
    assert authorization(first) == authorization(second) == ["Bearer tok-1"]
    assert issuer.refused == []
    (request,) = server.requests
    assert request.form() == {"grant_type": "client_credentials", "scope": "read write", "audience": "api"}
    assert request.headers["accept"] == "application/json"


async def test_oauth2_client_secret_post_sends_the_credentials_in_the_form(hooks: Hooks) -> None:
    issuer = TokenIssuer()
    with trio.fail_after(10):
        async with serve(issuer) as server:
            auth = make_auth(hooks, **oauth2_options(server.port, auth_method="client_secret_post"))
            request = outgoing()
            await auth.apply(request)
    assert authorization(request) == ["Bearer tok-1"]
    assert issuer.refused == []
    (sent,) = server.requests
    assert "authorization" not in sent.headers
    assert sent.form() == {
        "grant_type": "client_credentials",
        "client_id": "hookgate",
        "client_secret": SECRET,
    }


async def test_oauth2_concurrent_deliveries_share_one_token_request(hooks: Hooks) -> None:
    issuer = TokenIssuer(release=trio.Event())
    results: list[str | None] = []

    async def get_token(auth: Any) -> None:
        results.append(await auth.token())

    with trio.fail_after(10):
        async with serve(issuer) as server:
            auth = make_auth(hooks, **oauth2_options(server.port))
            async with trio.open_nursery() as nursery:
                for _ in range(5):
                    nursery.start_soon(get_token, auth)
                await issuer.arrived.wait()
                await trio.testing.wait_all_tasks_blocked()
                assert len(server.requests) == 1  # the other four wait for its answer
                assert issuer.release is not None
                issuer.release.set()
    assert results == ["tok-1"] * 5
    assert len(server.requests) == 1


async def test_oauth2_token_expiry(hooks: Hooks) -> None:
    with trio.fail_after(10):
        # Expired at once (expires_in 0): every request gets a new token.
        expiring = TokenIssuer(expires_in=0)
        async with serve(expiring) as server:
            auth = make_auth(hooks, **oauth2_options(server.port))
            assert [await auth.token() for _ in range(3)] == ["tok-1", "tok-2", "tok-3"]
        # No expires_in (and a numeric string, as some servers send it): kept.
        for expires_in in (None, "3599"):
            lasting = TokenIssuer(expires_in=expires_in)
            async with serve(lasting) as server:
                auth = make_auth(hooks, **oauth2_options(server.port))
                assert [await auth.token() for _ in range(3)] == ["tok-1"] * 3


async def test_oauth2_a_401_drops_the_token_once_for_all_deliveries(hooks: Hooks) -> None:
    """Two deliveries sent tok-1 and both got 401: one refresh, and both resend with tok-2."""
    issuer = TokenIssuer()
    a_sent, b_sent, a_done = trio.Event(), trio.Event(), trio.Event()
    sent: dict[str, list[str]] = {}
    resend: dict[str, bool] = {}

    async def delivery_a(auth: Any) -> None:
        request = outgoing()
        await auth.apply(request)
        a_sent.set()
        await b_sent.wait()
        resend["a"] = auth.unauthorized()  # 401 for tok-1
        await auth.apply(request)
        sent["a"] = authorization(request)
        a_done.set()

    async def delivery_b(auth: Any) -> None:
        await a_sent.wait()
        request = outgoing()
        await auth.apply(request)
        b_sent.set()
        await a_done.wait()
        resend["b"] = auth.unauthorized()  # 401 for tok-1 as well, but tok-2 is cached by now
        await auth.apply(request)
        sent["b"] = authorization(request)

    with trio.fail_after(10):
        async with serve(issuer) as server:
            auth = make_auth(hooks, **oauth2_options(server.port))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(delivery_a, auth)
                nursery.start_soon(delivery_b, auth)
    assert resend == {"a": True, "b": True}
    assert sent == {"a": ["Bearer tok-2"], "b": ["Bearer tok-2"]}
    assert issuer.issued == ["tok-1", "tok-2"]


async def test_oauth2_failures_send_no_credentials_log_no_secret_and_cool_down(
    hooks: Hooks, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="hookgate")
    with trio.fail_after(10):
        # Wrong client secret: the server says invalid_client and echoes what it got.
        issuer = TokenIssuer(client_secret="another")
        async with serve(issuer) as server:
            auth = make_auth(hooks, **oauth2_options(server.port))
            request = outgoing([("Authorization", "Bearer stale")])
            await auth.apply(request)  # no exception: the delivery goes on and fails with 401
            assert authorization(request) == []
            assert auth.unauthorized() is False  # nothing to refresh: no resend
            await auth.apply(request)  # within the cooldown: no second token request
            assert len(server.requests) == 1
        # Down: nothing listens on that port any more.
        down = make_auth(hooks, **oauth2_options(server.port))
        assert await down.token() is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert "HTTP 401: invalid_client (bad credentials: client_secret *** line two)" in warnings[0]
    assert "ConnectError" in warnings[1]
    assert all("client hookgate" in w and "/oauth/token" in w for w in warnings)
    logged = caplog.text + "".join(warnings)
    for secret in (SECRET, "s3cr", base64.b64encode(SECRET.encode()).decode()[:8]):
        assert secret not in logged


async def test_oauth2_keeps_a_token_that_is_due_for_refresh_while_the_server_fails(
    hooks: Hooks,
) -> None:
    # 60s tokens are refreshed after 54s; we cannot wait that long, so pretend they were.
    issuer = TokenIssuer(expires_in=60)
    with trio.fail_after(10):
        async with serve(issuer) as server:
            auth = make_auth(hooks, **oauth2_options(server.port))
            assert await auth.token() == "tok-1"
            token = auth._token
            auth._token = endpoint_auth.Token(token.value, trio.current_time() - 1, token.expires_at)
            issuer.status = 503
            assert await auth.token() == "tok-1"  # refresh failed; still valid for a few seconds
            auth._token = endpoint_auth.Token(token.value, trio.current_time() - 1, trio.current_time())
            assert await auth.token() is None  # expired: not sent (and no request in the cooldown)
    assert len(server.requests) == 2


# --- OAuth2 through the gateway -------------------------------------------------------------


def gateway(tmp_path: Path, text: str, **env: str) -> contextlib.AbstractAsyncContextManager[Gateway]:
    return run_gateway(tmp_path, text, plugins=GATEWAY_PLUGINS, env=env)


def gateway_config(nats_url: str, endpoints: str, to: str) -> str:
    return base_config(nats_url, f"endpoints:\n{endpoints}\nroutes:\n  - {{from: [internal], to: [{to}]}}\n")


def oauth2_endpoint(rx_url: str, token_port: int, schedule: str = "[200ms, 200ms]") -> str:
    return f"""
  partner:
    url: {rx_url}/in
    retry: {{schedule: {schedule}, jitter: 0}}
    auth:
      type: oauth2
      token_url: http://127.0.0.1:{token_port}/oauth/token
      client_id: hookgate
      client_secret: "${{PARTNER_SECRET}}"
      scope: webhooks
"""


async def wait_for_attempts(nats_url: str, count: int) -> list[dict[str, Any]]:
    with trio.fail_after(10):
        while True:
            with contextlib.suppress(Exception):  # the log stream may not exist yet
                msgs = await attempt_records(nats_url)
                if len(msgs) >= count:
                    return [msgspec.json.decode(m.data) for m in msgs]
            await trio.sleep(0.05)


async def test_oauth2_token_is_fetched_once_for_many_deliveries(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    issuer = TokenIssuer()
    with trio.fail_after(30):
        async with serve(issuer) as tokens, receiver() as rx:
            text = gateway_config(nats_server.url, oauth2_endpoint(rx.url, tokens.port), "partner")
            async with gateway(tmp_path, text, PARTNER_SECRET=SECRET) as gw:
                for n in range(5):
                    assert (await gw.publish("order.created", {"n": n})).status_code == 202
                got = await rx.wait_for(5)
    assert [r.headers["authorization"] for r in got] == ["Bearer tok-1"] * 5
    assert len(tokens.requests) == 1
    assert issuer.refused == []
    assert tokens.requests[0].form()["scope"] == "webhooks"


async def test_oauth2_stale_token_is_refreshed_once_and_the_same_attempt_resent(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    issuer = TokenIssuer()
    revoked: set[str] = set()

    def respond(request: Received, n: int) -> int:
        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        return 401 if token not in issuer.issued or token in revoked else 200

    with trio.fail_after(30):
        async with serve(issuer) as tokens, receiver(respond) as rx:
            text = gateway_config(nats_server.url, oauth2_endpoint(rx.url, tokens.port), "partner")
            async with gateway(tmp_path, text, PARTNER_SECRET=SECRET) as gw:
                await gw.publish("order.created", {"n": 1})
                await rx.wait_for(1)
                revoked.add("tok-1")  # the receiver now considers tok-1 stale
                await gw.publish("order.created", {"n": 2})
                got = await rx.wait_for(3)
                records = await wait_for_attempts(nats_server.url, 2)
    first, refused, resent = got
    assert first.headers["authorization"] == refused.headers["authorization"] == "Bearer tok-1"
    assert resent.headers["authorization"] == "Bearer tok-2"
    # The same attempt, sent again at once: not a retry on the schedule.
    assert refused.headers["hookgate-delivery-id"] == resent.headers["hookgate-delivery-id"]
    assert refused.headers["hookgate-attempt"] == resent.headers["hookgate-attempt"] == "1"
    assert resent.json()["data"] == {"n": 2}
    assert issuer.issued == ["tok-1", "tok-2"]
    assert len(rx.requests) == 3
    assert [(r["attempt"], r["outcome"], r["status"]) for r in records] == [
        (1, "succeeded", 200),
        (1, "succeeded", 200),
    ]


async def test_oauth2_token_server_down_fails_the_attempt_and_the_retry_succeeds(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    issuer = TokenIssuer()

    def respond(request: Received, n: int) -> int:
        return 200 if request.headers.get("authorization") in ("Bearer tok-1",) else 401

    with trio.fail_after(30):
        async with serve(issuer) as first:
            port = first.port  # now closed: connections are refused
        async with receiver(respond) as rx:
            # 1.5s between the 2nd and 3rd attempt: past the cooldown after a failed token request.
            endpoint = oauth2_endpoint(rx.url, port, schedule="[200ms, 1500ms, 1500ms]")
            text = gateway_config(nats_server.url, endpoint, "partner")
            async with gateway(tmp_path, text, PARTNER_SECRET=SECRET) as gw:
                await gw.publish("order.created", {"n": 1})
                await rx.wait_for(2)  # two attempts, both without credentials
                async with serve(issuer, port=port) as tokens:
                    (ok,) = await rx.wait_for(1, predicate=lambda r: "authorization" in r.headers)
                    records = await wait_for_attempts(nats_server.url, 3)
    failed = rx.requests[:2]
    assert all("authorization" not in r.headers for r in failed)
    assert [r.headers["hookgate-attempt"] for r in [*failed, ok]] == ["1", "2", "3"]
    assert ok.headers["authorization"] == "Bearer tok-1"
    assert len(tokens.requests) == 1
    assert [(r["attempt"], r["outcome"], r["status"]) for r in records] == [
        (1, "retrying", 401),
        (2, "retrying", 401),
        (3, "succeeded", 200),
    ]


# --- basic and bearer through the gateway ---------------------------------------------------


async def test_basic_and_bearer_reach_the_receiver(tmp_path: Path, nats_server: NatsServer) -> None:
    with trio.fail_after(30):
        async with receiver() as rx:
            endpoints = f"""
  legacy:
    url: {rx.url}/legacy
    auth: {{type: basic, username: hookgate, password: "${{LEGACY_PASSWORD}}"}}
  billing:
    url: {rx.url}/billing
    headers: {{Authorization: overridden}}
    auth: {{type: bearer, token: "${{BILLING_TOKEN}}"}}
"""
            text = gateway_config(nats_server.url, endpoints, "legacy, billing")
            env = {"LEGACY_PASSWORD": "pässword", "BILLING_TOKEN": "bil.ling-token"}
            async with gateway(tmp_path, text, **env) as gw:
                await gw.publish("order.created", {"n": 1})
                got = await rx.wait_for(2)
    by_path = {r.path: r.headers["authorization"] for r in got}
    # (The receiver decodes header values as latin-1; the bytes on the wire are base64 anyway.)
    assert by_path == {
        "/legacy": "Basic " + base64.b64encode("hookgate:pässword".encode()).decode(),
        "/billing": "Bearer bil.ling-token",
    }


# --- mTLS ------------------------------------------------------------------------------------


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    client_key_encrypted: Path
    other_cert: Path  # signed by another CA
    other_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey, password: bytes | None = None) -> Path:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    )
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    )
    return path


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer[0].subject if issuer else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        assert issuer is not None
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[1].public_key()), critical=False
        )
    if server:
        names: list[x509.GeneralName] = [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue("hookgate test CA", ca_key, None, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    client_key = ec.generate_private_key(ec.SECP256R1())
    other_ca_key = ec.generate_private_key(ec.SECP256R1())
    other_ca = _issue("another CA", other_ca_key, None, ca=True)
    other_key = ec.generate_private_key(ec.SECP256R1())
    return Pki(
        ca=_write_cert(d / "ca.pem", ca),
        server_cert=_write_cert(d / "server.pem", _issue("127.0.0.1", server_key, (ca, ca_key), server=True)),
        server_key=_write_key(d / "server.key", server_key),
        client_cert=_write_cert(d / "client.pem", _issue("hookgate-client", client_key, (ca, ca_key))),
        client_key=_write_key(d / "client.key", client_key),
        client_key_encrypted=_write_key(d / "client-encrypted.key", client_key, b"key-pw"),
        other_cert=_write_cert(d / "other.pem", _issue("intruder", other_key, (other_ca, other_ca_key))),
        other_key=_write_key(d / "other.key", other_key),
    )


def mtls_server_context(
    pki: Pki, maximum: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED
) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
    context.load_cert_chain(pki.server_cert, pki.server_key)
    context.verify_mode = ssl.CERT_REQUIRED
    context.maximum_version = maximum
    return context


async def ok(request: HttpRequest) -> tuple[int, Any]:
    return 200, {"ok": True}


def test_mtls_builds_a_client_context(hooks: Hooks, pki: Pki) -> None:
    auth = make_auth(
        hooks, type="mtls", cert_file=str(pki.client_cert), key_file=str(pki.client_key), ca_file=str(pki.ca)
    )
    context = auth.ssl_context()
    assert isinstance(context, ssl.SSLContext)
    assert context is auth.ssl_context()  # one context for the endpoint's pool
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert [c["subject"] for c in context.get_ca_certs()] == [((("commonName", "hookgate test CA"),),)]
    request = outgoing()
    assert auth.apply(request) is None and authorization(request) == []
    assert auth.unauthorized() is False
    encrypted = make_auth(
        hooks,
        type="mtls",
        cert_file=str(pki.client_cert),
        key_file=str(pki.client_key_encrypted),
        key_password="key-pw",
    )
    assert isinstance(encrypted.ssl_context(), ssl.SSLContext)
    config = endpoint_auth.EndpointMtlsConfig(
        cert_file=str(pki.client_cert), key_file=str(pki.client_key_encrypted), key_password="key-pw"
    )
    assert "key-pw" not in repr(config) and "key-pw" not in repr(encrypted)


@pytest.mark.parametrize(
    ("options", "where", "message"),
    [
        ({"cert_file": "missing.pem"}, ".cert_file", "no such file: missing.pem"),
        ({"key_file": "missing.key"}, ".key_file", "no such file: missing.key"),
        ({"ca_file": "missing-ca.pem"}, ".ca_file", "no such file: missing-ca.pem"),
        ({"ca_file": "{client_key}"}, ".ca_file", "holds no PEM CA certificate"),
        ({"cert_file": "{pki}"}, ".cert_file", "is a directory"),
        ({"key_file": "{other_key}"}, ".key_file", "is not the key of"),
        ({"key_file": "{client_key_encrypted}"}, ".key_file", "is encrypted: give key_password"),
        (
            {"key_file": "{client_key_encrypted}", "key_password": "wrong"},
            ".cert_file",
            "key_password is wrong",
        ),
        ({"cert_file": "{client_key}"}, ".cert_file", "expected a PEM certificate"),
    ],
)
def test_mtls_file_problems_are_config_errors(
    hooks: Hooks, pki: Pki, options: dict[str, str], where: str, message: str
) -> None:
    paths = {k: str(v) for k, v in vars(pki).items()} | {"pki": str(pki.ca.parent)}
    spec = {"type": "mtls", "cert_file": str(pki.client_cert), "key_file": str(pki.client_key)}
    spec |= {k: v.format(**paths) for k, v in options.items()}
    error = str(load_error(hooks, AUTH_ENDPOINT + "    auth: " + json.dumps(spec) + "\n"))
    assert f"x.yaml:4: $.endpoints.ep.auth{where}: " in error, error
    assert message.format(**paths) in error, error
    assert "wrong" not in error.replace("is wrong", "")  # the password itself is not echoed


def mtls_endpoint(port: int, auth: str = "", name: str = "vault") -> str:
    return f"""
  {name}:
    url: https://127.0.0.1:{port}/events
    retry: {{schedule: [10s], jitter: 0}}
{textwrap.indent(auth, "    ")}"""


async def test_mtls_delivery_presents_the_client_certificate(
    tmp_path: Path, nats_server: NatsServer, pki: Pki
) -> None:
    auth = (
        f"auth: {{type: mtls, cert_file: {pki.client_cert}, key_file: {pki.client_key}, ca_file: {pki.ca}}}\n"
    )
    with trio.fail_after(30):
        async with serve(ok, ssl_context=mtls_server_context(pki)) as server:
            text = gateway_config(nats_server.url, mtls_endpoint(server.port, auth), "vault")
            async with gateway(tmp_path, text) as gw:
                published = await gw.publish("secret.rotated", {"n": 1})
                (record,) = await wait_for_attempts(nats_server.url, 1)
    assert record["outcome"] == "succeeded", record
    (request,) = server.requests
    assert request.headers["webhook-id"] == published.json()["id"]
    assert request.peer_cert is not None
    assert request.peer_cert["subject"] == ((("commonName", "hookgate-client"),),)


@pytest.mark.parametrize("tls", ["1.2", "1.3"])
async def test_mtls_delivery_without_a_trusted_client_certificate_fails(
    tmp_path: Path, nats_server: NatsServer, pki: Pki, monkeypatch: pytest.MonkeyPatch, tls: str
) -> None:
    # Without auth, the transport trusts the system CAs: make that our test CA, so only the
    # missing client certificate can make the handshake fail.
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
    untrusted = (
        f"auth: {{type: mtls, cert_file: {pki.other_cert}, key_file: {pki.other_key}, ca_file: {pki.ca}}}\n"
    )
    maximum = ssl.TLSVersion.TLSv1_2 if tls == "1.2" else ssl.TLSVersion.TLSv1_3
    with trio.fail_after(30):
        async with serve(ok, ssl_context=mtls_server_context(pki, maximum)) as server:
            endpoints = mtls_endpoint(server.port, name="nocert") + mtls_endpoint(
                server.port, untrusted, name="intruder"
            )
            text = gateway_config(nats_server.url, endpoints, "nocert, intruder")
            async with gateway(tmp_path, text) as gw:
                await gw.publish("secret.rotated", {"n": 1})
                records = await wait_for_attempts(nats_server.url, 2)
    assert server.requests == []  # the server never saw a request
    assert len(server.errors) >= 2
    by_endpoint = {r["endpoint"]: r for r in records}
    for record in by_endpoint.values():
        assert record["outcome"] == "retrying"
        assert record["status"] is None
        assert record["error_kind"] in ("tls", "connect", "protocol"), record
    if tls == "1.2":  # the server refuses during the handshake
        assert {r["error_kind"] for r in records} == {"tls"}, records


async def test_oauth2_token_url_over_https_is_verified(
    hooks: Hooks, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(pki.server_cert, pki.server_key)
    issuer = TokenIssuer()
    with trio.fail_after(10):
        async with serve(issuer, ssl_context=server_context) as server:
            url = f"https://127.0.0.1:{server.port}/oauth/token"
            options = {**oauth2_options(server.port), "token_url": url}
            # Our test CA is not trusted by default: no token.
            assert await make_auth(hooks, **options).token() is None
            monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))  # now it is (a new endpoint's context)
            assert await make_auth(hooks, **options).token() == "tok-1"
    assert len(server.requests) == 1
