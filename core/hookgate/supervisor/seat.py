"""What the supervisor hands a worker through its environment, and the worker's "ready" back.

A worker is `hookgate run` started again with one role and `HOOKGATE_WORKER_SEAT` in its
environment: the inherited listening socket, the embedded nats-server's URL and seed file, and a
pipe to write one byte down once it has started (so the supervisor can tell a worker that cannot
start from one that died later).
"""

from __future__ import annotations

import contextlib
import os

import msgspec

from hookgate.gateway import Seat

SEAT_ENV = "HOOKGATE_WORKER_SEAT"


class _SeatDoc(msgspec.Struct, forbid_unknown_fields=True):
    http_fd: int | None
    broker_url: str | None
    nkey_seed_file: str | None
    ready_fd: int


def seat_env(seat: Seat, ready_fd: int) -> str:
    doc = _SeatDoc(seat.http_fd, seat.broker_url, seat.nkey_seed_file, ready_fd)
    return msgspec.json.encode(doc).decode()


def seat_from_env() -> tuple[Seat, int] | None:
    """This worker's seat and its ready pipe, or None when this process is no supervisor's worker."""
    text = os.environ.pop(SEAT_ENV, None)  # not passed on to anything this process starts
    if not text:
        return None
    doc = msgspec.json.decode(text, type=_SeatDoc)
    return Seat(doc.http_fd, doc.broker_url, doc.nkey_seed_file), doc.ready_fd


def tell_ready(ready_fd: int) -> None:
    """Tell the supervisor this worker has started (it serves, routes and delivers)."""
    with contextlib.suppress(OSError):  # a supervisor that is gone has nothing to hear
        os.write(ready_fd, b"1")
    with contextlib.suppress(OSError):
        os.close(ready_fd)
