"""How many workers run which role, from `server.workers` and `server.role`."""

from __future__ import annotations

import math
import os
from pathlib import Path

from hookgate.config import Role, ServerConfig, WorkerCounts

# cgroup v2: "<quota> <period>" in microseconds, or "max <period>" without a quota.
CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def available_cores(cpu_max: Path = CPU_MAX) -> int:
    """The cores this process may run on: its CPU affinity (as a container's cpuset limits it),
    and no more than its cgroup's CPU quota, rounded up (as `--cpus` or a Kubernetes CPU limit
    sets it)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cpu_max)
    return max(1, min(cores, quota)) if quota is not None else cores


def cgroup_cpu_quota(cpu_max: Path) -> int | None:
    """The cgroup's CPU quota in whole cores (rounded up), or None when there is none."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota == "max":
            return None
        return math.ceil(int(quota) / int(period))
    except (OSError, ValueError):
        return None


def worker_roles(server: ServerConfig, cores: int | None = None) -> list[Role]:
    """One role per worker process; a single one means no supervisor at all.

    `workers` omitted: one per core, and with `role: all` half of them ingress, half delivery (the
    odd one ingress), which cost the least CPU per event on 2 cores (docs/scaling.md)."""
    if isinstance(server.workers, WorkerCounts):
        return server.workers.roles()
    if server.workers is not None:
        return [server.role] * server.workers
    count = cores or available_cores()
    if server.role != "all" or count == 1:
        return [server.role] * count
    delivery = count // 2
    return WorkerCounts(ingress=count - delivery, delivery=delivery).roles()


def serving_roles(roles: list[Role]) -> set[Role]:
    """The roles whose workers accept connections on the shared port: those that serve webhooks
    and the API. Delivery workers beside them serve no HTTP (their metrics reach /metrics through
    the shared directory); workers that are all delivery serve health and metrics themselves."""
    ingress: set[Role] = {role for role in roles if role != "delivery"}
    return ingress or {"delivery"}
