"""Durations and sizes: the strings the config accepts, and the numbers they mean."""

from __future__ import annotations

import msgspec
import pytest

from hookgate.plugin_kit.units import Duration, Size, format_duration, plural, seconds, size_bytes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("500ms", 0.5),
        ("5s", 5.0),
        ("10m", 600.0),
        ("2h", 7200.0),
        ("5d", 432000.0),
        ("0s", 0.0),
        ("1.5s", 1.5),
        ("1h30m", 5400.0),
        ("1m500ms", 60.5),
    ],
)
def test_seconds(text: str, expected: float) -> None:
    assert seconds(text) == pytest.approx(expected)
    assert msgspec.convert(text, Duration) == text


BAD_DURATIONS = [
    "5",
    "5 minutes",
    "5 m",
    " 5s",
    "5s ",
    "5s\n",
    "5M",
    "5min",
    "-5s",
    "s",
    "1.s",
    ".5s",
    "",
    "5w",
]


@pytest.mark.parametrize("text", BAD_DURATIONS)
def test_bad_durations_are_refused_by_both_the_type_and_seconds(text: str) -> None:
    # The Struct field type and seconds() must agree, or a config that passed validation would
    # fail when the gateway reads it.
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(text, Duration)
    with pytest.raises(ValueError, match="expected a duration"):
        seconds(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("64KiB", 64 * 1024),
        ("1MiB", 1024 * 1024),
        ("2GiB", 2 * 1024**3),
        ("10KB", 10_000),
        ("3MB", 3_000_000),
        ("1GB", 1_000_000_000),
        ("512B", 512),
        ("1024", 1024),
    ],
)
def test_size_bytes(text: str, expected: int) -> None:
    assert size_bytes(text) == expected
    assert msgspec.convert(text, Size) == text


@pytest.mark.parametrize("text", ["1.5MiB", "64kib", "64kb", "1 MiB", "MiB", "", "1MiB\n", "-1B", "1TiB"])
def test_bad_sizes_are_refused_by_both_the_type_and_size_bytes(text: str) -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(text, Size)
    with pytest.raises(ValueError, match="expected a size"):
        size_bytes(text)


def test_non_strings_are_refused() -> None:
    with pytest.raises(ValueError):
        seconds(5)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        size_bytes(1024)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "expected"),
    [(5, "5s"), (90, "90s"), (600, "10m"), (7200, "2h"), (86400, "1d"), (0.5, "500ms"), (0, "0ms")],
)
def test_format_duration(value: float, expected: str) -> None:
    assert format_duration(value) == expected
    assert seconds(expected) == value


def test_plural_counts_one_as_singular() -> None:
    assert [plural(n, "attempt") for n in (0, 1, 2)] == ["0 attempts", "1 attempt", "2 attempts"]
