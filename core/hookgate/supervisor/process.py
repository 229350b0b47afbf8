"""One worker process: started on the supervisor's main thread, waited for without a thread."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys

import trio

from hookgate.config import Role
from hookgate.gateway import Seat
from hookgate.observe.metrics import MULTIPROC_DIR_ENV
from hookgate.supervisor.seat import SEAT_ENV, seat_env

_PR_SET_PDEATHSIG = 1


def _prepare_child() -> None:  # pragma: no cover - runs in the child between fork and exec
    # A supervisor killed outright takes its workers with it: they get SIGTERM and drain.
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Worker:
    """A started worker: its process, and whether it has said it is ready."""

    def __init__(self, process: subprocess.Popen[bytes], ready_fd: int):
        self.process = process
        self._ready_fd = ready_fd
        self.ready = trio.Event()

    @property
    def pid(self) -> int:
        return self.process.pid

    async def watch_ready(self) -> None:
        """Set `ready` when the worker writes to its pipe; return at EOF (it exited) either way."""
        try:
            await trio.lowlevel.wait_readable(self._ready_fd)
            if os.read(self._ready_fd, 1):
                self.ready.set()
        finally:
            os.close(self._ready_fd)

    async def wait(self) -> int:
        """Wait until the process exits: its exit code (negative: the signal that ended it)."""
        process = self.process
        fd = os.pidfd_open(process.pid)
        try:
            await trio.lowlevel.wait_readable(fd)
        finally:
            os.close(fd)
        return process.wait()

    def signal(self, signum: int) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signum)


def start_worker(config_path: str, role: Role, seat: Seat, metrics_dir: str, log_level: str | None) -> Worker:
    """`hookgate run` again, with one role and its seat. Popen runs on the calling (main) thread on
    purpose: PDEATHSIG fires when the spawning thread exits."""
    read_fd, write_fd = os.pipe()
    argv = [sys.executable, "-m", "hookgate.cli", "run", "-c", config_path, "--workers", "1", "--role", role]
    if log_level:
        argv += ["--log-level", log_level]
    env = {**os.environ, SEAT_ENV: seat_env(seat, write_fd), MULTIPROC_DIR_ENV: metrics_dir}
    inherited = [write_fd] if seat.http_fd is None else [write_fd, seat.http_fd]
    try:
        process = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            pass_fds=inherited,
            preexec_fn=_prepare_child,
            # Its own process group: a Ctrl-C at the terminal reaches the supervisor alone, which
            # then drains each worker once.
            process_group=0,
        )
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    return Worker(process, read_fd)


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
