"""Optional sampling profiles of the hookgate process with py-spy (`run.py --profile`).

py-spy records collapsed stacks ("raw" format); `summarise` turns them into the functions with the
most samples on top of the stack (self) and anywhere on it (inclusive).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

from procs import Processes


def py_spy() -> str | None:
    candidate = Path(sys.executable).parent / "py-spy"
    return str(candidate) if candidate.exists() else shutil.which("py-spy")


def start(procs: Processes, name: str, pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes] | None:
    """Sample `pid` for `seconds` (non-blocking, 200 Hz, all threads) into `out` (collapsed stacks)."""
    exe = py_spy()
    if exe is None:
        return None
    argv = [exe, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds)))]
    argv += [
        "--rate",
        "200",
        "--nonblocking",
        "--gil",
        "--threads",
        "--function",
        "--format",
        "raw",
        "-o",
        str(out),
    ]
    return procs.start(name, argv)


def summarise(path: Path, top: int = 25) -> dict[str, list[tuple[str, float]]]:
    """Self and inclusive share of samples per function (`name (file:line)`), highest first."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(f) for f in stack.split(";")[1:]]  # the first frame is the thread
        if not frames:
            continue
        total += count
        threads[stack.split(";", 1)[0].split(": ", 1)[-1]] += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return {"self": [], "inclusive": []}
    return {
        "samples": [("total", float(total))],
        "threads": [(t, round(100 * n / total, 1)) for t, n in threads.most_common()],
        "self": [(f, round(100 * n / total, 1)) for f, n in own.most_common(top)],
        "inclusive": [(f, round(100 * n / total, 1)) for f, n in inclusive.most_common(top)],
    }


def _short(frame: str) -> str:
    """`fn (/long/path/site-packages/pkg/mod.py:12)` -> `fn (pkg/mod.py:12)`."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("site-packages/", "/work/main/", "lib/python3"):
        if marker in where:
            where = where.split(marker, 1)[1]
    return f"{name} ({where})" if where else name
