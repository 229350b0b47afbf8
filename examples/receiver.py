"""A tiny webhook receiver for the quickstart: prints each request and verifies its signature.

    python examples/receiver.py [--port 9000] [--secret whsec_...]

For every request it prints the attempt, the event id and whether `webhook-signature` verified,
then every header as it arrived (the provider's own, such as `X-Acme-Event`, and those hookgate
adds: `webhook-id`, `webhook-timestamp`, `webhook-signature`, `hookgate-source`,
`hookgate-event-id`, `hookgate-delivery-id`, `hookgate-attempt`), then the body bytes unchanged.
Credentials (`Authorization`, `Cookie`) are not printed.

Uses only the standard library, so it runs anywhere; `webhook-signature` is checked the Standard
Webhooks way (HMAC-SHA256 over "{webhook-id}.{webhook-timestamp}.{body}").
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import hashlib
import hmac
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

QUICKSTART_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # examples/quickstart.yaml's
CREDENTIALS = frozenset({"authorization", "proxy-authorization", "cookie"})


def signature_valid(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """Whether any `v1,<base64>` entry of `webhook-signature` is the HMAC of this request."""
    try:
        key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except binascii.Error:
        return False
    content = f"{headers.get('webhook-id')}.{headers.get('webhook-timestamp')}.".encode() + body
    expected = base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode()
    given = [
        value
        for version, _, value in (s.partition(",") for s in headers.get("webhook-signature", "").split())
        if version == "v1"
    ]
    return any(hmac.compare_digest(expected, g) for g in given)


def describe(path: str, headers: list[tuple[str, str]], body: bytes, secret: str) -> str:
    """What is printed for one request."""
    lower = {k.lower(): v for k, v in headers}
    if "webhook-signature" not in lower:
        verdict = "no webhook-signature"
    elif signature_valid(secret, lower, body):
        verdict = "signature verified"
    else:
        verdict = "signature NOT VERIFIED"
    lines = [
        f"POST {path}  attempt {lower.get('hookgate-attempt', '-')}  "
        f"webhook-id {lower.get('webhook-id', '-')}  {verdict}"
    ]
    lines += [f"  {k}: {'***' if k.lower() in CREDENTIALS else v}" for k, v in headers]
    try:
        text = body.decode()
    except UnicodeDecodeError:
        text = repr(body)
    lines.append(f"  body ({len(body)} bytes): {text}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--secret", default=QUICKSTART_SECRET, help="the endpoint's whsec_ signing secret")
    args = parser.parse_args()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            # One print per request, so concurrent requests do not interleave their lines.
            print(describe(self.path, list(self.headers.items()), body, args.secret), flush=True)
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *a: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"receiver listening on http://127.0.0.1:{server.server_address[1]}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: stop quietly
        server.serve_forever()


if __name__ == "__main__":
    main()
