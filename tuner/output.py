"""Printing results for people and for programs, in one place.

Every command that reports something offers ``--json``; without it, the same data is shown as a table.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=False, default=_as_json)
    sys.stdout.write("\n")


def _as_json(value: Any) -> Any:
    """What JSON cannot hold as it is: a typed value as its own plain data (``to_dict``, the same as its file:
    a result, a report), anything else (a path, a timestamp) as its text."""
    to_dict = getattr(value, "to_dict", None)
    return to_dict() if callable(to_dict) else str(value)


PIPED_WIDTH = 4096  # columns when the output is not a terminal: wide enough that no row wraps


def console(*, stderr: bool = False) -> Console:
    """Tables and results go to stdout; messages about the run (interrupted, warnings) to stderr.
    Piped or in a log (no terminal), nothing is wrapped: a table is as wide as its widest row, so ``grep`` and
    ``cut`` see one row per line (a table is never wider than its content, so the large width costs nothing)."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(highlight=False, stderr=stderr, width=None if stream.isatty() else PIPED_WIDTH)


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Table:
    out = Table(title=title, title_justify="left", show_lines=False)
    for column in columns:
        out.add_column(column)
    for row in rows:
        out.add_row(*("" if cell is None else str(cell) for cell in row))
    return out


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
