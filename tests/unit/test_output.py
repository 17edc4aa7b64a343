"""What people read when they pipe a command: tables that keep one row per line."""

from __future__ import annotations

import subprocess
import sys

WIDE_ROW = """
from tuner.output import console, table
console().print(table("trials", ["trial", "server arguments"], [["7", " ".join(["--threads 24"] * 40)], ["8", "-t 2"]]))
console().print("a message longer than any terminal: " + "word " * 80)
"""


def test_a_piped_table_and_message_are_never_wrapped() -> None:
    done = subprocess.run([sys.executable, "-c", WIDE_ROW], capture_output=True, text=True, timeout=60, check=True)
    lines = done.stdout.splitlines()
    row = [line for line in lines if "--threads 24" in line]
    assert len(row) == 1 and row[0].count("--threads 24") == 40, lines
    assert any(line.count("word") == 80 for line in lines), lines
    assert max(len(line) for line in lines) < 800, "a table is as wide as its content, not as the piped width"
