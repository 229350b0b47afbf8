"""`server.role` in one process, `server.workers` as the config and the command line give it."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import msgspec
import nats
import nats.js.errors
import pytest
import trio

from hookgate import config
from hookgate.supervisor import serving_roles, worker_roles
from hookgate.supervisor.plan import available_cores, cgroup_cpu_quota
from tests.support import NatsServer, base_config, receiver, run_gateway

ROUTES = """
endpoints:
  svc: {{url: "{url}/in"}}
routes:
  - {{from: [internal], to: [svc]}}
"""


def _with_role(text: str, role: str) -> str:
    return text.replace("server:\n", f"server:\n  role: {role}\n", 1)


async def _router_consumer_exists(nats_url: str) -> bool:
    async def look() -> bool:
        nc = await nats.connect(nats_url)
        try:
            await nc.jsm().consumer_info("HOOKGATE_EVENTS", "router")
            return True
        except nats.js.errors.NotFoundError:
            return False
        finally:
            await nc.close()

    return await trio.to_thread.run_sync(lambda: asyncio.run(look()))


async def test_an_ingress_process_stores_and_a_delivery_process_delivers(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    for name in ("ingress", "delivery"):
        (tmp_path / name).mkdir()
    async with receiver() as rx:
        text = base_config(nats_server.url, ROUTES.format(url=rx.url))
        async with run_gateway(tmp_path / "ingress", _with_role(text, "ingress")) as ingress:
            response = await ingress.publish("order.created", {"n": 1}, id="split-1")
            assert response.status_code == 202, response.text
            # Stored, and nothing routes it: an ingress process runs no router.
            assert not await _router_consumer_exists(nats_server.url)

            async with run_gateway(tmp_path / "delivery", _with_role(text, "delivery")) as delivery:
                (received,) = await rx.wait_for(1)
                assert received.json()["data"] == {"n": 1}
                # A delivery process serves health, readiness and metrics, not webhooks or the API.
                http = delivery.http
                assert (await http.get(f"{delivery.url}/healthz")).status_code == 200
                assert (await http.get(f"{delivery.url}/readyz")).status_code == 200
                assert (await http.get(f"{delivery.url}/metrics")).status_code == 200
                for path in ("/api/v1/events", "/webhooks/anything"):
                    refused = await http.post(f"{delivery.url}{path}", json={})
                    assert refused.status_code == 404
                    assert refused.json()["error"] == "not_served"


async def test_an_ingress_process_applies_max_unrouted_to_the_routers_backlog(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    for name in ("delivery", "ingress", "again"):
        (tmp_path / name).mkdir()
    async with receiver() as rx:
        text = base_config(nats_server.url, ROUTES.format(url=rx.url))
        # A delivery process has made the router's consumer, and stopped: nothing routes now.
        async with run_gateway(tmp_path / "delivery", _with_role(text, "delivery")):
            pass
        limited = _with_role(text, "ingress").replace("server:\n", "server:\n  max_unrouted: 2\n", 1)
        async with run_gateway(tmp_path / "ingress", limited) as ingress:
            for i in range(2):
                assert (await ingress.publish("order.created", {"n": i})).status_code == 202
            with trio.fail_after(5):  # the backlog is read once a second
                while (refused := await ingress.publish("order.created", {"n": "late"})).status_code != 503:
                    await trio.sleep(0.1)
            assert refused.json()["error"] == "overloaded"
            # A router catches up, and the ingress process admits again.
            async with run_gateway(tmp_path / "again", _with_role(text, "delivery")):
                await rx.wait_for(2)
                with trio.fail_after(5):
                    while (await ingress.publish("order.created", {"n": "again"})).status_code != 202:
                        await trio.sleep(0.1)


def _server(text: str) -> config.ServerConfig:
    return msgspec.convert(msgspec.yaml.decode(textwrap.dedent(text)), config.ServerConfig)


def test_workers_default_to_the_cores_split_between_ingress_and_delivery() -> None:
    assert worker_roles(_server("{}"), cores=1) == ["all"]
    assert worker_roles(_server("{}"), cores=2) == ["ingress", "delivery"]
    assert worker_roles(_server("{}"), cores=5) == ["ingress"] * 3 + ["delivery"] * 2
    # A role given, or a number: that many workers of that role.
    assert worker_roles(_server("{role: delivery}"), cores=3) == ["delivery"] * 3
    assert worker_roles(_server("{workers: 2}"), cores=8) == ["all", "all"]
    assert worker_roles(_server("{workers: 2, role: delivery}"), cores=8) == ["delivery", "delivery"]
    split = worker_roles(_server("{workers: {ingress: 1, delivery: 2}}"), cores=8)
    assert split == ["ingress", "delivery", "delivery"]
    # The port is served by the workers that take webhooks; delivery workers beside them serve none.
    assert serving_roles(split) == {"ingress"}
    assert serving_roles(["delivery", "delivery"]) == {"delivery"}


@pytest.mark.parametrize(
    ("cpu_max", "quota"), [("max 100000\n", None), ("150000 100000\n", 2), ("400000 100000\n", 4), ("", None)]
)
def test_the_cgroup_cpu_quota_is_read_in_whole_cores(tmp_path: Path, cpu_max: str, quota: int | None) -> None:
    path = tmp_path / "cpu.max"
    path.write_text(cpu_max)
    assert cgroup_cpu_quota(path) == quota
    assert cgroup_cpu_quota(tmp_path / "absent") is None


def test_the_default_workers_are_capped_by_the_cpu_quota(tmp_path: Path) -> None:
    path = tmp_path / "cpu.max"
    path.write_text("50000 100000\n")  # half a core: one worker
    assert available_cores(path) == 1


@pytest.mark.parametrize(
    ("server", "error"),
    [
        ("workers: 0", "hookgate.yaml:3: $.server.workers: expected an integer >= 1, got 0"),
        ("workers: 300", "hookgate.yaml:3: $.server.workers: expected an integer <= 256, got 300"),
        ("workers: {ingress: -1}", "hookgate.yaml:3: $.server.workers.ingress: expected an integer >= 0"),
        ("workers: {backend: 1}", "hookgate.yaml:3: $.server.workers: object contains unknown field backend"),
        ("workers: {ingress: 0}", "hookgate.yaml:3: $.server.workers: give at least one worker"),
        ("role: edge", "hookgate.yaml:3: $.server.role: invalid enum value 'edge'"),
        (
            "workers: {ingress: 1, delivery: 1}\n  role: ingress",
            "hookgate.yaml:4: $.server.role: with workers given per role",
        ),
    ],
)
def test_bad_workers_and_roles_are_refused_with_their_line(tmp_path: Path, server: str, error: str) -> None:
    path = tmp_path / "hookgate.yaml"
    path.write_text(f"# workers\nserver:\n  {server}\n")
    result = _hookgate("check", "-c", str(path))
    assert result.returncode == 1
    assert result.stderr.startswith(f"{tmp_path}/{error}"), result.stderr


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--workers", "0"], "--workers: expected 1 to 256, got 0"),
        (["--workers", "ingress=x"], "--workers: expected N or role=N"),
        (["--workers", "ingress=0"], "--workers: expected 1 to 256 workers in all"),
        (["--role", "delivery"], "--role: the workers are given per role"),
    ],
)
def test_bad_workers_on_the_command_line_are_refused(tmp_path: Path, args: list[str], error: str) -> None:
    path = tmp_path / "hookgate.yaml"
    path.write_text("server:\n  workers: {ingress: 1, delivery: 1}\n")
    result = _hookgate("run", "-c", str(path), *args)
    assert result.returncode == 2
    assert result.stderr.startswith(f"hookgate: {error}"), result.stderr


def test_a_port_in_use_stops_the_supervisor_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = tmp_path / "hookgate.yaml"
        path.write_text(f"server:\n  listen: 127.0.0.1:{port}\nbroker:\n  data_dir: {tmp_path / 'data'}\n")
        result = _hookgate("run", "-c", str(path), "--workers", "2")
    assert result.returncode == 1
    expected = f"hookgate: server.listen: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_check_shows_the_workers(tmp_path: Path) -> None:
    path = tmp_path / "hookgate.yaml"
    path.write_text("server:\n  workers: {ingress: 1, delivery: 2}\n")
    result = _hookgate("check", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert "  workers:   3: 1 ingress, 2 delivery\n" in result.stdout
    path.write_text("server: {}\n")
    result = _hookgate("check", "-c", str(path))
    cores = available_cores()
    split = "1 all" if cores == 1 else f"{cores - cores // 2} ingress, {cores // 2} delivery"
    assert f"  workers:   {cores} (the cores available): {split}\n" in result.stdout


def _hookgate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hookgate.cli", *args], capture_output=True, text=True, timeout=60
    )
