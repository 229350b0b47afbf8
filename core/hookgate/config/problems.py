"""Problems found in a config, each with file, line and key path, and the error that lists them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol

from hookgate.config.paths import child


class ConfigError(Exception):
    """One or more problems in a config file, each with file, line and key path."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


@dataclass(frozen=True)
class Problem:
    file: str
    line: int | None
    path: str
    message: str
    missing: str | None = None  # the key that is missing at `path`, if that is the problem

    @property
    def at(self) -> str:
        """The path of what is at fault: a missing key's own path (`$.url`), where `path` (and
        the line of a YAML file) is its parent's."""
        return child(self.path, self.missing) if self.missing is not None else self.path

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.path}: {self.message}"


def show(value: Any) -> str:
    """A value as a problem names it: mappings and lists by their kind, the rest as JSON."""
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    try:
        return json.dumps(value, ensure_ascii=False)
    except TypeError:
        return str(value)  # dates and timestamps that YAML resolved


class Report(Protocol):
    """Where checks report a problem (`Loader.problem`): its key path, the message, and the key that
    is missing there if that is the problem."""

    def __call__(self, path: str, message: str, *, missing: str | None = None) -> None: ...
