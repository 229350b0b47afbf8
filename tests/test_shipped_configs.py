"""Every config the project ships works as shipped: `config/`, `examples/`, and the ConfigMap in
the Kubernetes manifest. Each passes `hookgate check` with no warning and matches the committed
JSON Schema; each that delivers to a service on the same host delivers one event to it, end to
end, through a real gateway and nats-server. The manifests themselves are validated against the
Kubernetes schemas, and the compose file by docker compose where it is installed.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import kubernetes_validate
import msgspec
import pytest
import trio
import yaml

from hookgate import config as config_mod
from hookgate import gateway
from hookgate.plugin_host.hooks import Hooks
from tests.plugin_support import standard_webhooks_sdks_accept
from tests.support import ROOT, receiver
from tests.test_cli import clean_env, hookgate

SCHEMA = ROOT / "config" / "hookgate.schema.json"
SIDECAR = ROOT / "examples" / "sidecar"
KUBERNETES = SIDECAR / "kubernetes.yaml"
COMPOSE = SIDECAR / "docker-compose.yaml"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
# Variables the shipped configs read without a default: a value of the right shape for each.
_REQUIRED = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class Shipped:
    name: str  # where it comes from, relative to the repository
    text: str

    def env(self) -> dict[str, str]:
        """Values for the variables the config needs, as its reader would set them."""
        values = {}
        for var in sorted(set(_REQUIRED.findall(self.text))):
            if var.endswith("WHSEC"):
                values[var] = "whsec_" + base64.b64encode(var.encode().ljust(24, b"-")).decode()
            elif var.endswith("TOKEN"):
                values[var] = "shipped-token"
            else:
                values[var] = f"shipped-{var.lower()}"
        return clean_env(**values)

    def write(self, tmp_path: Path) -> Path:
        path = tmp_path / "hookgate.yaml"
        path.write_text(self.text)
        return path


def _is_hookgate_config(document: Any) -> bool:
    sections = set(config_mod.Config.__struct_fields__)
    return isinstance(document, dict) and bool(document) and set(document) <= sections


def shipped_configs() -> list[Shipped]:
    found = []
    for path in sorted([*ROOT.glob("config/*.yaml"), *ROOT.glob("examples/**/*.yaml")]):
        documents = list(yaml.safe_load_all(path.read_text()))
        name = str(path.relative_to(ROOT))
        if len(documents) == 1 and _is_hookgate_config(documents[0]):
            found.append(Shipped(name, path.read_text()))
        # A hookgate config inside a manifest: a ConfigMap's data.
        for document in documents:
            if isinstance(document, dict) and document.get("kind") == "ConfigMap":
                for key, text in document.get("data", {}).items():
                    if key.endswith((".yaml", ".yml")) and _is_hookgate_config(yaml.safe_load(text)):
                        found.append(Shipped(f"{name}#{document['metadata']['name']}/{key}", text))
    return found


SHIPPED = shipped_configs()


def test_the_shipped_configs_are_all_found() -> None:
    # So that a renamed example cannot drop out of the tests below unnoticed.
    names = {s.name for s in SHIPPED}
    assert {
        "config/hookgate.yaml",
        "examples/quickstart.yaml",
        "examples/sidecar/hookgate.yaml",
        "examples/sidecar/kubernetes.yaml#hookgate-config/hookgate.yaml",
    } <= names


@pytest.mark.parametrize("shipped", SHIPPED, ids=lambda s: s.name)
def test_a_shipped_config_passes_check_without_warnings(shipped: Shipped, tmp_path: Path) -> None:
    path = shipped.write(tmp_path)
    result = hookgate("check", "-c", str(path), env=shipped.env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{path}: OK\n")
    assert "warning" not in result.stdout + result.stderr


@pytest.mark.parametrize("shipped", SHIPPED, ids=lambda s: s.name)
def test_a_shipped_config_matches_the_committed_schema(shipped: Shipped) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text()))
    document = yaml.safe_load(shipped.text)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(document)]
    assert errors == []


def _local_endpoints(loaded: config_mod.LoadedConfig) -> list[str]:
    return [
        name
        for name, endpoint in loaded.config.endpoints.items()
        if endpoint.url is not None and urlsplit(endpoint.url).hostname in LOCAL_HOSTS
    ]


# A config on an external broker needs that broker: tests/test_external_nats.py starts the three
# nodes of examples/nats-cluster and delivers an event through its hookgate.yaml.
DELIVERED_THROUGH_ELSEWHERE = {"examples/nats-cluster/hookgate.yaml"}


def _local(external_broker: bool) -> list[Shipped]:
    out = []
    for shipped in SHIPPED:
        loaded = config_mod.loads(shipped.text, Hooks().registry, file=shipped.name, env=shipped.env())
        if _local_endpoints(loaded) and (loaded.config.broker.url is not None) == external_broker:
            out.append(shipped)
    return out


def _delivering() -> list[Shipped]:
    return _local(external_broker=False)


def test_the_examples_that_deliver_locally_are_tested_end_to_end() -> None:
    assert {s.name for s in _delivering()} >= {
        "examples/quickstart.yaml",
        "examples/sidecar/hookgate.yaml",
        "examples/sidecar/kubernetes.yaml#hookgate-config/hookgate.yaml",
    }
    assert {s.name for s in _local(external_broker=True)} <= DELIVERED_THROUGH_ELSEWHERE


def _on_test_host(loaded: config_mod.LoadedConfig, data_dir: Path, port: int) -> config_mod.LoadedConfig:
    """The same config, run where the test can: any free port, a temporary store, and the local
    endpoints on the test receiver's port. Nothing else changes: the egress guard, signing,
    routes and tokens are the shipped ones."""
    c = loaded.config
    endpoints = {}
    for name, endpoint in c.endpoints.items():
        if name in _local_endpoints(loaded):
            assert endpoint.url is not None
            parts = urlsplit(endpoint.url)
            netloc = f"{parts.hostname}:{port}" if parts.hostname != "::1" else f"[::1]:{port}"
            endpoint = msgspec.structs.replace(endpoint, url=urlunsplit(parts._replace(netloc=netloc)))
        endpoints[name] = endpoint
    config = msgspec.structs.replace(
        c,
        server=msgspec.structs.replace(c.server, listen="127.0.0.1:0"),
        broker=msgspec.structs.replace(c.broker, data_dir=str(data_dir)),
        endpoints=endpoints,
    )
    loaded.config = config
    return loaded


def _internal_event_type(loaded: config_mod.LoadedConfig, endpoint: str) -> str | None:
    """A type that some route sends from `internal` to the endpoint, or None if none does."""
    for route in loaded.config.routes:
        if endpoint in route.to and (not route.from_ or config_mod.INTERNAL_SOURCE in route.from_):
            return route.types[0].replace("*", "shipped") if route.types else "shipped.test"
    return None


@pytest.mark.parametrize("shipped", _delivering(), ids=lambda s: s.name)
async def test_a_shipped_config_delivers_one_event_to_its_local_endpoint(
    shipped: Shipped, tmp_path: Path
) -> None:
    hooks = Hooks()
    loaded = config_mod.load(shipped.write(tmp_path), hooks.registry, env=shipped.env())
    assert loaded.config.broker.url is None, "the shipped configs with a local endpoint embed NATS"
    name = _local_endpoints(loaded)[0]
    token = next(t for t in loaded.config.server.api_tokens if t)
    async with receiver() as rx:
        loaded = _on_test_host(loaded, tmp_path / "data", rx.port)
        event_type = _internal_event_type(loaded, name)
        stopping = trio.Event()
        async with trio.open_nursery() as nursery:
            running = await nursery.start(
                lambda task_status: gateway.run(loaded, hooks, stopping=stopping, task_status=task_status)
            )
            try:
                async with httpx.AsyncClient(timeout=10) as http:
                    body: dict[str, Any] = {"type": event_type or "shipped.test", "data": {"n": 1}}
                    if event_type is None:
                        body["to"] = [name]  # no route from internal: address the endpoint itself
                    answer = await http.post(
                        f"{running.url}/api/v1/events",
                        json=body,
                        headers={"Authorization": f"Bearer {token}"},
                    )
                    assert answer.status_code == 202, answer.text
                    (request,) = await rx.wait_for(1, timeout=20)
            finally:
                stopping.set()
    endpoint = loaded.config.endpoints[name]
    assert endpoint.url is not None
    assert request.path == (urlsplit(endpoint.url).path or "/")
    assert request.json()["data"] == {"n": 1}
    signer = loaded.signers.get(name)
    if signer is not None and signer.type == "standard-webhooks":
        secret = signer.config.secret
        assert isinstance(secret, str), "the shipped examples sign with one whsec_ secret"
        assert standard_webhooks_sdks_accept(secret, request.body, request.headers)


# --- the manifests around the configs ------------------------------------------------------


def test_the_kubernetes_manifest_is_valid_against_the_kubernetes_schemas() -> None:
    version = kubernetes_validate.utils.latest_version()
    for document in yaml.safe_load_all(KUBERNETES.read_text()):
        # strict: unknown fields are errors too, as `kubectl apply --validate=strict` has them.
        kubernetes_validate.validate(document, version, strict=True)


def test_no_compose_service_publishes_ports_in_another_services_network() -> None:
    # Docker refuses `ports:` on a container that joins another's network namespace
    # ("conflicting options: port publishing and the container type network mode"), and
    # `docker compose config` does not catch it: the ports belong to the service that owns it.
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    for name, service in services.items():
        if str(service.get("network_mode", "")).startswith(("service:", "container:")):
            assert "ports" not in service, f"{name} shares a network namespace and publishes ports"
            owner = service["network_mode"].split(":", 1)[1]
            assert owner in services, f"{name} joins the network of unknown service {owner}"


def _compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_the_compose_file_is_valid_for_docker_compose() -> None:
    command = _compose_command()
    if command is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed; .ci/run installs one")
    result = subprocess.run(
        [*command, "-f", str(COMPOSE), "config", "--quiet"], capture_output=True, text=True, cwd=SIDECAR
    )
    assert result.returncode == 0, result.stderr
