"""Durations as people type them: ``90s``, ``30m``, ``8h``, ``1h30m``, or plain seconds."""

from __future__ import annotations

import re

from tuner.errors import UserError

_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, *, what: str = "duration") -> float:
    raw = text.strip().lower()
    try:
        return float(raw)
    except ValueError:
        pass
    pos = 0
    total = 0.0
    for match in _PART.finditer(raw):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT[match.group(2)]
        pos = match.end()
    if pos != len(raw) or not raw:
        raise UserError(f"cannot read {what} {text!r}", "write it like 90s, 30m, 8h or 1h30m")
    return total


def format_duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
