"""How many workers run which role, from `server.workers` and `server.role`."""

from __future__ import annotations

import os

from hookgate.config import Role, ServerConfig, WorkerCounts


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, as a container's cpuset limits it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def worker_roles(server: ServerConfig, cores: int | None = None) -> list[Role]:
    """One role per worker process; a single one means no supervisor at all."""
    if isinstance(server.workers, WorkerCounts):
        return server.workers.roles()
    count = server.workers if server.workers is not None else (cores or available_cores())
    return [server.role] * count


def serving_roles(roles: list[Role]) -> set[Role]:
    """The roles whose workers accept connections on the shared port: those that serve webhooks
    and the API. Delivery workers beside them serve no HTTP (their metrics reach /metrics through
    the shared directory); workers that are all delivery serve health and metrics themselves."""
    ingress: set[Role] = {role for role in roles if role != "delivery"}
    return ingress or {"delivery"}
