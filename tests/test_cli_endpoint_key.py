"""`hookgate endpoint-key`: the public key receivers verify an endpoint's v1a signatures with."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hookgate.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_endpoint_key_prints_the_whpk_key_of_a_configured_private_key(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    seed = key.private_bytes_raw()
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    private_key = "whsk_" + base64.b64encode(seed + public).decode()
    config = tmp_path / "hookgate.yaml"
    config.write_text(
        "endpoints:\n"
        "  signed:\n"
        "    url: https://example.test/hooks\n"
        f"    signing: {{scheme: standard-webhooks, private_key: {private_key}}}\n"
        "  shared:\n"
        "    url: https://example.test/other\n"
        "    signing: {scheme: standard-webhooks, secret: whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw}\n"
    )
    printed = _run("endpoint-key", "-c", str(config), "signed")
    shared = _run("endpoint-key", "-c", str(config), "shared")
    unknown = _run("endpoint-key", "-c", str(config), "nope")
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.strip() == "whpk_" + base64.b64encode(public).decode()
    assert shared.returncode == 1 and "no public key" in shared.stderr
    assert unknown.returncode == 1 and "no endpoint named 'nope'" in unknown.stderr
    assert "whsk_" not in printed.stdout + printed.stderr
