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
