"""The HTTP/1.1 client exchange, sans I/O: request bytes out, response events in.

`HTTP11Connection` holds one connection's h11 state: it turns a request into the bytes to write
and the bytes read into a response (head, body up to a limit), and says whether the connection
may serve another request. It never touches a socket, so it knows nothing of trio or timeouts;
`connection.py` does the I/O around it (the split httpcore makes between its http11 module and
its connections).

`serialize_request` is the hot path's request writer: it validates and serializes a request head
itself, faster than h11 does, and hands h11 only what it needs to read the response.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import h11

from hookgate.transport.fields import FIELD_VALUE, TOKEN
from hookgate.transport.url import Target

__all__ = ["HTTP11Connection", "Received", "decode_headers", "serialize_request"]

_END = h11.EndOfMessage()  # events are immutable: one instance serves every request
_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})


class Received(NamedTuple):
    """A response as read: its head, its body (cut at the connection's limit), whether it was cut."""

    head: h11.Response
    content: bytes
    truncated: bool


class HTTP11Connection:
    """One client connection's HTTP/1.1 state, one request at a time: the bytes to send for a
    request, then the response from the bytes received."""

    __slots__ = (
        "_auth_line",
        "_content",
        "_h11",
        "_max_body",
        "_proxy_headers",
        "_response",
        "_truncated",
        "prefix",
    )

    def __init__(
        self, max_body: int, prefix: bytes | None = None, proxy_headers: Sequence[tuple[bytes, bytes]] = ()
    ) -> None:
        self._h11 = h11.Connection(h11.CLIENT)
        self._max_body = max_body
        # For a plain-http target through a proxy: what goes before the path in the request line,
        # b"http://<vetted address>:<port>" (absolute form), and the proxy's credential header,
        # added to every request. None and none otherwise.
        self.prefix = prefix
        self._proxy_headers = list(proxy_headers)
        self._auth_line = b"".join(name + b": " + value + b"\r\n" for name, value in proxy_headers)
        self._response: h11.Response | None = None
        self._content = bytearray()
        self._truncated = False

    def send_request(self, event: h11.Request, head: bytes | None, body: bytes) -> bytes:
        """The bytes to write for a request; h11 is told about it, to read the response.

        `head` is the request head `serialize_request` wrote for `event`, or None for h11 to write
        the request from `event` (validating it). The body is passed through as is: Content-Length
        framing adds nothing to it.
        """
        self._response, self._content, self._truncated = None, bytearray(), False
        h = self._h11
        if head is None:  # h11 writes the request
            if self.prefix is not None:  # through a proxy: absolute form, and its credentials
                event = h11.Request(
                    method=event.method,
                    target=self.prefix + event.target,
                    headers=[*event.headers.raw_items(), *self._proxy_headers],
                )
            pieces = [h.send(event)]
            if body:
                pieces += h.send_with_data_passthrough(h11.Data(data=body)) or ()
            pieces.append(h.send(_END))
            return b"".join(pieces)
        h.send(event)  # `serialize_request` wrote it; h11 is told what it needs to read the response
        h.send(_END)
        if self.prefix is None:
            return head + body
        # Through a proxy: absolute form, and the proxy's credentials after the other headers.
        space = head.index(b" ") + 1  # after the method
        return b"".join((head[:space], self.prefix, head[space:-2], self._auth_line, b"\r\n", body))

    def receive_data(self, data: bytes | bytearray) -> bool:
        """Take bytes read from the connection (b"" for EOF); whether the response is now complete
        (or cut at the limit), else more bytes are needed.

        Raises h11.RemoteProtocolError when the server breaks the protocol.
        """
        h = self._h11
        h.receive_data(data)  # type: ignore[arg-type]  # any bytes-like; b"" means EOF
        while True:
            event = h.next_event()
            if event is h11.NEED_DATA:
                return False
            if type(event) is h11.Data:
                self._content += event.data
                if len(self._content) > self._max_body:
                    del self._content[self._max_body :]
                    self._truncated = True  # stop reading; the connection cannot be reused
                    return True
            elif type(event) is h11.Response:
                self._response = event
            elif type(event) is h11.EndOfMessage:
                return True
            elif type(event) is not h11.InformationalResponse:  # 1xx: the final one follows
                # PAUSED (the server switched protocols on us) or something stranger: looping on
                # it would spin forever, so give up on the connection.
                raise h11.RemoteProtocolError(f"unexpected {event!r} from the server")

    def response(self) -> Received:
        """The response `receive_data` completed."""
        assert self._response is not None  # h11 always yields the Response before Data/EndOfMessage
        return Received(self._response, bytes(self._content), self._truncated)

    def start_next_cycle(self) -> bool:
        """Ready the connection for another request, if it can take one; whether it can."""
        h = self._h11
        # Bytes after the response (a broken server) would be read as the next one: don't reuse.
        if (
            self._truncated
            or h.our_state is not h11.DONE
            or h.their_state is not h11.DONE
            or h.trailing_data[0]
        ):
            return False
        h.start_next_cycle()
        return True


def decode_headers(raw: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """Response headers as str pairs: names lower-cased; values UTF-8 when all of them are valid
    UTF-8, else ISO-8859-1 (like httpx)."""
    try:
        return [(name.decode("ascii").lower(), value.decode("utf-8")) for name, value in raw]
    except UnicodeDecodeError:
        return [(name.decode("latin-1").lower(), value.decode("latin-1")) for name, value in raw]


# Header names seen before, validated, mapped to their bytes. Never the names serialize_request
# treats specially (Host, _FRAMING, _H11_READS), so a hit means: write it as is.
_NAMES: dict[str, bytes] = {}
_NAMES_MAX = 4096  # a bound, so a stream of distinct names cannot grow it forever
_METHODS: dict[str, bytes] = {m: m.encode() for m in ("POST", "PUT", "PATCH", "GET", "DELETE", "HEAD")}
# Header names `send` shows h11 as well as writing them: those it acts on when reading the
# response (keep-alive, protocol switch proposals, 100-continue).
_H11_READS = frozenset({"connection", "upgrade", "expect"})
_FRAMING = frozenset({"content-length", "transfer-encoding"})  # ours to set; dropped from the input


def _method(method: str) -> bytes:
    raw = _METHODS.get(method)
    if raw is None:
        if not TOKEN.fullmatch(method):
            raise h11.LocalProtocolError(f"illegal method {method!r}")
        raw = method.encode("ascii")
    return raw


def _header_value(name: str, value: str) -> bytes:
    if value.isascii() and value.isprintable():  # nearly always; both are cheap C checks
        return value.encode("ascii")
    # The errors name the header, never its value: it may be a credential, and the message ends
    # up in attempt records and logs.
    try:
        raw = value.encode("latin-1")
    except UnicodeEncodeError:
        raise h11.LocalProtocolError(f"the value of header {name!r} is not ISO-8859-1") from None
    if not FIELD_VALUE.fullmatch(raw):
        raise h11.LocalProtocolError(f"the value of header {name!r} holds a control character")
    return raw


def serialize_request(
    method: str, target: Target, headers: Iterable[tuple[str, str]], body: bytes
) -> tuple[h11.Request, bytes]:
    """The request head for `send`, validated and serialized here, and the h11 event to go with it.

    h11 validates and serializes requests far more slowly (about half of the write cost in a
    profile). It still tracks the exchange, since it reads the response: it is sent an event with
    the method, Host and any header it acts on (_H11_READS), while the wire gets the bytes built
    here. A Host header replaces the target's; Content-Length is set from the body.
    """
    raw_method = _method(method)
    lines = [raw_method, b" ", target.path, b" HTTP/1.1\r\nHost: ", target.host_header, b"\r\n"]
    h11_headers: list[tuple[bytes, bytes]] | None = None  # if h11 must see more than the usual
    for name, value in headers:
        raw_name = _NAMES.get(name)
        if raw_name is None:  # a name not seen before, or one that needs special handling
            if not TOKEN.fullmatch(name):
                raise h11.LocalProtocolError(f"illegal header name {name!r}")
            lower = name.lower()
            if lower in _FRAMING:
                continue
            raw_name = name.encode("ascii")
            if lower == "host" or lower in _H11_READS:
                raw_value = _header_value(name, value)
                if h11_headers is None:
                    h11_headers = [(b"Host", target.host_header)]
                if lower == "host":
                    lines[4] = raw_value  # in place of the target's, and still the first header
                    h11_headers[0] = (b"Host", raw_value)
                else:
                    lines += (raw_name, b": ", raw_value, b"\r\n")
                    h11_headers.append((raw_name, raw_value))
                continue
            if len(_NAMES) < _NAMES_MAX:
                _NAMES[name] = raw_name
        lines += (raw_name, b": ", _header_value(name, value), b"\r\n")
    if body or raw_method in _BODY_METHODS:
        lines.append(b"Content-Length: %d\r\n" % len(body))
    lines.append(b"\r\n")
    head = b"".join(lines)
    if h11_headers is not None:
        return h11.Request(method=raw_method, target=target.path, headers=h11_headers), head
    return _usual_event(raw_method, target), head


def _usual_event(raw_method: bytes, target: Target) -> h11.Request:
    """The h11 event for a request with no header h11 acts on: the same every time, so cached."""
    event = target.h11_events.get(raw_method)
    if event is None:
        event = h11.Request(method=raw_method, target=target.path, headers=[(b"Host", target.host_header)])
        if len(target.h11_events) < 16:
            target.h11_events[raw_method] = event
    return event
