"""Constant-time comparison of signatures, digests and tokens."""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Sequence
from typing import AnyStr


def constant_time_equal(a: AnyStr, b: AnyStr) -> bool:
    """Whether two values are equal, in a time that does not tell how much of them matched.

    `str` values must be ASCII (`hmac.compare_digest` raises TypeError otherwise).
    """
    return hmac.compare_digest(a, b)


def matches_any(expected: Iterable[AnyStr], given: Sequence[AnyStr]) -> bool:
    """Whether any expected value equals any given one, comparing every pair in constant time.

    There is no early exit: the time taken does not tell which secret or signature matched.
    """
    matched = False
    for want in expected:
        for got in given:
            matched |= hmac.compare_digest(want, got)
    return matched
