"""Key paths (`$.endpoints.billing.url`) as problems name them, and the lines they were read from."""

from __future__ import annotations

import json
import re

_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")
_LAST_STEP = re.compile(r'(?:\.[^.\[\]]*|\[(?:\d+|"(?:[^"\\]|\\.)*")\])$')


def child(path: str, key: str) -> str:
    # Keys that could be misread as path syntax (dots, brackets, spaces) are written as ["..."].
    return f"{path}.{key}" if _PLAIN_KEY.fullmatch(key) else f"{path}[{json.dumps(key)}]"


def parent(path: str) -> str | None:
    match = _LAST_STEP.search(path)
    return path[: match.start()] if match and match.start() > 0 else None


def line_of(lines: dict[str, int], path: str) -> int | None:
    # Walk up the path until a recorded line is found (a missing key has its parent's line).
    at: str | None = path
    while at is not None:
        if at in lines:
            return lines[at]
        at = parent(at)
    return lines.get("$")
