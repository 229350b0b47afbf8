"""Logging setup: readable text by default, one JSON object per line with `log.format: json`.

Log calls pass ids as `extra` (event_id, delivery_id, endpoint, source) so that JSON logs carry
them as fields an operator can filter on; text logs keep them in the message.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import msgspec
import trio

# Fields that log calls may attach with `extra=`; only these are copied into JSON records.
CONTEXT_FIELDS = ("event_id", "delivery_id", "endpoint", "source", "attempt")

_encode = msgspec.json.Encoder().encode


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return _encode(out).decode()


def configure(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    logging.getLogger("nats").setLevel(logging.CRITICAL)  # its disconnect noise is reported by us


class Summary:
    """Log lines that an outsider can trigger at any rate, as at most one line per key per interval.

    The first occurrence of a key is logged at once, with its detail. Further ones within the
    interval are counted, and logged as one line with the count when the interval ends (`run`)
    or at `flush`. A key stays quiet for a whole interval after a summary, so a steady flood is
    one line per key per interval, and the counts in the lines add up to the occurrences.
    """

    def __init__(self, logger: logging.Logger, level: int, interval: float = 10.0):
        self.logger = logger
        self.level = level
        self.interval = interval
        # key -> [count since the last line, summary template, extra]
        self._counts: dict[str, list[Any]] = {}

    def note(
        self, key: str, summary: str, first: str | None = None, extra: dict[str, Any] | None = None
    ) -> None:
        """One occurrence. `summary` may use {count}, {key} and {interval}; `first` is the line
        logged when the key was quiet (default: `summary` with a count of 1)."""
        entry = self._counts.get(key)
        if entry is not None:
            entry[0] += 1
            return
        self._counts[key] = [0, summary, extra]
        line = first if first is not None else self._format(summary, 1, key)
        self.logger.log(self.level, "%s", line, extra=extra)

    def flush(self) -> None:
        """Log each key's count since its last line; forget keys that had none."""
        for key, entry in list(self._counts.items()):
            count, summary, extra = entry
            if count:
                self.logger.log(self.level, "%s", self._format(summary, count, key), extra=extra)
                entry[0] = 0
            else:
                del self._counts[key]

    async def run(self, stopping: trio.Event | None = None) -> None:
        """Flush every interval until `stopping` is set (or the task is cancelled), then once more."""
        try:
            while stopping is None or not stopping.is_set():
                with trio.move_on_after(self.interval):
                    await (stopping.wait() if stopping is not None else trio.sleep_forever())
                self.flush()
        finally:
            self.flush()

    def _format(self, summary: str, count: int, key: str) -> str:
        return summary.format(count=count, key=key, interval=f"{self.interval:g}s")
