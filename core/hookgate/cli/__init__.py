"""The command line: running a gateway, and the operator commands, which talk to a running
gateway through its API. Nothing else imports this package."""

from hookgate.cli.entry import main

__all__ = ["main"]
