"""Processes for the benchmarks: start them, wait until they serve, account their CPU, stop them by pid.

Everything listens on 127.0.0.1. Every process started here is tracked by a `Processes` instance
and stopped (SIGTERM, then SIGKILL) when it closes, whatever happened in between.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx
import yaml

BENCH = Path(__file__).resolve().parent
PYTHON = sys.executable
_CLK_TCK = os.sysconf("SC_CLK_TCK")
# One client for all control requests: creating one per request costs ~20 ms of CPU (TLS setup).
HTTP = httpx.Client(timeout=5, trust_env=False)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (all its threads)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def machine_busy_seconds() -> float:
    """CPU time all cores of this machine have spent busy so far (from /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / _CLK_TCK


def _children_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class CpuMeter:
    """CPU use over an interval, in cores: some processes by pid, the load generators (children that
    exited meanwhile), and `other`: whatever else kept this machine busy (other users' work)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = {**pids, "harness": os.getpid()}
        self.start_wall = time.monotonic()
        self.start = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self.start_children = _children_seconds()
        self.start_machine = machine_busy_seconds()

    def read(self) -> dict[str, float]:
        wall = max(time.monotonic() - self.start_wall, 1e-9)
        out = {name: (cpu_seconds(pid) - self.start[name]) / wall for name, pid in self.pids.items()}
        out["loadgen"] = (_children_seconds() - self.start_children) / wall
        machine = (machine_busy_seconds() - self.start_machine) / wall
        out["other"] = max(0.0, machine - sum(out.values()))
        # Four digits: `cpu_us_per_event` divides these by event rates of a few hundred per second.
        return {name: round(value, 4) for name, value in out.items()}


class Processes:
    """The benchmark's child processes; `close()` stops every one still running, by pid."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(
        self, name: str, argv: Sequence[str], *, capture: bool = False, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start a process; its stderr (and stdout unless captured) go to `<log_dir>/<name>.log`.

        `env`: variables added to this process's environment for it (and its children).
        """
        log: IO[bytes] = (self.log_dir / f"{name}.log").open("ab")
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if capture else log,
                stderr=log,
                cwd=BENCH.parent,
                env={**os.environ, **env} if env else None,
            )
        finally:
            log.close()
        self._procs.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)  # in case it was paused
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)
        self._procs = [(n, p) for n, p in self._procs if p is not proc]

    def close(self) -> None:
        for _, proc in reversed(self._procs):
            self.stop(proc)

    def run_json(self, name: str, argvs: Sequence[Sequence[str]], timeout: float) -> list[dict[str, Any]]:
        """Run processes side by side that each print one JSON object; their objects, in order."""
        procs = [self.start(f"{name}-{i}", argv, capture=True) for i, argv in enumerate(argvs)]
        try:
            outputs = []
            deadline = time.monotonic() + timeout
            for proc in procs:
                out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
                if proc.returncode != 0:
                    raise RuntimeError(
                        f"{name} exited with {proc.returncode}; see {self.log_dir}/{name}-*.log"
                    )
                outputs.append(json.loads(out))
            return outputs
        finally:
            for proc in procs:
                self.stop(proc)


def wait_http(
    url: str, proc: subprocess.Popen[bytes], timeout: float = 30.0, status: int | None = 200
) -> None:
    """Poll `url` until it answers (with `status`, if given); fail early if `proc` exits."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode} while starting")
        try:
            response = HTTP.get(url, timeout=2)
            if status is None or response.status_code == status:
                return
            last = response.status_code
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout:.0f}s (last: {last})")


# --- the servers --------------------------------------------------------------------------


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_receiver(procs: Processes, name: str, *, paused: bool = False) -> Server:
    port = free_port()
    argv = [PYTHON, str(BENCH / "receiver.py"), "--port", str(port)]
    proc = procs.start(name, [*argv, "--paused"] if paused else argv)
    server = Server(proc, port)
    wait_http(f"{server.url}/__stats", proc)
    return server


def start_bare_hypercorn(procs: Processes) -> Server:
    port = free_port()
    proc = procs.start("bare-hypercorn", [PYTHON, str(BENCH / "baselines.py"), "--port", str(port)])
    server = Server(proc, port)
    wait_http(f"{server.url}/", proc, status=None)
    return server


@dataclass
class Hookgate(Server):
    data_dir: Path

    @property
    def nats_pid(self) -> int:
        return int((self.data_dir / "nats-server.pid").read_text().strip())


def _has_egress_section() -> bool:
    """Whether this hookgate's config has `egress` (its SSRF guard must then allow loopback)."""
    from hookgate import config

    return "egress" in config.Config.__struct_fields__


def _has_server_field(name: str) -> bool:
    from hookgate import config

    return name in config.ServerConfig.__struct_fields__


def hookgate_config(
    port: int,
    data_dir: Path,
    *,
    sources: dict[str, Any] | None = None,
    endpoints: dict[str, Any] | None = None,
    routes: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "server": {"listen": f"127.0.0.1:{port}", "api_tokens": ["bench-token"], "shutdown_grace": "2s"},
        "broker": {"data_dir": str(data_dir)},
        "sources": sources or {},
        "endpoints": endpoints or {},
        "routes": routes or [],
    }
    if endpoints and _has_egress_section():
        config["egress"] = {"allow_networks": ["127.0.0.0/8"]}
    if _has_server_field("workers"):
        config["server"]["workers"] = 1  # one process, as measured before the supervisor existed
    return config


def start_hookgate(
    procs: Processes,
    name: str,
    work_dir: Path,
    config: dict[str, Any],
    log_level: str,
    env: dict[str, str] | None = None,
) -> Hookgate:
    """`python -m hookgate.cli run -c <yaml>` with an embedded NATS in `broker.data_dir`; wait for /readyz.

    The embedded nats-server inherits the gateway's environment, `env` included (e.g. GODEBUG).
    """
    path = work_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    port = int(config["server"]["listen"].rsplit(":", 1)[1])
    argv = [PYTHON, "-m", "hookgate.cli", "run", "-c", str(path), "--log-level", log_level]
    proc = procs.start(name, argv, env=env)
    server = Hookgate(proc, port, Path(config["broker"]["data_dir"]))
    wait_http(f"{server.url}/readyz", proc, timeout=60)
    return server


@contextlib.contextmanager
def paused(pid: int) -> Iterator[None]:
    """SIGSTOP a process for the duration (SIGCONT after, even on error)."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
