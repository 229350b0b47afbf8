"""The HTTPS listener (`server.tls`): certificate paths relative to the config file, real HTTPS
requests, a signed webhook through it, and the command line reaching an https gateway."""

from __future__ import annotations

import hashlib
import hmac
import json
import ssl
from pathlib import Path

import httpx
import pytest
import trio

from hookgate.cli import client
from hookgate.cli.entry import main
from hookgate.gateway import StartupError
from tests.credentials import Pki, make_pki
from tests.support import NatsServer, base_config, receiver, run_gateway, startup_error, write_config

SECRET = b"tls-webhook-secret"


def https_config(nats_url: str, receiver_url: str, tls: str) -> str:
    text = base_config(
        nats_url,
        f"""
        sources:
          acme:
            verify:
              type: hmac
              header: X-Acme-Signature
              algorithm: sha256
              encoding: hex
              secret: "{SECRET.decode()}"
            event_type: body.type
        endpoints:
          svc: {{url: "{receiver_url}/in"}}
        routes:
          - {{from: [acme], to: [svc]}}
        """,
    )
    return text.replace("server:\n", f"server:\n  tls: {tls}\n", 1)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "etc" / "tls")


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The gateway runs from a working directory that is not the config file's."""
    directory = tmp_path / "run"
    directory.mkdir()
    monkeypatch.chdir(directory)
    return directory


async def test_https_with_certificates_relative_to_the_config_file(
    tmp_path: Path, nats_server: NatsServer, pki: Pki, elsewhere: Path
) -> None:
    conf_dir = tmp_path / "etc"
    async with receiver() as rx:
        text = https_config(nats_server.url, rx.url, "{certfile: tls/server.pem, keyfile: tls/server.key}")
        async with run_gateway(conf_dir, text) as gw:
            assert gw.url.startswith("https://127.0.0.1:")
            verified = ssl.create_default_context(cafile=str(pki.ca))
            async with httpx.AsyncClient(verify=verified, timeout=10) as https:
                health = await https.get(f"{gw.url}/healthz")
                body = json.dumps({"type": "invoice.paid", "id": "in_1"}).encode()
                signature = hmac.new(SECRET, body, hashlib.sha256).hexdigest()
                webhook = await https.post(
                    f"{gw.url}/webhooks/acme", content=body, headers={"X-Acme-Signature": signature}
                )
                forged = await https.post(
                    f"{gw.url}/webhooks/acme", content=body, headers={"X-Acme-Signature": "0" * 64}
                )
            (received,) = await rx.wait_for(1)
            # Plain HTTP on the TLS port gets no answer it could mistake for one.
            async with httpx.AsyncClient(timeout=5) as plain:
                with pytest.raises(httpx.HTTPError):
                    await plain.get(gw.url.replace("https://", "http://") + "/healthz")
    assert health.status_code == 200
    assert webhook.status_code == 202, webhook.text
    assert forged.status_code == 401
    assert received.body == body


async def test_an_unusable_certificate_stops_the_gateway_naming_the_resolved_files(
    tmp_path: Path, nats_server: NatsServer, pki: Pki, elsewhere: Path
) -> None:
    conf_dir = tmp_path / "etc"
    text = https_config(
        nats_server.url, "http://127.0.0.1:9", "{certfile: tls/server.pem, keyfile: tls/nope.key}"
    )
    error = await startup_error(conf_dir, text, StartupError)
    assert str(error) == (
        f"server.tls: cannot use the certificate {conf_dir / 'tls' / 'server.pem'} with the key "
        f"{conf_dir / 'tls' / 'nope.key'}: No such file or directory"
    )
    # The client certificate's key does not match the server certificate.
    text = https_config(
        nats_server.url, "http://127.0.0.1:9", "{certfile: tls/server.pem, keyfile: tls/client.key}"
    )
    error = await startup_error(conf_dir, text, StartupError)
    assert "KEY_VALUES_MISMATCH" in str(error).upper()


async def hookgate(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The command line, in a worker thread (it is synchronous; the gateway shares this trio run)."""
    code = await trio.to_thread.run_sync(lambda: main(list(args)))
    out, err = capsys.readouterr()
    return code, out, err


async def test_the_command_line_reaches_an_https_gateway(
    tmp_path: Path,
    nats_server: NatsServer,
    pki: Pki,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    text = https_config(
        nats_server.url, "http://127.0.0.1:9", "{certfile: tls/server.pem, keyfile: tls/server.key}"
    )
    async with run_gateway(tmp_path / "etc", text) as gw:
        connection = ("--url", gw.url, "--token", "test-token")

        code, out, err = await hookgate(capsys, "events", *connection, "--cacert", str(pki.ca), "--json")
        assert (code, err) == (0, "")
        assert json.loads(out)["data"] == []

        # Without the CA: certifi's CAs do not know it, and the message says what to do.
        code, out, err = await hookgate(capsys, "events", *connection)
        assert code == 1
        assert err.startswith(f"hookgate: cannot verify the TLS certificate of the API at {gw.url}")
        assert err.rstrip().endswith("pass --cacert with the CA that signed it (or set SSL_CERT_FILE)")

        monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
        code, out, err = await hookgate(capsys, "events", *connection, "--json")
        assert (code, err) == (0, "")

        code, out, err = await hookgate(capsys, "events", *connection, "--cacert", str(tmp_path / "nope.pem"))
        assert (code, err) == (
            1,
            f"hookgate: --cacert: cannot use {tmp_path / 'nope.pem'}: No such file or directory\n",
        )


def test_the_command_line_finds_an_https_gateway_in_its_config(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        """
        server:
          listen: 127.0.0.1:8443
          tls: {certfile: tls/server.pem, keyfile: tls/server.key}
          api_tokens: [t]
        """,
    )
    assert client.resolve(None, None, str(path), env={}).url == "https://127.0.0.1:8443"
