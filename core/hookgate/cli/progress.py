"""A job's progress on stderr while the command line waits for it.

On a terminal one line redraws in place with `\\r`, a spinner and the counts. Anywhere else (a log
file, CI) a plain line is written when the counts change, at most every few seconds, so a long
recover leaves a readable trail instead of thousands of carriage returns.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from hookgate.cli import tables

SPINNER = "|/-\\"


class JobProgress:
    def __init__(
        self,
        stream: TextIO,
        *,
        interactive: bool | None = None,
        every: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.stream = stream
        self.interactive = stream.isatty() if interactive is None else interactive
        self.every = every
        self.clock = clock
        self.started = clock()
        self._frame = 0
        self._width = 0
        self._last_line: str | None = None
        self._last_at = float("-inf")

    def show(self, job: Mapping[str, Any]) -> None:
        line = tables.job_summary(job)
        if self.interactive:
            self._frame += 1
            self._redraw(f"{SPINNER[self._frame % len(SPINNER)]} {line} ({self._elapsed()})")
            return
        now = self.clock()
        if line != self._last_line and now - self._last_at >= self.every:
            self._write(line + "\n")
            self._last_line, self._last_at = line, now

    def finish(self, job: Mapping[str, Any]) -> None:
        line = f"{tables.job_summary(job)} in {self._elapsed()}"
        if self.interactive:
            self._redraw(line)
            self._write("\n")
        else:
            self._write(line + "\n")

    def _elapsed(self) -> str:
        return f"{self.clock() - self.started:.0f}s"

    def _redraw(self, text: str) -> None:
        # Pad over what the previous, longer line left behind.
        self._write("\r" + text.ljust(self._width))
        self._width = len(text)

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()
