from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import NatsServer


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A real nats-server with JetStream on a random loopback port, stopped after the test."""
    server = NatsServer(tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        server.stop()
