"""The quickstart's receiver (examples/receiver.py), run as the quickstart runs it, behind a real
gateway on the quickstart's own config: it prints what the README says it prints."""

from __future__ import annotations

import base64
import codecs
import contextlib
import hashlib
import hmac
import importlib.util
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import trio

from tests.support import ROOT, NatsServer, run_gateway

QUICKSTART = ROOT / "examples" / "quickstart.yaml"
RECEIVER = ROOT / "examples" / "receiver.py"
BODY = b'{"order": 42, "status": "paid"}'


@dataclass
class Printed:
    """What a running receiver printed so far, and a way to wait for more."""

    text: str = ""
    _changed: trio.Event = field(default_factory=trio.Event)
    _decoder: codecs.IncrementalDecoder = field(default_factory=codecs.getincrementaldecoder("utf-8"))

    def add(self, chunk: bytes | bytearray) -> None:
        self.text += self._decoder.decode(chunk)  # a character may be split between chunks
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        with trio.fail_after(timeout):
            while (found := re.search(pattern, self.text, re.MULTILINE)) is None:
                await self._changed.wait()
        return found

    async def request(self, event_id: str) -> str:
        """The lines printed for the request with this webhook-id, once its last (the body) is."""
        found = await self.wait_for(
            rf"^POST \S+ .*webhook-id {re.escape(event_id)} .*(\n  .*)*?\n  body \(.*$"
        )
        return found.group(0)


@contextlib.asynccontextmanager
async def receiver_script(*args: str) -> AsyncIterator[tuple[int, Printed]]:
    """`python examples/receiver.py --port 0 ARGS`: the port it took, and what it prints."""
    printed = Printed()
    process = await trio.lowlevel.open_process(
        [sys.executable, str(RECEIVER), "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert process.stdout is not None
    try:
        async with trio.open_nursery() as nursery:

            async def read() -> None:
                assert process.stdout is not None
                async for chunk in process.stdout:
                    printed.add(chunk)

            nursery.start_soon(read)
            port = int(
                (await printed.wait_for(r"^receiver listening on http://127\.0\.0\.1:(\d+)$")).group(1)
            )
            yield port, printed
            nursery.cancel_scope.cancel()
    finally:
        process.terminate()
        with trio.move_on_after(5):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()


def quickstart_config(nats_url: str) -> str:
    """examples/quickstart.yaml as it is, on the test's nats-server instead of an embedded one."""
    text = QUICKSTART.read_text()
    on_test_server, found = re.subn(r"(?m)^broker:\n  data_dir: .*$", f"broker:\n  url: {nats_url}", text)
    assert found == 1, "the quickstart's broker section changed; update this test"
    return on_test_server


async def test_the_receiver_prints_what_the_quickstart_says(tmp_path: Path, nats_server: NatsServer) -> None:
    async with receiver_script() as (port, printed):
        env = {"HOOKGATE_PORT": "0", "RECEIVER_PORT": str(port)}
        async with run_gateway(tmp_path, quickstart_config(nats_server.url), env=env) as gw:
            # The quickstart's requests: a signed webhook, the way a provider sends it...
            sig = hmac.new(b"quickstart-secret", BODY, hashlib.sha256).hexdigest()
            webhook = await gw.http.post(
                f"{gw.url}/webhooks/acme",
                content=BODY,
                headers={
                    "content-type": "application/json",
                    "X-Acme-Signature": f"sha256={sig}",
                    "X-Acme-Event": "order.paid",
                    "X-Acme-Delivery": "d-1",
                },
            )
            assert webhook.status_code == 202, webhook.text
            event_id = webhook.json()["id"]
            forwarded = await printed.request(event_id)
            # ... and an internal event, the way one of your services publishes it.
            published = await gw.http.post(
                f"{gw.url}/api/v1/events",
                json={"type": "order.created", "data": {"id": 7}},
                headers={"Authorization": "Bearer dev-token"},
            )
            assert published.status_code == 202, published.text
            internal_id = published.json()["id"]
            internal = await printed.request(internal_id)

    head, *headers, body = forwarded.splitlines()
    assert head == f"POST /webhooks  attempt 1  webhook-id {event_id}  signature verified"
    shown = dict(h.strip().split(": ", 1) for h in headers)
    names = {name.lower(): value for name, value in shown.items()}
    # The provider's headers, as the provider sent them...
    assert names["x-acme-event"] == "order.paid" and names["x-acme-delivery"] == "d-1"
    assert names["x-acme-signature"] == f"sha256={sig}"
    assert names["content-type"] == "application/json"
    # ... with hookgate's own...
    assert names["webhook-id"] == event_id and names["webhook-signature"].startswith("v1,")
    assert names["hookgate-source"] == "acme" and names["hookgate-attempt"] == "1"
    assert names["hookgate-event-id"] == event_id and "webhook-timestamp" in names
    # ... and the original body bytes.
    assert body == f"  body ({len(BODY)} bytes): {BODY.decode()}"

    assert (
        internal.splitlines()[0] == f"POST /webhooks  attempt 1  webhook-id {internal_id}  signature verified"
    )
    assert re.search(
        r'body \(\d+ bytes\): \{"type":"order\.created","timestamp":"[^"]+","data":\{"id":7\}\}', internal
    )


def _receiver_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("quickstart_receiver", RECEIVER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_receiver_says_when_a_signature_does_not_verify_and_hides_credentials() -> None:
    receiver = _receiver_module()
    secret = receiver.QUICKSTART_SECRET
    key = base64.b64decode(secret.removeprefix("whsec_"))
    body = b'{"a":1}'
    mac = hmac.new(key, b"msg_1.1700000000." + body, hashlib.sha256).digest()
    good = "v1," + base64.b64encode(mac).decode()
    headers = [("webhook-id", "msg_1"), ("webhook-timestamp", "1700000000"), ("Authorization", "Bearer tok")]

    def first_line(signature: str | None, secret: str = secret, body: bytes = body) -> str:
        signed = headers + ([("webhook-signature", signature)] if signature is not None else [])
        return str(receiver.describe("/in", signed, body, secret)).splitlines()[0]

    assert first_line(f"v1,bm90LWl0 {good}").endswith("signature verified")  # a rotation: any entry
    assert first_line(good, body=b'{"a":2}').endswith("signature NOT VERIFIED")
    assert first_line(good, secret="whsec_" + "QUJD" * 8).endswith("signature NOT VERIFIED")
    assert first_line(None).endswith("no webhook-signature")
    shown = receiver.describe("/in", headers, body, secret)
    assert "Authorization: ***" in shown and "tok" not in shown
