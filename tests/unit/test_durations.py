from __future__ import annotations

import pytest

from tuner.durations import format_duration, parse_duration
from tuner.errors import UserError


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("90s", 90), ("30m", 1800), ("8h", 28800),
                                               ("1h30m", 5400), ("1.5h", 5400), (" 2m ", 120)])
def test_parse(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "30x", "m30", "1h30"])
def test_bad_durations_say_how_to_write_them(text: str) -> None:
    with pytest.raises(UserError, match="30m"):
        parse_duration(text, what="budget")


def test_format() -> None:
    assert format_duration(5400) == "1h30m"
    assert format_duration(75) == "1m15s"
    assert format_duration(9) == "9s"
