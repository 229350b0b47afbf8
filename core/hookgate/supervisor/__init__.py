"""The supervisor: several gateway processes on one host, as one gateway.

`plan` decides how many workers run which role, `seat` is how a worker learns what the supervisor
gives it (the shared listening socket, the embedded nats-server), `process` starts and waits for
one worker, and `supervisor` keeps them all running and drains them on SIGTERM.
"""

from hookgate.supervisor.plan import serving_roles, worker_roles
from hookgate.supervisor.seat import seat_from_env, tell_ready
from hookgate.supervisor.supervisor import supervise

__all__ = ["seat_from_env", "serving_roles", "supervise", "tell_ready", "worker_roles"]
