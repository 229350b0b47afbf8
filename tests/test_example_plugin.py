"""The third-party plugin in examples/hookgate-example-plugin, installed with pip like any other.

It is found only through its `hookgate` entry point: `hookgate plugins` lists it, its `shared-token`
verifier is usable from YAML, and its `hookgate_delivery_outcome` hook counts attempts.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import trio

from hookgate.config import ConfigError, loads
from hookgate.hookspecs import hookimpl
from hookgate.plugin_host.hooks import Hooks
from hookgate.types import Attempt, ComponentKind
from tests.support import ROOT, NatsServer, base_config, hookgate_command, receiver, run_gateway, write_config

EXAMPLE = ROOT / "examples" / "hookgate-example-plugin"
TOKEN = "t0k3n-example"


def build_isolation_flags() -> list[str]:
    """`--no-build-isolation` (offline, with the installed setuptools) when that can build a wheel.

    setuptools builds wheels by itself from 70.1 on; before that it needs the `wheel` package.
    Without either, pip builds in an isolated environment with setuptools from the package index.
    """
    try:
        version = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        return []
    major, minor = (int(part) for part in version.split(".")[:2])
    if (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None:
        return ["--no-build-isolation"]
    return []


@pytest.fixture(scope="module")
def example() -> Iterator[ModuleType]:
    """Install the example package into this environment (and leave it installed)."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-deps",
        *build_isolation_flags(),
        "-q",
        str(EXAMPLE),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
    importlib.invalidate_caches()
    yield importlib.import_module("hookgate_example_plugin")


def plugin_block(output: str, name: str) -> list[str]:
    """The lines `hookgate plugins` prints for one plugin: its header line and indented details."""
    lines = output.splitlines()
    for i, line in enumerate(lines):
        if line.split(" ", 1)[0] == name and not line.startswith(" "):
            block = [line]
            for detail in lines[i + 1 :]:
                if not detail.startswith("  "):
                    break
                block.append(detail.strip())
            return block
    raise AssertionError(f"plugin {name!r} not listed:\n{output}")


def test_hookgate_plugins_lists_the_example_with_its_hooks_and_verifier(example: ModuleType) -> None:
    result = subprocess.run(hookgate_command("plugins"), capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert plugin_block(result.stdout, "example") == [
        "example (hookgate-example-plugin 0.1.0)",
        "hooks: hookgate_delivery_outcome, hookgate_register_components",
        "components: verifier shared-token",
    ]
    # The built-ins are listed the same way, next to it.
    assert plugin_block(result.stdout, "hmac")[0].startswith("hmac (hookgate ")


def test_the_entry_point_loads_in_process(example: ModuleType) -> None:
    (entry_point,) = [ep for ep in importlib.metadata.entry_points(group="hookgate") if ep.name == "example"]
    assert entry_point.value == "hookgate_example_plugin"
    hooks = Hooks()
    assert hooks.pm.get_plugin("example") is example
    ctype = hooks.registry.get(ComponentKind.VERIFIER, "shared-token")
    assert ctype is not None
    assert ctype.plugin == "example"
    info = {p.name: p for p in hooks.plugins()}["example"]
    assert info.hooks == ["hookgate_delivery_outcome", "hookgate_register_components"]
    assert info.distribution == "hookgate-example-plugin 0.1.0"


def test_the_example_imports_only_the_public_plugin_modules(example: ModuleType) -> None:
    source = Path(example.__file__ or "").read_text()
    hookgate_imports = {
        line.split()[1]
        for line in source.splitlines()
        if line.startswith(("from hookgate", "import hookgate"))
    }
    # The public plugin surface, and the example uses all of it (plugin_kit: its constant-time compare).
    assert hookgate_imports == {"hookgate.hookspecs", "hookgate.types", "hookgate.plugin_kit"}


def test_bad_shared_token_options_get_file_line_and_path(example: ModuleType) -> None:
    registry = Hooks().registry
    cases = {
        "verify:\n      type: shared-token\n      header: X-Token\n": (
            "x.yaml:3: $.sources.partner.verify",
            ("missing", "token"),
        ),
        "verify:\n      type: shared-token\n      header: X-Token\n      token: t\n      tokn: t\n": (
            "x.yaml:7: $.sources.partner.verify.tokn",
            ("unknown",),
        ),
        'verify:\n      type: shared-token\n      header: X-Token\n      token: ""\n': (
            "x.yaml:3: $.sources.partner.verify",
            ("token must not be empty",),
        ),
    }
    for block, (where, words) in cases.items():
        with pytest.raises(ConfigError) as info:
            loads("sources:\n  partner:\n    " + block, registry, file="x.yaml", env={})
        (problem,) = info.value.problems
        assert str(problem).startswith(where + ": "), str(problem)
        assert all(word in str(problem) for word in words), str(problem)


def test_hookgate_check_accepts_a_config_using_the_example_verifier(
    example: ModuleType, tmp_path: Path
) -> None:
    path = write_config(
        tmp_path,
        f"""\
        sources:
          partner:
            verify: {{type: shared-token, header: X-Token, token: {TOKEN}}}
        """,
    )
    result = subprocess.run(
        hookgate_command("check", "-c", str(path)), capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert "verify: shared-token" in result.stdout


class OutcomeSeen:
    def __init__(self) -> None:
        self.done = trio.Event()

    @hookimpl
    def hookgate_delivery_outcome(self, attempt: Attempt) -> None:
        self.done.set()


async def test_a_gateway_uses_the_example_verifier_and_outcome_hook(
    example: ModuleType, tmp_path: Path, nats_server: NatsServer
) -> None:
    seen = OutcomeSeen()
    succeeded_before = example.OUTCOMES["succeeded"]
    async with receiver() as rx:
        text = base_config(
            nats_server.url,
            f"""
            sources:
              partner:
                verify: {{type: shared-token, header: X-Token, token: {TOKEN}}}
            endpoints:
              main:
                url: {rx.url}/main
            routes:
              - from: [partner]
                to: [main]
            """,
        )
        # No plugin is passed for the verifier: the gateway's Hooks() finds it by its entry point.
        async with run_gateway(tmp_path, text, plugins=(seen,)) as gw:
            url = f"{gw.url}/webhooks/partner"
            wrong = await gw.http.post(url, content=b'{"n": 0}', headers={"X-Token": TOKEN + "x"})
            missing = await gw.http.post(url, content=b'{"n": 0}')
            right = await gw.http.post(url, content=b'{"n": 1}', headers={"X-Token": TOKEN})
            await rx.wait_for(1)
            with trio.fail_after(10):
                await seen.done.wait()
    assert wrong.status_code == 401
    assert wrong.json()["error"] == "invalid_signature"
    assert missing.status_code == 401
    assert missing.json()["error"] == "missing_signature"
    assert right.status_code == 202
    assert [r.body for r in rx.requests] == [b'{"n": 1}']
    assert example.OUTCOMES["succeeded"] == succeeded_before + 1
