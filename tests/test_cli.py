"""The `hookgate` command, run as users run it: a subprocess, checked by exit code and output."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from hookgate import __version__

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "config" / "hookgate.yaml"
SCHEMA = ROOT / "config" / "hookgate.schema.json"
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
WHSEC = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without variables the configs under test read, so the host cannot sway them."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HOOKGATE_", "ACME_", "BILLING_", "RECEIVER_"))
    }
    return {**env, **extra}


def hookgate(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hookgate.cli", *args],
        capture_output=True,
        text=True,
        env=env if env is not None else clean_env(),
        cwd=cwd,
        timeout=60,
    )


def write(tmp_path: Path, text: str, name: str = "hookgate.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def uncommented(text: str) -> str:
    """The default config with every optional "# " setting uncommented ("## " lines explain)."""
    return re.sub(r"^# (?!#|yaml-language-server)", "", text, flags=re.MULTILINE)


def test_version() -> None:
    result = hookgate("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"hookgate {__version__}"


def test_no_command_is_a_usage_error() -> None:
    result = hookgate()
    assert result.returncode == 2
    assert "usage: hookgate" in result.stderr


def test_check_summarises_a_valid_config(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
        server:
          listen: 127.0.0.1:9999
        sources:
          acme-shop:
            verify: {{type: hmac, header: X-Sig, secret: s}}
          partner: {{}}
        endpoints:
          billing-svc:
            url: http://billing.test/hooks
            timeout: 2m
            retry: {{schedule: [1s, 5s]}}
            signing: {{scheme: standard-webhooks, secret: {WHSEC}}}
          audit-log:
            subject: audit.events
          once:
            subject: once.events
            retry: {{schedule: []}}
        routes:
          - name: shop-to-billing
            from: [acme-shop]
            types: ["order.*"]
            to: [billing-svc]
          - to: [audit-log]
        """,
    )
    result = hookgate("check", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    out = result.stdout
    assert out.startswith(f"{path}: OK\n")
    assert "listen:    127.0.0.1:9999" in out
    assert f"embedded nats-server, data in {tmp_path / '.hookgate'}" in out
    assert re.search(r"sources:\s+2\n", out) and re.search(r"endpoints:\s+3\n", out)
    assert re.search(r"routes:\s+2\n", out)
    assert re.search(r"acme-shop\s+POST /webhooks/acme-shop\s+verify: hmac", out)
    assert re.search(r"partner\s+POST /webhooks/partner\s+verify: none", out)
    assert re.search(
        r"billing-svc\s+http://billing.test/hooks\s+timeout 2m, 3 attempts, signing: standard-webhooks", out
    )
    assert re.search(r"audit-log\s+subject audit.events\s+timeout 15s, 8 attempts, signing: none", out)
    assert re.search(r"once\s+subject once.events\s+timeout 15s, 1 attempt, signing: none", out)
    assert re.search(r"shop-to-billing\s+acme-shop \[order\.\*\] -> billing-svc", out)
    assert re.search(r"route-1\s+any source \[all types\] -> audit-log", out)


# The acceptance cases: each exits non-zero naming the file, the line and the key path.
@pytest.mark.parametrize(
    ("text", "prefix"),
    [
        (
            """
            server:
              listen: 127.0.0.1:8080
            endpoints:
              billing:
                url: http://billing.test
                retries: 3
            """,
            ":6: $.endpoints.billing.retries: unknown key",
        ),
        (
            """
            endpoints:
              billing:
                url: http://billing.test
                concurrency: lots
            """,
            ':4: $.endpoints.billing.concurrency: expected an integer, got "lots"',
        ),
        (
            """
            sources:
              acme:
                verify:
                  type: hmac
                  header: X-Acme-Signature
                  secret: "${ACME_SECRET}"
            """,
            ":6: $.sources.acme.verify.secret: environment variable ACME_SECRET is not set",
        ),
    ],
    ids=["unknown-key", "wrong-type", "missing-env-var"],
)
def test_check_reports_problems_with_file_line_and_path(tmp_path: Path, text: str, prefix: str) -> None:
    path = write(tmp_path, text)
    result = hookgate("check", "-c", str(path))
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{path}{prefix}")


def test_check_reports_every_problem_one_per_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        endpoints:
          a: {url: "http://a.test", timeout: soon}
          b: {url: "http://b.test", concurrency: 0}
        routes:
          - to: [c]
        """,
    )
    result = hookgate("check", "-c", str(path))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f'{path}:2: $.endpoints.a.timeout: expected a duration like "5m", got "soon"',
        f"{path}:3: $.endpoints.b.concurrency: expected an integer >= 1, got 0",
        f'{path}:5: $.routes[0].to[0]: no endpoint named "c" (endpoints: a, b)',
    ]


def test_check_reads_hookgate_config_and_reports_a_missing_file(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  listen: 127.0.0.1:7777\n", name="other.yaml")
    result = hookgate("check", env=clean_env(HOOKGATE_CONFIG=str(path)))
    assert result.returncode == 0, result.stderr
    assert "127.0.0.1:7777" in result.stdout
    # Without -c or HOOKGATE_CONFIG: ./hookgate.yaml.
    result = hookgate("check", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == "hookgate.yaml: $: cannot read config: No such file or directory\n"


EGRESS_CONFIG = """
    egress:
      allow_networks: {allow}
      https_only: {https_only}
    endpoints:
      loopback:
        url: http://127.0.0.1:8000/hooks
      named:
        url: http://localhost:8001/hooks
      metadata:
        url: http://169.254.169.254/latest
      elsewhere:
        url: https://does-not-resolve.invalid/hooks
      nats:
        subject: audit.events
    """


def test_check_warns_of_every_endpoint_the_ssrf_guard_would_refuse(tmp_path: Path) -> None:
    path = write(tmp_path, EGRESS_CONFIG.format(allow="[]", https_only="false"))
    result = hookgate("check", "-c", str(path))
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stdout.splitlines() if "warning:" in line]
    assert [w.split(": warning:")[0] for w in warnings] == [
        f"{path}:6: $.endpoints.loopback.url",
        f"{path}:8: $.endpoints.named.url",
        f"{path}:10: $.endpoints.metadata.url",
    ]
    assert "127.0.0.1: it is a loopback address" in warnings[0]
    assert "localhost: it resolves to" in warnings[1]
    assert "link-local" in warnings[2]
    assert all("egress.allow_networks" in w for w in warnings)


def test_check_does_not_warn_of_endpoints_the_egress_settings_allow(tmp_path: Path) -> None:
    allow = '["127.0.0.0/8", "::1/128", "169.254.169.254/32"]'
    path = write(tmp_path, EGRESS_CONFIG.format(allow=allow, https_only="false"))
    result = hookgate("check", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stdout


def test_check_warns_of_plain_http_endpoints_under_https_only(tmp_path: Path) -> None:
    allow = '["127.0.0.0/8", "::1/128", "169.254.169.254/32"]'
    path = write(tmp_path, EGRESS_CONFIG.format(allow=allow, https_only="true"))
    result = hookgate("check", "-c", str(path))
    warned = [line.split(": warning:")[0] for line in result.stdout.splitlines() if "warning:" in line]
    assert warned == [
        f"{path}:6: $.endpoints.loopback.url",
        f"{path}:8: $.endpoints.named.url",
        f"{path}:10: $.endpoints.metadata.url",
    ]
    assert "egress.https_only" in result.stdout


def test_check_never_prints_a_url_password(tmp_path: Path) -> None:
    """Endpoint and broker URLs are shown as the API shows them, and the egress warnings (which
    quote a refused URL) hide the password too, however short it is."""
    path = write(
        tmp_path,
        """
        broker:
          url: [nats://hookgate:n4ts-Pass@127.0.0.1:4222, nats://hookgate:n4ts-Pass@127.0.0.2:4222]
        egress:
          https_only: true
        endpoints:
          billing:
            url: http://svc:B1lling-Pass@billing.test/hooks
          short:
            url: http://svc:pw@127.0.0.1:8000/hooks
        """,
    )
    result = hookgate("check", "-c", str(path))
    assert result.returncode == 0, result.stderr
    for secret in ("n4ts-Pass", "B1lling-Pass", ":pw@"):
        assert secret not in result.stdout + result.stderr
    assert "nats://hookgate:***@127.0.0.1:4222, nats://hookgate:***@127.0.0.2:4222" in result.stdout
    assert "http://svc:***@billing.test/hooks" in result.stdout
    warnings = [line for line in result.stdout.splitlines() if "warning:" in line]
    assert len(warnings) == 2
    assert all("egress.https_only" in w and "***@" in w for w in warnings)


def test_run_refuses_a_bad_config_before_starting(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  listen: nowhere\n")
    result = hookgate("run", "-c", str(path))
    assert result.returncode == 1
    assert result.stderr.startswith(f'{path}:2: $.server.listen: expected host:port like "127.0.0.1:8080"')


def test_plugins_lists_the_builtin_components() -> None:
    result = hookgate("plugins")
    assert result.returncode == 0, result.stderr
    # One block per plugin: "name (distribution version)", then its hooks and components.
    blocks = {
        block.split(" ", 1)[0]: block for block in re.split(r"\n(?=\S)", result.stdout.split("\n\n")[0])
    }
    for name, component in (("hmac", "verifier hmac"), ("standard-webhooks", "signer standard-webhooks")):
        assert blocks[name].startswith(f"{name} (hookgate {__version__})\n"), blocks[name]
        assert "hookgate_register_components" in blocks[name]
        assert f"  components: {component}" in blocks[name]
    assert re.search(r"^verifiers: .*\bhmac\b", result.stdout, re.MULTILINE)
    assert re.search(r"^signers: .*\bstandard-webhooks\b", result.stdout, re.MULTILINE)


def test_schema_prints_the_json_schema(tmp_path: Path) -> None:
    result = hookgate("schema")
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    assert schema["title"] == "hookgate configuration"
    assert schema["$ref"] == "#/$defs/Config"
    assert {"Config", "ServerConfig", "BrokerConfig", "SourceConfig", "EndpointConfig", "RouteConfig"} <= set(
        schema["$defs"]
    )
    assert "HmacConfig" in schema["$defs"] and "StandardWebhooksConfig" in schema["$defs"]
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator.check_schema(schema)

    out = tmp_path / "schema.json"
    result = hookgate("schema", "-o", str(out))
    assert result.returncode == 0 and result.stdout == ""
    assert json.loads(out.read_text()) == schema


def test_the_committed_schema_is_up_to_date() -> None:
    # Built-in plugins only, so that other installed plugins do not change it.
    result = hookgate("schema", "--builtin-only")
    assert result.returncode == 0, result.stderr
    assert SCHEMA.read_text() == result.stdout, (
        "config/hookgate.schema.json is out of date: run\n"
        "  hookgate schema --builtin-only -o config/hookgate.schema.json"
    )


@pytest.mark.parametrize("path", [DEFAULT_CONFIG, QUICKSTART], ids=["default", "quickstart"])
def test_the_shipped_configs_pass_check(path: Path) -> None:
    result = hookgate("check", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{path}: OK\n")


def test_the_default_config_is_embedded_and_its_commented_settings_are_valid(tmp_path: Path) -> None:
    result = hookgate("check", "-c", str(DEFAULT_CONFIG))
    assert "embedded nats-server" in result.stdout
    full = write(tmp_path, uncommented(DEFAULT_CONFIG.read_text()))
    assert "sources:\n  acme:" in full.read_text()  # the uncommenting did something
    result = hookgate("check", "-c", str(full), env=clean_env(ACME_SECRET="s", BILLING_WHSEC=WHSEC))
    assert result.returncode == 0, result.stderr
    assert re.search(r"sources:\s+1\n", result.stdout) and re.search(r"routes:\s+2\n", result.stdout)


@pytest.mark.parametrize("name", ["default", "default-uncommented", "quickstart"])
def test_the_shipped_configs_match_the_committed_schema(name: str) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    text = (QUICKSTART if name == "quickstart" else DEFAULT_CONFIG).read_text()
    if name == "default-uncommented":
        text = uncommented(text)
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text()))
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(yaml.safe_load(text))]
    assert errors == []
