"""Durations ("500ms", "5m", "2d") and sizes ("64KiB", "1MiB") as they are written in the config."""

from __future__ import annotations

import functools
import math
import re
import time
from datetime import UTC, datetime
from typing import Annotated

import msgspec

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
}

# msgspec matches patterns with re.search, where `$` also matches before a final newline; the
# `(?!\n)` refuses "5s\n" (which seconds() would then reject at run time). In the JSON Schema
# (ECMA-262 regexes) it is a no-op.
DURATION_PATTERN = r"^(\d+(\.\d+)?(ms|s|m|h|d))+(?!\n)$"
SIZE_PATTERN = r"^\d+(B|KiB|MiB|GiB|KB|MB|GB)?(?!\n)$"

# Config fields hold the string as written; validation happens through the pattern so errors name
# the key path, and the numeric value is read with seconds()/size_bytes().
Duration = Annotated[
    str,
    msgspec.Meta(pattern=DURATION_PATTERN, description='A duration such as "500ms", "5s", "10m", "2h", "5d"'),
]
Size = Annotated[str, msgspec.Meta(pattern=SIZE_PATTERN, description='A size such as "64KiB" or "1MiB"')]

_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_SIZE = re.compile(r"(\d+)(B|KiB|MiB|GiB|KB|MB|GB)?")


def seconds(duration: str) -> float:
    """The number of seconds in a duration string such as "1h30m"."""
    if not isinstance(duration, str) or not _DURATION.fullmatch(duration):
        raise ValueError(f'expected a duration like "5m", got {duration!r}')
    return sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(duration))


def size_bytes(size: str) -> int:
    """The number of bytes in a size string such as "1MiB"."""
    match = _SIZE.fullmatch(size) if isinstance(size, str) else None
    if match is None:
        raise ValueError(f'expected a size like "64KiB", got {size!r}')
    return int(match.group(1)) * _SIZE_UNITS[match.group(2) or ""]


def plural(count: int, noun: str) -> str:
    """`count` and the noun, plural unless the count is one: "1 attempt", "3 attempts"."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def format_duration(value: float) -> str:
    """The shortest readable duration string for a number of seconds, for summaries."""
    for unit, factor in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if value >= factor and value % factor == 0:
            return f"{int(value // factor)}{unit}"
    return f"{round(value * 1000)}ms"


@functools.lru_cache(maxsize=4096)  # an event's timestamp is rendered once, not once per attempt
def rfc3339(ts: float) -> str:
    """A unix time as RFC 3339 in UTC with milliseconds, as webhook payloads and the API show it."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


# The times parse_time accepts: those RFC 3339 can write, from the unix epoch on.
EARLIEST_TIME = 0.0
LATEST_TIME = 253402300799.0  # 9999-12-31T23:59:59Z
_UNIX_SECONDS = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)


def parse_time(text: str, now: float | None = None) -> float:
    """A point in time from the API or CLI: RFC 3339 ("2026-11-27T04:00:00Z"), unix seconds, or a
    duration meaning that long ago ("30m").

    Raises ValueError, with a message for the caller, for anything else: text that is none of
    these, `nan` or `inf`, and times before 1970-01-01T00:00:00Z or after 9999-12-31T23:59:59Z.
    """
    text = text.strip()
    if _DURATION.fullmatch(text):
        value = (time.time() if now is None else now) - seconds(text)
    elif _UNIX_SECONDS.fullmatch(text):
        value = float(text)
    else:
        try:
            when = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            raise ValueError(
                'expected a time like "2026-11-27T04:00:00Z", unix seconds, or a duration ago like "1h", '
                f"got {text!r}"
            ) from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        try:
            value = when.timestamp()
        except (OverflowError, ValueError):  # a year-1 date with a timezone ahead of UTC
            value = -math.inf
    if not EARLIEST_TIME <= value <= LATEST_TIME:  # also false for nan
        raise ValueError(
            f"expected a time between {rfc3339(EARLIEST_TIME)} and {rfc3339(LATEST_TIME)}, got {text!r}"
        )
    return value
