"""A tiny webhook receiver for the quickstart: prints each request and verifies its signature.

    python examples/receiver.py [--port 9000] [--secret whsec_...]

Uses only the standard library, so it runs anywhere; `webhook-signature` is checked the Standard
Webhooks way (HMAC-SHA256 over "{webhook-id}.{webhook-timestamp}.{body}").
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def signature_valid(secret: str, headers: dict[str, str], body: bytes) -> bool:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    content = f"{headers.get('webhook-id')}.{headers.get('webhook-timestamp')}.".encode() + body
    expected = base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode()
    given = [s.split(",", 1)[1] for s in headers.get("webhook-signature", "").split() if "," in s]
    return any(hmac.compare_digest(expected, g) for g in given)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--secret", default="whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    args = parser.parse_args()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            headers = {k.lower(): v for k, v in self.headers.items()}
            verified = "verified" if signature_valid(args.secret, headers, body) else "NOT VERIFIED"
            print(
                f"{self.path} attempt {headers.get('hookgate-attempt')} id {headers.get('webhook-id')} "
                f"signature {verified}\n  {body.decode(errors='replace')}",
                flush=True,
            )
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *a: object) -> None:
            pass

    print(f"receiver listening on http://127.0.0.1:{args.port}", flush=True)
    ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
