"""The sans-IO HTTP/1.1 exchange (`HTTP11Connection`), bytes in and out, without sockets."""

from __future__ import annotations

import h11
import pytest

from hookgate.transport.http11 import HTTP11Connection, serialize_request
from hookgate.transport.url import parse_url

TARGET = parse_url("http://example.com/hook?x=1")
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def _request(http: HTTP11Connection, body: bytes = b"abc") -> bytes:
    event, head = serialize_request("POST", TARGET, [("X-A", "1")], body)
    return http.send_request(event, head, body)


def test_request_bytes_are_the_serialized_head_and_the_body() -> None:
    data = _request(HTTP11Connection(1024))
    assert data == b"POST /hook?x=1 HTTP/1.1\r\nHost: example.com\r\nX-A: 1\r\nContent-Length: 3\r\n\r\nabc"


def test_through_a_proxy_requests_are_absolute_form_with_the_proxy_credentials_last() -> None:
    http = HTTP11Connection(1024, b"http://192.0.2.1:80", [(b"Proxy-Authorization", b"Basic eDp5")])
    assert _request(http) == (
        b"POST http://192.0.2.1:80/hook?x=1 HTTP/1.1\r\nHost: example.com\r\nX-A: 1\r\n"
        b"Content-Length: 3\r\nProxy-Authorization: Basic eDp5\r\n\r\nabc"
    )


def test_a_response_read_in_pieces_after_a_1xx_completes_and_the_connection_is_reusable() -> None:
    http = HTTP11Connection(1024)
    _request(http)
    assert not http.receive_data(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-")
    assert not http.receive_data(b"Length: 2\r\nX-B: 2\r\n\r\no")
    assert http.receive_data(b"k")
    received = http.response()
    assert (received.head.status_code, received.content, received.truncated) == (200, b"ok", False)
    assert (b"X-B", b"2") in received.head.headers.raw_items()  # as received
    assert http.start_next_cycle()
    _request(http)  # a second request on the same connection
    assert http.receive_data(OK)
    assert http.response().content == b"ok"


def test_a_body_over_the_limit_is_cut_and_the_connection_is_not_reused() -> None:
    http = HTTP11Connection(3)
    _request(http)
    assert http.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456")
    assert http.response()[1:] == (b"012", True)
    assert not http.start_next_cycle()


def test_bytes_after_the_response_make_the_connection_unusable() -> None:
    http = HTTP11Connection(1024)
    _request(http)
    assert http.receive_data(OK + b"HTTP/1.1 200 OK\r\n")
    assert not http.start_next_cycle()


def test_eof_before_the_response_and_a_protocol_switch_are_protocol_errors() -> None:
    http = HTTP11Connection(1024)
    _request(http)
    with pytest.raises(h11.RemoteProtocolError):
        http.receive_data(b"")
    http = HTTP11Connection(1024)
    event, head = serialize_request("GET", TARGET, [("Connection", "upgrade"), ("Upgrade", "x")], b"")
    http.send_request(event, head, b"")
    with pytest.raises(h11.RemoteProtocolError, match="unexpected"):
        http.receive_data(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n")
