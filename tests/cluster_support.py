"""Real parts for fault tests on a cluster: three clustered nats-servers on loopback, each one
killable and restartable on its own, and gateways run as separate `hookgate run` processes.

Every process here is started by the test and stopped by its pid (`stop_all`), never by name.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import nats
import trio

from hookgate.broker.embedded import find_server_binary
from tests.support import hookgate_command


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports nothing listens on (all bound at once, then closed)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class ClusterNode:
    """One nats-server of the cluster: its name, client and route ports, and its store."""

    name: str
    port: int
    route_port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, routes: list[int]) -> None:
        """Start (or restart, on the same store) with routes to every node of the cluster."""
        self.directory.mkdir(parents=True, exist_ok=True)
        conf = self.directory / "nats-server.conf"
        route_urls = ", ".join(f'"nats-route://127.0.0.1:{p}"' for p in routes)
        conf.write_text(
            f"server_name: {self.name}\n"
            f"listen: 127.0.0.1:{self.port}\n"
            f'jetstream {{ store_dir: "{self.directory / "js"}" }}\n'
            "cluster {\n"
            "  name: hookgate-test\n"
            f"  listen: 127.0.0.1:{self.route_port}\n"
            f"  routes: [{route_urls}]\n"
            "}\n"
        )
        with (self.directory / "nats-server.log").open("ab") as log:
            self.process = subprocess.Popen(
                [find_server_binary(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=log
            )

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(10)
        self.process = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass
class Cluster:
    """Three clustered nats-servers with JetStream on loopback (n1, n2, n3)."""

    directory: Path
    nodes: list[ClusterNode] = field(default_factory=list)

    def __post_init__(self) -> None:
        ports = free_ports(6)
        self.nodes = [
            ClusterNode(f"n{i + 1}", ports[i], ports[3 + i], self.directory / f"n{i + 1}") for i in range(3)
        ]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def start(self) -> None:
        for node in self.nodes:
            self.start_node(node)

    def start_node(self, node: ClusterNode) -> None:
        node.start([n.route_port for n in self.nodes])

    def node(self, name: str) -> ClusterNode:
        (found,) = (n for n in self.nodes if n.name == name)
        return found

    def stop_all(self) -> None:
        for node in self.nodes:
            node.kill(signal.SIGTERM)

    async def stream_leader(self, stream: str, timeout: float = 20) -> ClusterNode:
        """The node that leads `stream` now, as JetStream's stream info reports it."""
        urls = [n.url for n in self.nodes if n.running]

        async def leader() -> str:
            nc = await nats.connect(urls, connect_timeout=2, max_reconnect_attempts=1)
            try:
                info = await nc.jsm().stream_info(stream)
                assert info.cluster is not None and info.cluster.leader, info
                return str(info.cluster.leader)
            finally:
                await nc.close()

        with trio.fail_after(timeout):
            return self.node(await trio.to_thread.run_sync(lambda: asyncio.run(leader())))


@dataclass
class GatewayProcess:
    """A gateway replica as its own `hookgate run` process, killable with any signal."""

    config: Path
    port: int
    log: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                hookgate_command("run", "-c", str(self.config)), stdout=out, stderr=subprocess.STDOUT
            )

    async def ready(self, timeout: float = 40) -> None:
        """Return once /readyz answers 200; fail if the process exits first."""
        assert self.process is not None
        async with httpx.AsyncClient(timeout=2) as client:
            with trio.fail_after(timeout):
                while True:
                    assert self.process.poll() is None, self.log.read_text()[-3000:]
                    try:
                        if (await client.get(f"{self.url}/readyz")).status_code == 200:
                            return
                    except httpx.TransportError:
                        pass
                    await trio.sleep(0.1)  # a readiness probe's poll: nothing to await

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(20)
        self.process = None
