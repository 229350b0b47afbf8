"""Hostile input, generated: whatever an anonymous client sends to ingress, and whatever a token
holder sends to the management API, is answered without a 5xx (the broker stays up here, so not
even 503) and without a traceback in the gateway's log; afterwards the gateway still serves.

One `hookgate run` process serves every example. The number of examples per test is bounded for
CI; set HOOKGATE_FUZZ_EXAMPLES for a longer run (e.g. 5000).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import string
import subprocess
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlencode

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import free_port, hookgate_command

EXAMPLES = int(os.environ.get("HOOKGATE_FUZZ_EXAMPLES", "120"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SECRET = "fuzz-secret"
TOKEN = "fuzz-token"


@dataclass
class Running:
    url: str
    log: Path
    client: httpx.Client


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    tmp = tmp_path_factory.mktemp("fuzz")
    port = free_port()
    config = tmp / "hookgate.yaml"
    config.write_text(
        textwrap.dedent(
            f"""\
            server:
              listen: 127.0.0.1:{port}
              workers: 1  # one process: the fuzzer's subject is the request path, not the supervisor
              api_tokens: [{TOKEN}]
              max_body: 64KiB
              shutdown_grace: 1s
            broker:
              data_dir: {tmp / "data"}
            sources:
              acme:
                verify: {{type: hmac, header: X-Sig, prefix: "sha256=", secret: {SECRET}}}
                event_type: body.type
                event_id: header.X-Delivery
              keyed:
                auth: [{{type: api_key, header: X-Api-Key, key: k}}]
                event_type: header.X-Event
            endpoints:
              nowhere:
                url: http://127.0.0.1:9/hooks
                retry: {{schedule: [1h]}}
            routes:
              - {{to: [nowhere]}}
            """
        )
    )
    log = tmp / "gateway.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            hookgate_command("run", "-c", str(config)), stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=10) as client:
            _wait_ready(client, process, log)
            yield Running(url, log, client)
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_ready(client: httpx.Client, process: subprocess.Popen[bytes], log: Path) -> None:
    import time

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"the gateway did not get ready:\n{log.read_text()[-3000:]}")


# --- strategies ------------------------------------------------------------------------------

TOKEN_CHARS = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
header_names = st.one_of(
    st.sampled_from(
        [
            "X-Sig",
            "X-Delivery",
            "X-Api-Key",
            "X-Event",
            "Content-Type",
            "Content-Length",
            "Authorization",
            "Transfer-Encoding",
            "Host",
            "Expect",
            "Connection",
            "traceparent",
            "webhook-id",
        ]
    ),
    st.text(TOKEN_CHARS, min_size=1, max_size=30),
)
# Anything a client can put on the wire in a header value: no CR, LF or NUL, which end the line.
header_values = st.one_of(
    st.binary(max_size=300).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\0", b"")),
    st.text(max_size=100).map(lambda t: t.encode("utf-8", "replace").replace(b"\r", b"").replace(b"\n", b"")),
    st.sampled_from(
        [b"sha256=" + b"0" * 64, b"application/json", b"Bearer " + TOKEN.encode(), b"k", b"x" * 9000]
    ),
)
headers = st.lists(st.tuples(header_names, header_values), max_size=8)
path_segments = st.one_of(
    st.sampled_from(["acme", "keyed", "unknown", "", "..", "%2e%2e", "%00", "a/b", "ü", "*", ">"]),
    st.text(max_size=20),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
bodies = st.one_of(
    st.binary(max_size=2000),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"type": st.text(max_size=20)}, optional={"id": st.text(max_size=20)}).map(
        lambda v: json.dumps(v).encode()
    ),
)
query_values = st.one_of(
    st.sampled_from(
        [
            "nan",
            "inf",
            "-inf",
            "1e20",
            "99999999999999999999",
            "-99999999999",
            "253402300800",
            "0",
            "1h",
            "2026-11-27T00:00:00Z",
            "-1",
            "",
            "dead",
            "failed,dead",
            "c2VxOjQy",
            "ü",
            "*",
            ">",
        ]
    ),
    st.text(max_size=30),
)
queries = st.dictionaries(
    st.sampled_from(
        ["since", "until", "cursor", "limit", "status", "endpoint", "event", "source", "now", "x"]
    ),
    query_values,
    max_size=4,
)


def _raw(url: str, method: str, target: bytes, headers: list[tuple[str, bytes]], body: bytes) -> int:
    """Send one request exactly as given (duplicate, conflicting or non-ASCII headers included,
    which HTTP client libraries refuse to send) and return the status, or 0 if the server closed
    the connection without answering, as it may for a request it cannot parse."""
    host, port = httpx.URL(url).host, httpx.URL(url).port
    lines = [method.encode() + b" " + target + b" HTTP/1.1", b"Host: " + host.encode(), b"Connection: close"]
    lines += [name.encode() + b": " + value for name, value in headers]
    if not any(name.lower() in ("content-length", "transfer-encoding") for name, _ in headers):
        lines.append(b"Content-Length: " + str(len(body)).encode())
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        sock.shutdown(socket.SHUT_WR)  # a body shorter than its Content-Length ends here
        answer = b""
        while b"\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                return 0
            answer += chunk
    return int(answer.split(b" ", 2)[1])


def _send(client: httpx.Client, method: str, path: str, **kwargs: object) -> httpx.Response:
    try:
        return client.request(method, path, **kwargs)  # type: ignore[arg-type]
    except httpx.RemoteProtocolError:
        # The server may refuse a request it cannot parse by closing the connection: that is an
        # answer too, and not a 5xx. (httpx reports it this way.)
        return httpx.Response(400)


def _assert_no_5xx(response: httpx.Response, what: str) -> None:
    assert response.status_code < 500, f"{what}: {response.status_code} {response.text[:300]}"


# --- the tests -------------------------------------------------------------------------------


@FUZZ
@given(
    method=st.sampled_from(["POST", "GET", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH"]),
    source=path_segments,
    extra=headers,
    body=bodies,
    query=queries,
    sign=st.booleans(),
)
def test_ingress_answers_any_request_without_a_server_error(
    gateway: Running,
    method: str,
    source: str,
    extra: list[tuple[str, bytes]],
    body: bytes,
    query: dict[str, str],
    sign: bool,
) -> None:
    sent: list[tuple[str, bytes]] = list(extra)
    if sign:
        digest = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        sent.append(("X-Sig", f"sha256={digest}".encode()))
    target = f"/webhooks/{quote(source, safe='/%.*>')}?{urlencode(query)}".encode()
    status = _raw(gateway.url, method, target, sent, body)
    # A transfer coding the server does not implement is answered 501 by the HTTP layer, as
    # RFC 9112 (section 6.1) asks: the one 5xx that is the right answer to a client's request.
    unknown_coding = any(
        name.lower() == "transfer-encoding" and value.strip().lower() != b"chunked" for name, value in sent
    )
    assert status < 500 or (status == 501 and unknown_coding), f"{method} {target!r} with {sent!r}: {status}"


API_PATHS = [
    "/api/v1/events",
    "/api/v1/events/{x}",
    "/api/v1/deliveries",
    "/api/v1/deliveries/{x}",
    "/api/v1/deliveries/{x}/retry",
    "/api/v1/endpoints",
    "/api/v1/endpoints/{x}",
    "/api/v1/endpoints/{x}/enable",
    "/api/v1/endpoints/{x}/disable",
    "/api/v1/endpoints/{x}/recover",
    "/api/v1/endpoints/{x}/redrive",
    "/api/v1/jobs/{x}",
    "/api/v1/{x}",
]


@FUZZ
@given(
    method=st.sampled_from(["GET", "POST", "PATCH", "DELETE", "PUT", "HEAD"]),
    template=st.sampled_from(API_PATHS),
    segment=path_segments,
    body=bodies,
    query=queries,
    authorization=st.sampled_from([f"Bearer {TOKEN}", f"bearer {TOKEN}", "Bearer wrong", "", "Basic eDp5"]),
    content_type=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", ""]),
)
def test_the_api_answers_any_request_without_a_server_error(
    gateway: Running,
    method: str,
    template: str,
    segment: str,
    body: bytes,
    query: dict[str, str],
    authorization: str,
    content_type: str,
) -> None:
    path = template.replace("{x}", quote(segment, safe="%.*>") or "x")
    headers = {k: v for k, v in (("Authorization", authorization), ("Content-Type", content_type)) if v}
    response = _send(gateway.client, method, path, headers=headers, content=body, params=query)
    _assert_no_5xx(response, f"{method} {path} {query}")


def test_after_the_fuzzing_the_gateway_serves_and_logged_no_traceback(gateway: Running) -> None:
    # Runs after the fuzz tests above (pytest keeps the file's order).
    assert gateway.client.get("/healthz").status_code == 200
    body = b'{"type": "after.fuzz"}'
    digest = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    answer = gateway.client.post(
        "/webhooks/acme", content=body, headers={"X-Sig": f"sha256={digest}", "X-Delivery": "after-fuzz"}
    )
    assert answer.status_code == 202, answer.text
    log = gateway.log.read_text(errors="replace")
    assert "Traceback" not in log, log[log.index("Traceback") - 500 :][:4000]
